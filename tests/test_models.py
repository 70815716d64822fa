"""Model resolution and the meta-device inventory."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from lora_core import ModelResolutionError, catalogue_ids, inventory, resolve_model, spec_from_text
from lora_core.models import build_meta_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "model-configs"
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
