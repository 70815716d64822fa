"""Strategies mapped to each architecture's names, and the seed's search spaces and recipes."""

from __future__ import annotations

import pytest
from peft_reference import peft_counts

from lora_core import LoraSettings, catalogue_ids, count_lora_params, inventory, resolve_model
from lora_core.strategies import (
    SCENARIOS,
    STRATEGIES,
    StrategyError,
    adapt_to_model,
    compare_strategies,
    count_search_space,
    minimal_targets,
    resolve_strategy,
    search_space,
    settings_on_model,
)

EXPECTED_ROLES = {
    "Q,V": {"attn_q", "attn_v"},
    "All attention": {"attn_q", "attn_k", "attn_v", "attn_o"},
    "FFN only": {"mlp_gate", "mlp_up", "mlp_down", "expert"},
}


@pytest.mark.parametrize("model_id", catalogue_ids())
@pytest.mark.parametrize("strategy", list(EXPECTED_ROLES))
def test_strategy_adapts_exactly_its_roles(model_id: str, strategy: str) -> None:
    inv = inventory(resolve_model(model_id))
    targets = resolve_strategy(inv, strategy)
    result = count_lora_params(inv, targets.apply(LoraSettings(r=4)))
    roles = set(result.modules["role"])
    allowed = EXPECTED_ROLES[strategy] | ({"attn_qkv"} if strategy != "FFN only" else set())
    assert roles <= allowed and roles
    wanted = inv.modules[inv.modules["role"].isin(allowed) & (inv.modules["kind"] != "other")]
    assert len(result.modules) == len(wanted) or targets.note  # Q,V on fused qkv adapts the fused layer


@pytest.mark.parametrize(
    ("model_id", "strategy", "targets"),
    [
        ("meta-llama/Llama-2-7b-hf", "Q,V", ("q_proj", "v_proj")),
        ("openai-community/gpt2", "Q,V", ("c_attn",)),
        ("openai-community/gpt2", "All attention", ("attn.c_proj", "c_attn")),
        ("openai-community/gpt2", "FFN only", ("c_fc", "mlp.c_proj")),
        ("google-bert/bert-base-uncased", "Q,V", ("query", "value")),
        ("facebook/opt-125m", "FFN only", ("fc1", "fc2")),
        ("google-t5/t5-base", "FFN only", ("wi", "wo")),
        ("distilbert/distilbert-base-uncased", "All attention", ("k_lin", "out_lin", "q_lin", "v_lin")),
    ],
)
def test_real_module_names(model_id: str, strategy: str, targets) -> None:
    assert resolve_strategy(inventory(resolve_model(model_id)), strategy).target_modules == targets


def test_bert_ffn_needs_a_regex_and_peft_agrees() -> None:
    inv = inventory(resolve_model("google-bert/bert-base-uncased"))
    targets = resolve_strategy(inv, "FFN only")
    assert isinstance(targets.target_modules, str)  # output.dense is a suffix of attention.output.dense
    settings = targets.apply(LoraSettings(r=8))
    assert (
        count_lora_params(inv, settings).trainable_params == peft_counts("google-bert/bert-base-uncased", settings)[0]
    )


def test_mixtral_ffn_uses_target_parameters() -> None:
    targets = resolve_strategy(inventory(resolve_model("mistralai/Mixtral-8x7B-v0.1")), "FFN only")
    assert targets.target_parameters == ("down_proj", "gate_up_proj")


def test_unmappable_strategy_says_so() -> None:
    from lora_core.models import ModelSpec, inventory_of

    class NoAttention(__import__("torch").nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = __import__("torch").nn.Linear(4, 4)

    inv = inventory_of(ModelSpec("no-attention", "test", "{}"), NoAttention())
    with pytest.raises(StrategyError, match="cannot be mapped"):
        resolve_strategy(inv, "Q,V")
    with pytest.raises(StrategyError, match="unknown strategy"):
        resolve_strategy(inv, "Everything")


def test_minimal_targets_extends_ambiguous_suffixes() -> None:
    names = ["a.0.attn.proj", "a.0.mlp.proj", "a.1.attn.proj", "a.1.mlp.proj"]
    assert minimal_targets(["a.0.attn.proj", "a.1.attn.proj"], names) == ("attn.proj",)


def test_search_space_sizes_match_the_article() -> None:
    assert [len(search_space(p)) for p in ("efficiency", "balanced", "thorough")] == [4, 36, 135]
    first = search_space("balanced")[0]
    assert (first.r, first.lora_alpha, first.target_modules, first.lora_dropout) == (8, 8, ("q_proj", "v_proj"), 0.0)


@pytest.mark.parametrize("model_id", ["openai-community/gpt2", "google-t5/t5-base", "mistralai/Mixtral-8x7B-v0.1"])
def test_search_space_and_scenarios_count_on_any_model(model_id: str) -> None:
    table = count_search_space(model_id, "thorough")
    assert len(table) == 135 and (table["trainable_params"] > 0).all()
    inv = inventory(resolve_model(model_id))
    for scenario in SCENARIOS.values():
        settings, _ = adapt_to_model(scenario["settings"], inv)
        if model_id.startswith("mistralai"):
            settings = settings.replace(lora_dropout=0.0)
        assert count_lora_params(inv, settings).trainable_params > 0


def test_search_space_counts_equal_peft_on_llama() -> None:
    table = count_search_space("meta-llama/Llama-2-7b-hf", "efficiency")
    for settings, counted in zip(search_space("efficiency"), table["trainable_params"]):
        assert counted == peft_counts("meta-llama/Llama-2-7b-hf", settings)[0]


def test_compare_strategies_table() -> None:
    table = compare_strategies("meta-llama/Llama-2-7b-hf", r=16)
    assert list(table["strategy"]) == list(STRATEGIES)
    assert list(table["trainable_params"]) == [8_388_608, 16_777_216, 23_199_744, 39_976_960]
    assert table.loc[0, "size_16bit_mb"] == pytest.approx(8_388_608 * 2 / 1e6)
    assert table.loc[0, "size_fp32_mb"] == pytest.approx(8_388_608 * 4 / 1e6)


@pytest.mark.parametrize(
    ("model_id", "article_targets", "strategy"),
    [
        ("openai-community/gpt2", ("q_proj", "v_proj"), "Q,V"),
        ("openai-community/gpt2", ("q_proj", "k_proj", "v_proj", "o_proj"), "All attention"),
        ("facebook/opt-125m", ("q_proj", "k_proj", "v_proj", "o_proj"), "All attention"),
    ],
)
def test_article_target_sets_map_to_the_strategy_they_stand_for(model_id: str, article_targets, strategy) -> None:
    """The article's Llama target sets on a model without those names become the named strategy,
    whatever order the set was written in (LoraSettings sorts `target_modules`)."""
    inv = inventory(resolve_model(model_id))
    entries = [s for s in search_space("balanced") if set(s.target_modules) == set(article_targets)]
    assert len(entries) == 18
    expected = resolve_strategy(inv, strategy)
    for settings in entries:
        adapted, note = adapt_to_model(settings, inv)
        assert note == f"{', '.join(settings.target_modules)} mapped to {strategy} on {model_id}"
        assert adapted == expected.apply(settings)


def test_settings_on_model_changes_only_the_targets() -> None:
    """Settings carried to another model: a strategy takes that model's own names (GPT-2's fused
    `c_attn` for Q,V, as PEFT counts it), every other field stays; no strategy keeps the targets."""
    settings = LoraSettings(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        use_rslora=True,
        bias="lora_only",
        target_modules=("q_proj", "v_proj"),
        rank_pattern={"h.0.attn.c_attn": 4},
        alpha_pattern={"h.1.attn.c_attn": 4},
    )
    gpt2 = inventory(resolve_model("openai-community/gpt2"))
    mapped, note = settings_on_model(settings, "Q,V", gpt2)
    assert mapped == settings.replace(target_modules=("c_attn",))
    assert "fused" in note
    assert count_lora_params(gpt2, mapped).trainable_params == peft_counts("openai-community/gpt2", mapped)[0]
    assert settings_on_model(settings, None, gpt2) == (settings, "")
    with pytest.raises(StrategyError, match="unknown strategy"):
        settings_on_model(settings, "Everything", gpt2)


def test_search_space_labels_keep_the_articles_order() -> None:
    """The article writes its target sets q, k, v, o: the labels did not, because LoraSettings
    sorts target_modules (k+o+q+v)."""
    table = count_search_space("meta-llama/Llama-2-7b-hf", "thorough")
    assert list(dict.fromkeys(table["target_set"])) == ["q+v", "q+k+v+o", "q+k+v+o+up+down"]
