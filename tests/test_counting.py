"""Counts pinned to real PEFT on the meta device and to the seed article's published numbers."""

from __future__ import annotations

import copy
import warnings

import pytest
from peft_reference import peft_counts

from lora_core import LoraSettings, LoraSettingsError, catalogue_ids, count_lora_params, inventory, resolve_model
from lora_core.counting import matched_module_names
from lora_core.models import build_meta_model
from lora_core.strategies import resolve_strategy

CASES = (
    "all-linear",
    "attention",
    "dora",
    "layers_to_transform",
    "bias_lora_only",
    "bias_all",
    "rank_alpha_pattern",
    "regex",
    "lora_bias",
    "embedding",
    "modules_to_save_head",
    "exclude",
)


def case_settings(model_id: str, case: str) -> LoraSettings:
    """One PEFT config per case, built from the model's own module names."""
    inv = inventory(resolve_model(model_id))
    attention = resolve_strategy(inv, "All attention").target_modules
    qv = resolve_strategy(inv, "Q,V").target_modules
    assert isinstance(attention, tuple) and isinstance(qv, tuple)
    base = LoraSettings(r=8, lora_alpha=16)
    embeddings = tuple(sorted({n.rsplit(".", 1)[-1] for n in inv.modules.loc[inv.modules.kind == "embedding", "name"]}))
    head = (inv.output_embedding.rsplit(".", 1)[-1],) if inv.output_embedding else None
    return {
        "all-linear": base.replace(target_modules="all-linear"),
        "attention": base.replace(target_modules=attention),
        "dora": base.replace(target_modules=attention, use_dora=True),
        "layers_to_transform": base.replace(target_modules=attention, layers_to_transform=(0, 1)),
        "bias_lora_only": base.replace(target_modules=attention, bias="lora_only"),
        "bias_all": base.replace(target_modules=qv, bias="all"),
        "rank_alpha_pattern": base.replace(
            target_modules=attention, rank_pattern={attention[0]: 4}, alpha_pattern={attention[0]: 2}
        ),
        "regex": base.replace(target_modules=r".*\.(" + "|".join(qv) + ")"),
        "lora_bias": base.replace(target_modules=qv, lora_bias=True),
        "embedding": base.replace(target_modules=embeddings),
        "modules_to_save_head": base.replace(target_modules=qv, modules_to_save=head),
        "exclude": base.replace(target_modules="all-linear", exclude_modules=(qv[0],)),
    }[case]


@pytest.mark.parametrize("model_id", catalogue_ids())
@pytest.mark.parametrize("case", CASES)
def test_counts_equal_peft(model_id: str, case: str) -> None:
    settings = case_settings(model_id, case)
    ours = count_lora_params(model_id, settings)
    assert (ours.trainable_params, ours.all_params) == peft_counts(model_id, settings)
    assert ours.base_params == inventory(resolve_model(model_id)).total_params
    assert ours.modules["params"].sum() == ours.lora_params


MOE_CASES = (
    LoraSettings(r=16, lora_alpha=32, target_modules=(), target_parameters=("gate_up_proj", "down_proj")),
    LoraSettings(r=8, target_modules=("q_proj",), target_parameters=("down_proj",), rank_pattern={"down_proj": 4}),
    LoraSettings(r=8, target_modules=r".*\.(q_proj|w1|w3)"),
    LoraSettings(r=4, target_modules=("q_proj", "w2"), layers_to_transform=(1, 3)),
)


@pytest.mark.parametrize("settings", MOE_CASES, ids=["experts", "experts_pattern", "regex_fused", "w2_layers"])
def test_moe_parameter_targets_equal_peft(settings: LoraSettings) -> None:
    model_id = "mistralai/Mixtral-8x7B-v0.1"
    ours = count_lora_params(model_id, settings)
    assert (ours.trainable_params, ours.all_params) == peft_counts(model_id, settings)


def test_task_type_seq_cls_adds_the_head_like_peft_model_for_sequence_classification() -> None:
    from peft import get_peft_model
    from transformers import AutoConfig, BertForSequenceClassification

    from lora_core.models import spec_from_text

    config = AutoConfig.for_model(
        "bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    config.architectures = ["BertForSequenceClassification"]
    spec = spec_from_text(config.to_json_string(), "tiny-bert-cls")
    settings = LoraSettings(r=4, target_modules=("query", "value"), task_type="SEQ_CLS")
    model = BertForSequenceClassification(config)
    expected = get_peft_model(model, settings.to_peft_config()).get_nb_trainable_parameters()
    ours = count_lora_params(spec, settings)
    assert ours.saved_module_params > 0
    assert (ours.trainable_params, ours.all_params) == expected


def test_conv_layers_equal_peft() -> None:
    """nn.Conv2d adapters (kernel and groups) on a small custom model, against PEFT."""
    import torch.nn as nn
    from peft import get_peft_model

    from lora_core.models import ModelSpec

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, kernel_size=3, padding=1)
            self.grouped = nn.Conv2d(16, 16, kernel_size=1, groups=4)
            self.proj = nn.Linear(16, 4)

    settings = LoraSettings(r=4, target_modules=("conv", "grouped", "proj"), use_dora=True)
    expected = get_peft_model(Tiny(), settings.to_peft_config()).get_nb_trainable_parameters()
    spec = ModelSpec("tiny-conv", "test", "{}")
    inv = _custom_inventory(spec, Tiny())
    ours = count_lora_params(inv, settings)
    assert (ours.trainable_params, ours.all_params) == expected


def _custom_inventory(spec, model):
    """An Inventory of an arbitrary nn.Module (the engine's path for non-transformers models)."""
    from lora_core.models import inventory_of

    return inventory_of(spec, model)


# Seed article Out[15] / Out[17] and shared/model-configs/README.md reference counts.
SEED = (
    ("facebook/opt-125m", LoraSettings(r=16, lora_alpha=16, target_modules=("q_proj", "v_proj")), 589_824, 0.47),
    (
        "facebook/opt-125m",
        LoraSettings(r=16, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj")),
        1_179_648,
        0.93,
    ),
    (
        "facebook/opt-125m",
        LoraSettings(r=16, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
        2_654_208,
        2.08,
    ),
    (
        "facebook/opt-125m",
        LoraSettings(
            r=8,
            lora_alpha=16,
            target_modules=("q_proj", "v_proj", "fc1", "fc2"),
            rank_pattern={"fc1": 32, "fc2": 32},
            alpha_pattern={"fc1": 32, "fc2": 32},
            lora_dropout=0.05,
        ),
        3_244_032,
        2.52,
    ),
    ("meta-llama/Llama-2-7b-hf", LoraSettings(r=16, target_modules=("q_proj", "v_proj")), 8_388_608, None),
    (
        "meta-llama/Llama-2-7b-hf",
        LoraSettings(r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        16_777_216,
        None,
    ),
    (
        "meta-llama/Llama-2-7b-hf",
        LoraSettings(r=16, target_modules=("gate_proj", "up_proj", "down_proj")),
        23_199_744,
        None,
    ),
    ("meta-llama/Llama-2-7b-hf", LoraSettings(r=16, target_modules="all-linear"), 39_976_960, None),
    ("mistralai/Mixtral-8x7B-v0.1", LoraSettings(r=16, target_modules="all-linear"), 359_665_664, None),
    ("meta-llama/Llama-3.1-70B-Instruct", LoraSettings(r=16, target_modules="all-linear"), 207_093_760, None),
)


@pytest.mark.parametrize(("model_id", "settings", "trainable", "percent"), SEED)
def test_seed_published_numbers(model_id, settings, trainable, percent) -> None:
    result = count_lora_params(model_id, settings)
    assert result.trainable_params == trainable
    if percent is not None:
        assert round(result.percent_trainable, 2) == percent


def test_mixtral_all_linear_doubles_rank_on_fused_gate_up() -> None:
    result = count_lora_params(
        "mistralai/Mixtral-8x7B-v0.1", LoraSettings(r=16, lora_alpha=32, target_modules="all-linear")
    )
    fused = result.modules[result.modules["name"].str.endswith("gate_up_proj")]
    assert set(fused["rank"]) == {32} and set(fused["alpha"]) == {64.0}
    assert set(result.modules["role"]) >= {"attn_q", "router", "expert"}


def test_rank_only_change_scales_linearly() -> None:
    settings = LoraSettings(r=8, target_modules=("q_proj", "v_proj"))
    small = count_lora_params("meta-llama/Llama-2-7b-hf", settings)
    large = count_lora_params("meta-llama/Llama-2-7b-hf", settings.replace(r=64))
    assert large.lora_params == 8 * small.lora_params


def test_breakdown_reports_scale_with_and_without_rslora() -> None:
    settings = LoraSettings(r=16, lora_alpha=32, target_modules=("q_proj",))
    plain = count_lora_params("facebook/opt-125m", settings).modules
    rs = count_lora_params("facebook/opt-125m", settings.replace(use_rslora=True)).modules
    assert set(plain["scale"]) == {2.0}
    assert set(rs["scale"]) == {8.0}
    assert list(plain.columns) == [
        "name",
        "layer",
        "role",
        "kind",
        "in_features",
        "out_features",
        "experts",
        "rank",
        "alpha",
        "scale",
        "params",
    ]


# --- validation: every problem at once, fields named ------------------------------------------


def test_structural_problems_are_reported_together() -> None:
    with pytest.raises(LoraSettingsError) as error:
        count_lora_params(
            "facebook/opt-125m", LoraSettings(r=0, lora_alpha=-1, lora_dropout=1.5, target_modules=("q_proj",))
        )
    problems = error.value.problems
    assert len(problems) == 3
    assert any("`r`" in p for p in problems)
    assert any("`lora_alpha`" in p for p in problems)
    assert any("`lora_dropout`" in p for p in problems)


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_rank_must_be_positive_integer(r) -> None:
    with pytest.raises(LoraSettingsError, match="`r` must be a positive integer"):
        count_lora_params("facebook/opt-125m", LoraSettings(r=r, target_modules=("q_proj",)))


def test_target_matching_nothing_lists_the_names_that_would_match() -> None:
    with pytest.raises(LoraSettingsError) as error:
        count_lora_params("facebook/opt-125m", LoraSettings(target_modules=("query", "value")))
    message = str(error.value)
    assert "`target_modules`" in message
    assert "q_proj" in message and "fc1" in message


def test_bare_string_target_explains_that_a_string_is_a_regex() -> None:
    with pytest.raises(LoraSettingsError, match="a string is a regex"):
        count_lora_params("facebook/opt-125m", LoraSettings(target_modules="q_proj"))


def test_pattern_key_matching_no_target_is_an_error() -> None:
    settings = LoraSettings(target_modules=("q_proj",), rank_pattern={"fc1": 32}, alpha_pattern={"nothing": 2})
    with pytest.raises(LoraSettingsError) as error:
        count_lora_params("facebook/opt-125m", settings)
    assert len(error.value.problems) == 2
    assert "`rank_pattern` key 'fc1'" in str(error.value)
    assert "`alpha_pattern` key 'nothing'" in str(error.value)


def test_rank_above_smaller_side_warns() -> None:
    result = count_lora_params("mistralai/Mixtral-8x7B-v0.1", LoraSettings(r=16, target_modules="all-linear"))
    assert any("exceeds the smaller side" in w for w in result.warnings)  # the router is 4096 x 8
    ok = count_lora_params("facebook/opt-125m", LoraSettings(r=16, target_modules=("q_proj",)))
    assert not ok.warnings


def test_unsupported_module_type_is_refused_like_peft() -> None:
    settings = LoraSettings(target_modules=("self_attn_layer_norm",))
    with pytest.raises(LoraSettingsError, match="LoRA cannot wrap"):
        count_lora_params("facebook/opt-125m", settings)
    with pytest.raises(ValueError, match="not supported"):
        peft_counts("facebook/opt-125m", settings)


def test_dropout_on_fused_experts_is_refused_like_peft() -> None:
    settings = LoraSettings(r=8, target_modules="all-linear", lora_dropout=0.05)
    with pytest.raises(LoraSettingsError, match="`lora_dropout` is not supported with the fused expert parameters"):
        count_lora_params("mistralai/Mixtral-8x7B-v0.1", settings)
    with pytest.raises(ValueError, match="lora_dropout"):
        peft_counts("mistralai/Mixtral-8x7B-v0.1", settings)


def test_layers_beyond_the_model_are_named() -> None:
    with pytest.raises(LoraSettingsError, match=r"`layers_to_transform`.*layers 0-11"):
        count_lora_params("facebook/opt-125m", LoraSettings(target_modules=("q_proj",), layers_to_transform=(40,)))


def test_default_targets_resolve_where_peft_would_refuse() -> None:
    """With transformers 5, PEFT's `inject_adapter` runs its MoE config conversion before it fills in
    the default targets, and the conversion turns Mixtral's `target_modules=None` into an empty set:
    the defaults (q_proj, v_proj) are never looked up and PEFT raises NoMatchingPeftModuleError.
    The engine resolves PEFT's default mapping first, as PEFT means to."""
    with pytest.raises(ValueError, match="No `target_modules` passed"):
        peft_counts("mistralai/Mixtral-8x7B-v0.1", LoraSettings(r=8))
    result = count_lora_params("mistralai/Mixtral-8x7B-v0.1", LoraSettings(r=8))
    assert set(result.modules["role"]) == {"attn_q", "attn_v"}
    llama = count_lora_params("meta-llama/Llama-2-7b-hf", LoraSettings(r=8))
    assert llama.trainable_params == peft_counts("meta-llama/Llama-2-7b-hf", LoraSettings(r=8))[0]


def peft_scales(model_id: str, settings: LoraSettings) -> dict[str, float]:
    """Each LoRA layer's `scaling` in real PEFT on the meta model, by the name the engine reports:
    the module's, or for a ParamWrapper (nested under `base_layer` when one module has several
    targeted parameters) its module's name and the parameter's."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    model = build_meta_model(resolve_model(model_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, copy.deepcopy(settings.to_peft_config()), low_cpu_mem_usage=True)
    scales = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        if isinstance(module, LoraLayer):
            scales[name] = module.scaling["default"]
    return scales


@pytest.mark.parametrize(
    ("model_id", "settings"),
    [
        (
            "facebook/opt-125m",
            LoraSettings(r=13, lora_alpha=9, target_modules=("q_proj", "fc1"), alpha_pattern={"fc1": 5.5}),
        ),
        (
            "facebook/opt-125m",
            LoraSettings(
                r=13,
                lora_alpha=9,
                target_modules=("q_proj", "v_proj", "fc1"),
                rank_pattern={"fc1": 5579},
                use_rslora=True,
            ),
        ),
        # PEFT's MoE conversion fuses gate and up projections at twice the rank and alpha, which
        # changes the rsLoRA scale: 2 alpha / sqrt(2 r).
        (
            "mistralai/Mixtral-8x7B-v0.1",
            LoraSettings(
                r=16,
                lora_alpha=32,
                target_modules="all-linear",
                use_rslora=True,
                rank_pattern={"q_proj": 4},
                alpha_pattern={"v_proj": 3},
            ),
        ),
    ],
)
def test_each_module_scale_is_peft_s(model_id, settings) -> None:
    modules = count_lora_params(model_id, settings).modules
    ours = dict(zip(modules["name"], modules["scale"]))
    theirs = peft_scales(model_id, settings)
    differ = {
        name: (ours.get(name), theirs.get(name))
        for name in ours.keys() | theirs.keys()
        if ours.get(name) != theirs.get(name)
    }
    print(f"{len(theirs)} PEFT layers, {len(differ)} scales differ")
    assert not differ, list(differ.items())[:5]


def test_matched_and_left_out_names() -> None:
    adapted, left = matched_module_names("facebook/opt-125m", LoraSettings(target_modules="all-linear"))
    assert "lm_head" in left and "lm_head" not in adapted
    assert len(adapted) == 12 * 6


def test_to_dict_has_the_cli_keys() -> None:
    data = count_lora_params("facebook/opt-125m", LoraSettings(r=16, target_modules=("q_proj", "v_proj"))).to_dict()
    assert {"model", "trainable_params", "all_params", "base_params", "percent_trainable", "modules"} <= set(data)
    assert data["trainable_params"] == 589_824
    assert len(data["modules"]) == 24 and data["modules"][0]["params"] == 16 * (768 + 768)


def test_matching_a_bad_regex_is_a_message_and_huge_targets_are_shortened() -> None:
    from lora_core.counting import matched_module_names

    with pytest.raises(LoraSettingsError, match="not a valid regex"):
        matched_module_names("facebook/opt-125m", LoraSettings(target_modules="["))
    with pytest.raises(LoraSettingsError) as error:
        count_lora_params("facebook/opt-125m", LoraSettings(target_modules=("x" * 10_000,)))
    assert len(str(error.value)) < 2_000 and "\n" not in str(error.value)
