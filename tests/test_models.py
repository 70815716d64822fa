"""Model resolution and the meta-device inventory."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from lora_core import ModelResolutionError, catalogue_ids, inventory, resolve_model, spec_from_text
from lora_core.models import build_meta_model

CATALOGUE = Path(__file__).resolve().parents[1] / "lora_core" / "catalogue"


def readme_totals() -> dict[str, int]:
    """The totals table of the catalogue README (copied from shared/model-configs)."""
    text = (CATALOGUE / "README.md").read_text()
    rows = re.findall(r"^\| (\S+)\.json \| \w+ \| ([\d,]+) \|$", text, flags=re.MULTILINE)
    return {name.replace("__", "/"): int(total.replace(",", "")) for name, total in rows}


def test_catalogue_has_the_twenty_configs_under_hub_ids() -> None:
    ids = catalogue_ids()
    assert len(ids) == 20
    assert "meta-llama/Llama-2-7b-hf" in ids and "facebook/opt-125m" in ids
    assert set(ids) == set(readme_totals())


@pytest.mark.parametrize("model_id", catalogue_ids())
def test_meta_inventory_totals_match_the_published_totals(model_id: str) -> None:
    inv = inventory(resolve_model(model_id))
    assert inv.total_params == readme_totals()[model_id]
    assert (
        inv.model_class
        == json.loads((CATALOGUE / f"{model_id.replace('/', '__')}.json").read_text())["architectures"][0]
    )
    assert {"name", "kind", "layer", "role", "in_features", "out_features"} <= set(inv.modules.columns)


def test_resolution_by_directory_and_by_file(tmp_path) -> None:
    source = CATALOGUE / "facebook__opt-125m.json"
    (tmp_path / "config.json").write_text(source.read_text())
    by_dir = resolve_model(str(tmp_path))
    by_file = resolve_model(str(tmp_path / "config.json"))
    assert by_dir.source == by_file.source == "local"
    assert inventory(by_dir).total_params == inventory(by_file).total_params == 125_239_296


def test_directory_without_config_says_so(tmp_path) -> None:
    with pytest.raises(ModelResolutionError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_fails_fast_with_the_way_out() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("nobody/no-such-model")
    assert time.perf_counter() - start < 10  # a guard against retry loops, not a benchmark
    assert "catalogue" in str(error.value) and "upload" in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{oops", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"hidden_size": 8}', "no `model_type`"),
        ('{"model_type": "no-such-arch"}', "unknown to this transformers"),
        ("{" + " " * 1_000_001 + "}", "at most"),
    ],
)
def test_bad_uploaded_configs_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ModelResolutionError, match=message):
        spec_from_text(text, "upload.json")


def test_custom_code_is_not_trusted_implicitly() -> None:
    data = {"model_type": "my-custom", "auto_map": {"AutoConfig": "x.MyConfig"}}
    with pytest.raises(ModelResolutionError, match="trust_remote_code"):
        spec_from_text(json.dumps(data), "custom")


def test_class_falls_back_to_causal_lm_when_architecture_is_unknown() -> None:
    data = json.loads((CATALOGUE / "HuggingFaceTB__SmolLM2-135M.json").read_text())
    data["architectures"] = ["NotARealClass"]
    model = build_meta_model(spec_from_text(json.dumps(data), "renamed"))
    assert type(model).__name__ == "LlamaForCausalLM"
    del data["architectures"]
    assert type(build_meta_model(spec_from_text(json.dumps(data), "bare"))).__name__ == "LlamaForCausalLM"


def test_meta_model_holds_no_weight_memory() -> None:
    model = build_meta_model(resolve_model("meta-llama/Llama-2-70b-hf"))
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize(
    ("model_id", "name", "role"),
    [
        ("meta-llama/Llama-2-7b-hf", "model.layers.3.self_attn.q_proj", "attn_q"),
        ("meta-llama/Llama-2-7b-hf", "model.layers.3.mlp.down_proj", "mlp_down"),
        ("meta-llama/Llama-2-7b-hf", "lm_head", "head"),
        ("meta-llama/Llama-2-7b-hf", "model.embed_tokens", "embedding"),
        ("openai-community/gpt2", "transformer.h.0.attn.c_attn", "attn_qkv"),
        ("openai-community/gpt2", "transformer.h.0.attn.c_proj", "attn_o"),
        ("openai-community/gpt2", "transformer.h.0.mlp.c_proj", "mlp_down"),
        ("google-bert/bert-base-uncased", "bert.encoder.layer.0.attention.output.dense", "attn_o"),
        ("google-bert/bert-base-uncased", "bert.encoder.layer.0.intermediate.dense", "mlp_up"),
        ("google-bert/bert-base-uncased", "bert.encoder.layer.0.output.dense", "mlp_down"),
        ("google-t5/t5-base", "encoder.block.0.layer.1.DenseReluDense.wo", "mlp_down"),
        ("google-t5/t5-base", "decoder.block.0.layer.1.EncDecAttention.o", "attn_o"),
        ("mistralai/Mixtral-8x7B-v0.1", "model.layers.0.mlp.gate", "router"),
        ("mistralai/Mixtral-8x7B-v0.1", "model.layers.0.mlp.experts.gate_up_proj", "expert"),
        ("microsoft/phi-2", "model.layers.0.self_attn.dense", "attn_o"),
    ],
)
def test_roles_and_layers(model_id: str, name: str, role: str) -> None:
    modules = inventory(resolve_model(model_id)).modules.set_index("name")
    assert modules.loc[name, "role"] == role
    expected_layer = int(re.search(r"\.(\d+)\.", name).group(1)) if re.search(r"\.(\d+)\.", name) else -1
    assert modules.loc[name, "layer"] == expected_layer


def test_gpt2_conv1d_shapes_are_in_out() -> None:
    modules = inventory(resolve_model("openai-community/gpt2")).modules.set_index("name")
    row = modules.loc["transformer.h.0.attn.c_attn"]
    assert (row["kind"], row["in_features"], row["out_features"]) == ("conv1d", 768, 2304)


def test_mixtral_experts_are_fused_parameters() -> None:
    modules = inventory(resolve_model("mistralai/Mixtral-8x7B-v0.1")).modules.set_index("name")
    row = modules.loc["model.layers.0.mlp.experts.gate_up_proj"]
    assert (row["kind"], row["experts"]) == ("param", 8)
    assert {row["in_features"], row["out_features"]} == {4096, 28672}


def test_facts_for_the_overview() -> None:
    facts = inventory(resolve_model("meta-llama/Llama-2-7b-hf")).facts
    assert facts["layers"] == 32 and facts["hidden_size"] == 4096 and facts["intermediate_size"] == 11008


# --- hostile configs and paths ---------------------------------------------------------------------


def _llama(**changes) -> str:
    config = resolve_model("meta-llama/Llama-2-7b-hf").config
    return json.dumps({**config, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 1_000_000}, "`num_hidden_layers` = 1,000,000 is beyond any real model"),
        ({"hidden_size": 1e9}, "`hidden_size` = 1,000,000,000 is beyond any real model"),
        ({"num_hidden_layers": -1}, "`num_hidden_layers` must be a whole number"),
        ({"intermediate_size": 2.5}, "`intermediate_size` must be a whole number"),
        ({"vocab_size": 1 << 40}, "`vocab_size`"),
        ({"text_config": {"num_hidden_layers": 10**7}}, "`num_hidden_layers`"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_built(changes, message) -> None:
    """Before: 1,000,000 layers ran 240 s to 8 GB; hidden_size 1e9 gave negative counts."""
    with pytest.raises(ModelResolutionError, match=message):
        spec_from_text(_llama(**changes), "hostile.json")


def test_a_model_beyond_the_parameter_limit_is_refused_and_counts_never_wrap() -> None:
    """Each size within its limit, the whole far beyond any real model: refused by its total,
    which is summed in Python integers (a numpy int64 sum wrapped to negative counts)."""
    spec = spec_from_text(_llama(hidden_size=65536, intermediate_size=1 << 20, num_hidden_layers=1024), "big.json")
    with pytest.raises(ModelResolutionError, match="beyond any real model"):
        inventory(spec)


def test_a_binary_file_as_model_path_is_one_line(tmp_path) -> None:
    binary = tmp_path / "config.json"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 10)
    with pytest.raises(ModelResolutionError, match="not UTF-8 text"):
        resolve_model(str(binary))
    with pytest.raises(ModelResolutionError, match="not UTF-8 text"):
        resolve_model(str(tmp_path))


def test_local_roots_answer_the_same_for_every_path_outside(tmp_path) -> None:
    """A shared server must not tell missing files, folders and non-JSON files apart."""
    inside = tmp_path / "models"
    inside.mkdir()
    (inside / "config.json").write_text(resolve_model("facebook/opt-125m").config_json)
    (inside / "escape").symlink_to("/etc")
    roots = (inside.resolve(),)
    assert resolve_model(str(inside), local_roots=roots).source == "local"
    messages = set()
    for probe in ("/etc/passwd", "/etc", "/no/such/file.json", str(inside / "escape" / "passwd"), "../x/config.json"):
        with pytest.raises(ModelResolutionError) as error:
            resolve_model(probe, local_roots=roots)
        messages.add(str(error.value).removeprefix(probe))
    assert messages == {f": local paths are limited to {roots[0]} on this server"}
    with pytest.raises(ModelResolutionError, match="local model paths are off"):
        resolve_model(str(inside), local_roots=())


def test_local_model_roots_setting(monkeypatch, tmp_path) -> None:
    from lora_core.models import local_model_roots

    monkeypatch.delenv("LORA_EXPLORER_MODEL_ROOTS", raising=False)
    assert local_model_roots() is None
    monkeypatch.setenv("LORA_EXPLORER_MODEL_ROOTS", "")
    assert local_model_roots() == ()
    monkeypatch.setenv("LORA_EXPLORER_MODEL_ROOTS", f"{tmp_path}:/models")
    assert local_model_roots() == (tmp_path.resolve(), Path("/models").resolve())


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_hub_ids_without_an_org_still_go_to_the_hub(name) -> None:
    """A review caught these being taken for local paths ("no such file or folder: gpt2")."""
    for roots in (None, (Path("/nonexistent-root"),)):
        with pytest.raises(ModelResolutionError, match="Hub is unreachable"):
            resolve_model(name, local_roots=roots)


@pytest.mark.parametrize("name", ["a" * 300, "~no-such-user-here/x", "x/" + "b" * 300])
def test_names_no_path_can_hold_are_one_line(name) -> None:
    """OSError (name too long) and RuntimeError (an unknown ~user) escaped before."""
    with pytest.raises(ModelResolutionError):
        resolve_model(name)
    with pytest.raises(ModelResolutionError, match="local paths are limited"):
        resolve_model(name, local_roots=(Path("/nonexistent-root"),))
