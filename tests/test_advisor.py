"""The advisor: the evidence file, the recommendation's provenance (every number shown comes from
the evidence file, the engine or the user's input), its rules, the `advise` CLI and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from tiny_model import build_tiny_causal_lm

from lora_core.advisor import Advice, AdviceError, Case, EvidenceError, advise, load_evidence, numbers_in
from lora_core.advisor.evidence import EVIDENCE_FILE, READS, TASKS
from lora_core.advisor.measure import measure_dataset
from lora_core.cli import main
from lora_core.counting import count_lora_params
from lora_core.datasets import IGNORE_INDEX, tokenize_examples
from lora_core.memory import GIB, GPUS_GIB, estimate_memory
from lora_core.training.data import load_dataset

EVIDENCE = load_evidence()
ROOT = Path(__file__).resolve().parents[1]
CASES = [
    Case("HuggingFaceTB/SmolLM2-135M", "sft", 2000, 100.0, 50.0, 24.0, "quality"),
    Case("meta-llama/Meta-Llama-3-8B", "sft", 100_000, 300.0, 200.0, 24.0, "quality"),
    Case("mistralai/Mixtral-8x7B-v0.1", "sft", 50_000, 400.0, 0.0, 80.0, "speed"),
    Case("meta-llama/Llama-2-70b-hf", "domain", 1_000_000, 1000.0, 0.0, 24.0, "memory"),
    Case("meta-llama/Llama-3.2-1B", "preference", 5000, 200.0, 300.0, 16.0, "speed"),
    Case("facebook/opt-125m", "classification", 300, 3.0, 120.0, 8.0, "quality"),
    Case("openai-community/gpt2", "sft", 10**9, 500.0, 0.0, 24.0, "quality"),
]


@pytest.fixture(scope="module")
def advices() -> list[Advice]:
    return [advise(case) for case in CASES]


# --- the evidence file -------------------------------------------------------------------------


def test_every_claim_says_what_was_read_and_where_it_comes_from() -> None:
    assert len(EVIDENCE.claims) >= 20
    for claim in EVIDENCE.claims.values():
        assert claim.read in READS and claim.source and claim.ref and claim.conditions
        if claim.read in ("primary", "abstract", "secondary"):  # a paper id or a commit-pinned file
            assert (
                re.match(r"arXiv:\d{4}\.\d{5}$", claim.ref)
                or re.search(r"/blob/[0-9a-f]{40}/", claim.ref)
                or (claim.read == "secondary")
            ), claim.id
        if claim.read in ("app", "convention"):  # a file of this repository, and the function it names
            path, _, name = claim.ref.partition(": ")
            source = ROOT / path
            assert source.is_file(), (claim.id, claim.ref)
            assert not name or f"def {name.removesuffix('()')}(" in source.read_text(), (claim.id, claim.ref)


def test_the_sources_the_issue_names_are_all_there() -> None:
    refs = " ".join(claim.ref for claim in EVIDENCE.claims.values())
    for paper in ("2405.09673", "2312.03732", "2402.12354", "2602.04998"):  # Biderman, rsLoRA, LoRA+, LR matters
        assert paper in refs
    assert "tinker-cookbook" in refs and "method_comparison/MetaMathQA" in refs and "thinkingmachines.ai" in refs
    assert {"article-rank-bands", "article-dropout", "article-scenarios"} <= set(EVIDENCE.claims)


def test_the_pissa_and_dora_papers_numbers_are_there_as_read_with_their_references() -> None:
    """The variants' own reported gains, pinned to what their sources say: PiSSA's abstract, DoRA's
    authors' result table, PiSSA's released scripts, and PEFT's same-day re-run and DoRA page."""
    pissa, dora = EVIDENCE["pissa-paper"], EVIDENCE["dora-paper"]
    assert pissa.ref == "arXiv:2404.02948" and pissa.read == "abstract"
    assert "arXiv:2402.09353" in dora.source and dora.read == "primary"
    assert re.search(r"github\.com/NVlabs/DoRA/blob/[0-9a-f]{40}/commonsense_reasoning/README\.md$", dora.ref)
    assert (pissa.numbers["pissa_pct"], pissa.numbers["lora_pct"], pissa.numbers["gain_points"]) == (72.86, 67.7, 5.16)
    assert (dora.numbers["llama3_8b_dora_pct"], dora.numbers["llama3_8b_lora_pct"], dora.numbers["r"]) == (
        85.2,
        80.8,
        32,
    )
    assert (dora.numbers["lora_lr"], dora.numbers["dora_lr_low"], dora.numbers["dora_lr_high"]) == (3e-4, 1e-4, 2e-4)
    scripts = EVIDENCE["pissa-scripts"]
    assert re.search(r"github\.com/GraphPKU/PiSSA/blob/[0-9a-f]{40}/scripts/", scripts.ref)
    assert scripts.numbers["lr"] == 2e-5
    rerun = EVIDENCE["peft-dora-rerun"]
    assert (rerun.numbers["dora_pct"], rerun.numbers["lora_pct"]) == (46.93, 47.84)
    assert (rerun.numbers["dora_train_s"], rerun.numbers["lora_train_s"]) == (1191, 942)
    assert EVIDENCE.number("peft-dora-overhead", "time_pct") == 139
    assert "/blob/" in EVIDENCE["peft-pissa-init"].ref and "pissa" in EVIDENCE["peft-pissa-init"].says


# Commits of huggingface/peft checked to be on its main branch (git merge-base --is-ancestor against main's
# head in a mirror, docs/research/advisor-evidence.md): a commit only on a PR branch may show results PEFT
# replaced before merging, as 52903c83's DoRA run was.
PEFT_MAIN_COMMITS = {
    "f4763a0e75bab8e9c85b588f82e1d8676ae3fda9",  # PR #2869: the earlier result files
    "a99942694efe9abae7563ab3f973e54942fc98af",  # PR #2984: the version between
    "51c2ff666b142d004c12609c9686cf17ca055751",  # PR #3445: the re-run
    "5d3916b304a24734e5acb37116b8e3bcf0c9eae4",  # the DoRA docs page
    "ffa3c4a1e267af528264481a926445f603f3f1f5",  # the PiSSA example
}


def test_every_peft_claim_pins_a_commit_on_peft_s_main_branch() -> None:
    peft = [claim for claim in EVIDENCE.claims.values() if claim.ref.startswith("github.com/huggingface/peft/")]
    assert len(peft) >= 9
    for claim in peft:
        commit = re.search(r"/blob/([0-9a-f]{40})/", claim.ref)
        assert commit and commit.group(1) in PEFT_MAIN_COMMITS, (claim.id, claim.ref)


def test_peft_s_dora_and_lora_runs_are_paired_by_day_in_each_version_on_main() -> None:
    """The DoRA figures the method rule quotes, each set against LoRA run the same day: the earlier files
    (runs of 2025-06-19, at f4763a0e), the version between (2026-01-10, a9994269), the re-run (2026-07-15,
    51c2ff66); every accuracy is a whole count of GSM8K's 1,319 test questions."""
    earlier, between, rerun = EVIDENCE["peft-dora-qv-r32"], EVIDENCE["peft-dora-between"], EVIDENCE["peft-dora-rerun"]
    assert "/blob/f4763a0e75bab8e9c85b588f82e1d8676ae3fda9/" in earlier.ref and earlier.ref.endswith("-dora.json")
    assert "/blob/a99942694efe9abae7563ab3f973e54942fc98af/" in between.ref and between.ref.endswith("-dora.json")
    assert "/blob/f4763a0e75bab8e9c85b588f82e1d8676ae3fda9/" in EVIDENCE["peft-lora-qv-r32"].ref
    pairs = [
        (earlier.numbers["accuracy_pct"], EVIDENCE.number("peft-lora-qv-r32", "accuracy_pct")),
        (between.numbers["dora_pct"], between.numbers["lora_pct"]),
        (rerun.numbers["dora_pct"], rerun.numbers["lora_pct"]),
    ]
    assert pairs == [(48.07, 48.22), (47.99, 49.05), (46.93, 47.84)]
    assert between.numbers["lora_pct"] == EVIDENCE.number("peft-targets-rerun", "between_qv_pct")
    n = EVIDENCE.number("peft-targets-rerun", "test_questions")
    counts = [tuple(round(pct / 100 * n) for pct in pair) for pair in pairs]
    assert counts == [(634, 636), (633, 647), (619, 631)]
    for pct, count in zip([pct for pair in pairs for pct in pair], [k for pair in counts for k in pair], strict=True):
        assert abs(pct - 100 * count / n) < 0.005, pct
    assert earlier.numbers["trainable_params"] == between.numbers["trainable_params"] == 9_289_728


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text + "\n[[claims]]\n" + text.split("\n[[claims]]\n")[1], "appears twice"),
        (lambda text: text.replace('read = "primary"', 'read = "hearsay"', 1), "`read` must be one of"),
        (lambda text: text.replace("lora_over_full_lr = 10 }", "lora_over_full_lr = nan }", 1), "finite number"),
        (lambda text: text.replace('tasks = ["sft"]', 'tasks = ["poetry"]', 1), "scope tasks"),
        (lambda text: text.replace("\n[[claims]]\n", "\n[[claims]]\nid = 3\n", 1), "Cannot overwrite"),
        (lambda text: "\x00\xff" + text, "cannot be read"),
    ],
)
def test_a_broken_evidence_file_is_refused_in_one_line(tmp_path, edit, message) -> None:
    text = EVIDENCE_FILE.read_text()
    broken = tmp_path / "evidence.toml"
    broken.write_text(edit(text))
    with pytest.raises(EvidenceError, match=re.escape(message)) as caught:
        load_evidence(broken)
    assert "\n" not in str(caught.value)


# --- provenance: every number shown is a figure, every figure is the file's, the engine's or the input's


def _check_provenance(advice: Advice) -> None:
    known = {claim_id for claim_id in EVIDENCE.claims}
    for choice in advice.choices:
        assert choice.claims and set(choice.claims) <= known, choice.name
        for alternative in choice.alternatives:
            assert alternative.claims and set(alternative.claims) <= known
    for figure in advice.figures:
        kind, _, rest = figure.origin.partition(":")
        if kind == "claim":
            claim_id, key = rest.split(":")
            value = EVIDENCE.number(claim_id, key)
            assert figure.value in (value if isinstance(value, tuple) else (value,)), figure
        elif kind == "table":
            claim_id, model, key = rest.rsplit(":", 2)
            row = next(row for row in EVIDENCE[claim_id].lr_by_model if row["model"] == model)
            assert figure.value == row[key], figure
        elif kind in ("cell", "cellpct"):
            claim_id, rank, samples, key = rest.split(":")
            cell = next(c for c in EVIDENCE[claim_id].cells if (c["rank"], c["samples"]) == (int(rank), int(samples)))
            assert figure.value == pytest.approx(cell[key] * (100 if kind == "cellpct" else 1)), figure
        elif kind == "scope":
            claim_id, key = rest.split(":")
            assert figure.value in EVIDENCE[claim_id].scope[key], figure
        elif kind == "input":
            assert figure.value == getattr(advice.case, rest), figure
        else:
            assert kind == "engine", figure
        shown = float(figure.text.replace(",", ""))  # the text is the value, rounded for reading
        assert shown == pytest.approx(figure.value, rel=5e-3, abs=0.05), figure
    # model names and claim ids carry digits of their own; they are names, not numbers shown
    names = [
        advice.model_id,
        *known,
        *(row["model"] for claim in EVIDENCE.claims.values() for row in claim.lr_by_model),
    ]
    allowed = {figure.text for figure in advice.figures}
    for text in advice.shown_text():
        for name in sorted(names, key=len, reverse=True):
            text = text.replace(name, "<name>")
        stray = [number for number in numbers_in(text) if number not in allowed]
        assert not stray, f"{stray} in {text!r} come from neither the evidence file nor the engine"


def test_every_recommendation_names_claims_and_every_number_has_a_source(advices) -> None:
    for advice in advices:
        _check_provenance(advice)


def test_the_provenance_check_catches_a_number_written_into_a_rule(advices) -> None:
    advice = advices[0]
    choice = advice.choices[1]
    forged = dataclasses.replace(choice, rule=choice.rule + " Most people use 42.")
    with pytest.raises(AssertionError, match="42"):
        _check_provenance(dataclasses.replace(advice, choices=(advice.choices[0], forged, *advice.choices[2:])))
    wrong = dataclasses.replace(advice.figures[0], value=advice.figures[0].value * 3)
    with pytest.raises(AssertionError):
        _check_provenance(dataclasses.replace(advice, figures=(wrong, *advice.figures[1:])))


# --- the rules ---------------------------------------------------------------------------------


def test_the_method_stays_lora_and_shows_dora_and_pissa_with_their_gains_costs_and_the_counter_evidence(
    advices,
) -> None:
    for advice in advices:
        method = advice.choice("method")
        assert method.value == "LoRA"
        assert {"lr-matters", "dora-paper", "pissa-paper", "peft-dora-rerun"} <= set(method.claims)
        assert {"peft-dora-qv-r32", "peft-lora-qv-r32", "peft-dora-between", "peft-targets-rerun"} <= set(method.claims)
        # DoRA against LoRA run the same day only, in each version on PEFT's main branch, next to the standard error
        assert (
            "PEFT's benchmark ran DoRA and LoRA on the same day at the same settings (r=32 on q,v, one seed each) in "
            "three versions of its results on PEFT's main branch. DoRA scored below LoRA in each, by 0.15 points in "
            "the earlier result files, 1.06 in the version after them and 0.91 in the re-run (46.9% vs 47.8%). Each "
            "difference is smaller than the standard error of one accuracy over GSM8K's 1,319 test questions "
            "(1.4 points), so none of them separates the two." in method.rule
        )
        assert "49.4%" not in method.rule and "gain (" not in method.rule
        dora = next(a for a in method.alternatives if a.value.startswith("DoRA"))
        pissa = next(a for a in method.alternatives if a.value.startswith("PiSSA"))
        assert set(dora.claims) == {"dora-paper", "peft-dora-rerun", "peft-dora-overhead", "lr-matters"}
        assert set(pissa.claims) == {"pissa-paper", "pissa-scripts", "peft-pissa-init", "lr-matters"}
        # the paper's gain, the learning rates it was measured at, then the cost: 1,191 s / 942 s is 26% more
        assert "85.2% vs LoRA's 80.8%" in dora.when and "LoRA at 3e-4 for every rank" in dora.when
        assert "26% more training time" in dora.when and "139% more inference time until merged" in dora.when
        assert "72.9% vs LoRA's 67.7%" in pissa.when and "both at one learning rate, 2e-5" in pissa.when
        assert "SVD of every adapted weight" in pissa.when and "rewrites the base weights" in pissa.when
        _check_provenance(advice)


def test_the_targets_rule_quotes_peft_s_rerun_then_the_earlier_files_next_to_the_test_sets_standard_error(
    advices,
) -> None:
    """PEFT's MLP-only vs q,v comparison as read in its result files: the re-run (51c2ff66) first, then the
    earlier files, the gap shrinking from 4.4 to 1.6 points; the standard error is the binomial one of an
    accuracy over GSM8K's 1,319 test questions, which the files' accuracies are whole counts of."""
    rerun, mlp, qv = EVIDENCE["peft-targets-rerun"], EVIDENCE["peft-lora-mlp-r10"], EVIDENCE["peft-lora-qv-r32"]
    assert rerun.read == "primary" and "/blob/51c2ff666b142d004c12609c9686cf17ca055751/method_comparison/" in rerun.ref
    assert (rerun.numbers["mlp_pct"], rerun.numbers["qv_pct"]) == (49.43, 47.84)
    assert (rerun.numbers["mlp_params"], rerun.numbers["qv_params"]) == (9_461_760, 9_175_040)
    assert (rerun.numbers["mlp_r"], rerun.numbers["qv_r"], rerun.numbers["test_questions"]) == (10, 32, 1319)
    assert (mlp.numbers["accuracy_pct"], qv.numbers["accuracy_pct"]) == (52.62, 48.22)
    assert (mlp.numbers["trainable_params"], qv.numbers["trainable_params"]) == (9_461_760, 9_175_040)
    n = rerun.numbers["test_questions"]
    for pct in (49.43, 47.84, 52.62, 48.22, rerun.numbers["between_mlp_pct"], rerun.numbers["between_qv_pct"]):
        assert abs(pct / 100 * n - round(pct / 100 * n)) <= n * 0.005 / 100, pct  # k of n, shown to 2 decimals
    se, gap = 100 * math.sqrt(0.4943 * (1 - 0.4943) / 1319), 49.43 - 47.84
    assert f"{se:.1f}" == "1.4" and gap < 2 * se
    for advice in advices:
        targets = advice.choice("targets")
        assert {"tm-all-layers", "peft-targets-rerun", "peft-lora-mlp-r10", "peft-lora-qv-r32"} <= set(targets.claims)
        if targets.value != "All linear":
            continue
        rule = targets.rule
        assert (
            "re-run MLP-only LoRA (r=10, 9,461,760 parameters) scored 49.4% against 47.8% for q,v (r=32, 9,175,040)"
            in rule
        )
        assert "earlier result files gave 52.6% against 48.2%" in rule and rule.index("49.4%") < rule.index("52.6%")
        assert "the size did not: 1.6 points in the re-run against 4.4 before, one seed each" in rule
        assert "GSM8K's 1,319 test questions is 1.4 points, so the re-run alone does not separate the two." in rule
        _check_provenance(advice)


@pytest.mark.parametrize(
    ("mlp_pct", "says"),
    [
        (52.0, "so the gap is beyond that noise"),
        (47.0, "MLP-only did not lead in every version, so only the first reason stands"),
    ],
)
def test_the_targets_rules_verdict_follows_the_rerun_in_the_file(tmp_path, mlp_pct, says) -> None:
    edited = tmp_path / "evidence.toml"
    edited.write_text(EVIDENCE_FILE.read_text().replace("mlp_pct = 49.43,", f"mlp_pct = {mlp_pct},", 1))
    rule = advise(CASES[0], load_evidence(edited)).choice("targets").rule
    assert says in rule and "does not separate" not in rule


@pytest.mark.parametrize(
    ("between_dora", "rerun_dora", "says"),
    [
        (49.55, 46.93, "The sign of DoRA's difference flips between them: 0.15 points below in the earlier result "
         "files, 0.50 above in the version after them and 0.91 below in the re-run (46.9% vs 47.8%). Each difference "
         "is smaller than"),
        (47.99, 44.84, "DoRA scored below LoRA in each, by 0.15 points in the earlier result files, 1.06 in the "
         "version after them and 3.00 in the re-run (44.8% vs 47.8%). The largest difference exceeds the standard "
         "error of one accuracy over GSM8K's 1,319 test questions (1.4 points)."),
    ],
)  # fmt: skip
def test_the_method_rules_dora_sentence_follows_the_same_day_pairs_in_the_file(
    tmp_path, between_dora, rerun_dora, says
) -> None:
    text = EVIDENCE_FILE.read_text().replace("dora_pct = 47.99,", f"dora_pct = {between_dora},", 1)
    edited = tmp_path / "evidence.toml"
    edited.write_text(text.replace("dora_pct = 46.93,", f"dora_pct = {rerun_dora},", 1))
    advice = advise(CASES[0], load_evidence(edited))
    rule = advice.choice("method").rule
    assert says in rule and ("none of them separates" in rule) == (rerun_dora > 46)
    assert advice.choice("method").value == "LoRA"


def test_the_count_and_the_memory_are_the_engines_own(advices) -> None:
    for advice in advices:
        assert advice.count.trainable_params == count_lora_params(advice.case.model, advice.settings).trainable_params
        estimate = estimate_memory(advice.case.model, advice.settings, advice.setup)
        assert advice.estimate.required_bytes == estimate.required_bytes
        assert advice.fits == estimate.fits(advice.case.gpu_gib)


def test_the_rank_grows_with_the_dataset_until_the_ladder_ends() -> None:
    ladder = EVIDENCE.number("app-rank-ladder", "ladder")
    ranks = [
        advise(Case("meta-llama/Llama-3.2-1B", examples=n, completion_tokens=200.0, priority="speed"))
        for n in (100, 10**4, 10**5, 10**7, 10**9)
    ]
    values = [advice.settings.r for advice in ranks]
    assert values == sorted(values) and values[0] == ladder[0] and values[-1] == ladder[-1]
    for advice in ranks:  # the capacity rule: the rung gives at least one parameter per completion token
        if ladder[0] < advice.settings.r < ladder[-1]:
            assert advice.count.trainable_params >= advice.case.examples * advice.case.completion_tokens
    assert not ranks[1].warnings and any("capacity" in warning for warning in ranks[-1].warnings)


def test_quality_first_takes_one_rung_up_and_preference_tuning_the_lowest() -> None:
    ladder = list(EVIDENCE.number("app-rank-ladder", "ladder"))
    case = Case("meta-llama/Llama-3.2-1B", examples=20_000, completion_tokens=200.0, priority="speed")
    speed = advise(case).settings.r
    assert advise(dataclasses.replace(case, priority="quality")).settings.r == ladder[ladder.index(speed) + 1]
    assert advise(dataclasses.replace(case, task="preference")).settings.r == ladder[0]


def test_a_model_in_the_cookbooks_table_gets_its_own_learning_rate_else_the_nearest() -> None:
    exact = advise(Case("meta-llama/Llama-3.2-1B", examples=1000))
    assert exact.training.learning_rate == 1e-3 and "nearest" not in exact.choice("learning_rate").rule
    nearest = advise(Case("meta-llama/Llama-2-70b-hf", examples=1000, gpu_gib=141.0))
    assert nearest.training.learning_rate == 3e-4 and "Llama-3.1-70B" in nearest.choice("learning_rate").rule


def test_what_does_not_fit_gets_the_nearest_change_that_does() -> None:
    roomy = advise(Case("meta-llama/Meta-Llama-3-8B", examples=10_000, completion_tokens=200.0, gpu_gib=80.0))
    assert roomy.fits and roomy.setup.quantization == "none" and not roomy.setup.gradient_checkpointing
    tight = advise(Case("meta-llama/Meta-Llama-3-8B", examples=10_000, completion_tokens=1500.0, gpu_gib=24.0))
    assert tight.fits and (tight.setup.gradient_checkpointing or tight.setup.quantization == "nf4")
    assert "Nearest change" in tight.choice("memory").rule
    assert tight.training.micro_batch * tight.training.grad_accumulation >= EVIDENCE.number(
        "app-batch", "effective_batch"
    )
    huge = advise(Case("meta-llama/Llama-2-70b-hf", examples=10_000, gpu_gib=24.0))
    smallest = next(gib for gib in GPUS_GIB if huge.estimate.fits(gib))  # QLoRA + checkpointing at micro-batch 1
    assert not huge.fits and f"smallest common GPU it fits is {smallest} GiB" in huge.choice("memory").rule
    assert huge.estimate.required_bytes > 24 * GIB


def test_memory_first_goes_straight_to_qlora_at_micro_batch_1() -> None:
    advice = advise(Case("meta-llama/Meta-Llama-3-8B", examples=10_000, gpu_gib=24.0, priority="memory"))
    assert (
        advice.setup.quantization == "nf4" and advice.setup.gradient_checkpointing and advice.training.micro_batch == 1
    )


def test_the_sequence_length_covers_prompt_and_completion_padded_to_64() -> None:
    advice = advise(Case("facebook/opt-125m", examples=10, completion_tokens=100.0, prompt_tokens=30.5))
    assert advice.training.seq_len == 192
    assert advise(dataclasses.replace(advice.case, seq_len=77)).training.seq_len == 77


def test_steps_cover_the_epochs() -> None:
    advice = advise(Case("facebook/opt-125m", examples=1000, completion_tokens=50.0))
    training = advice.training
    assert training.steps == math.ceil(1000 * training.epochs / training.effective_batch)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"task": "poetry"}, "`task`"),
        ({"examples": 0}, "`examples`"),
        ({"examples": True}, "`examples`"),
        ({"examples": 10**12}, "`examples`"),
        ({"completion_tokens": float("nan")}, "`completion_tokens`"),
        ({"completion_tokens": 0.0}, "`completion_tokens`"),
        ({"prompt_tokens": -1.0}, "`prompt_tokens`"),
        ({"gpu_gib": float("inf")}, "`gpu_gib`"),
        ({"gpu_gib": 0.0}, "`gpu_gib`"),
        ({"priority": "vibes"}, "`priority`"),
        ({"seq_len": 0}, "`seq_len`"),
    ],
)
def test_a_bad_case_is_refused_in_one_line_naming_the_field(changes, field) -> None:
    with pytest.raises(AdviceError) as caught:
        advise(dataclasses.replace(Case("facebook/opt-125m"), **changes))
    assert field in str(caught.value) and "\n" not in str(caught.value)


# --- measuring a dataset ----------------------------------------------------------------------------


def test_a_measured_dataset_counts_the_tokens_training_sees(tmp_path) -> None:
    from transformers import AutoTokenizer

    model = build_tiny_causal_lm(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [{"prompt": "x " * (i + 1), "completion": "y " * (3 * i + 1)} for i in range(20)]
    upload = tmp_path / "data.jsonl"
    upload.write_text("\n".join(json.dumps(row) for row in rows))
    dataset = load_dataset(f"upload:{upload}")
    measured = measure_dataset(dataset, tokenizer, str(model))
    encoded = tokenize_examples([*dataset.train, *dataset.eval], tokenizer, 10**6)
    completion = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded]
    assert measured.examples == 20
    assert measured.completion_tokens == pytest.approx(sum(completion) / 20)
    assert measured.prompt_tokens == pytest.approx(
        sum(len(e["input_ids"]) for e in encoded) / 20 - sum(completion) / 20
    )
    assert measured.completion_tokens > measured.prompt_tokens  # the completions were made longer


# --- the CLI -------------------------------------------------------------------------------------


def _advise(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["advise", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_advise_json_gives_config_count_memory_and_claims_per_choice(capsys) -> None:
    argv = ["--model", "meta-llama/Meta-Llama-3-8B", "--task", "sft", "--examples", "100000"]
    code, out, _ = _advise(capsys, *argv, "--completion-tokens", "300", "--gpu-gb", "24", "--json")
    data = json.loads(out)
    assert code == 0
    expected = advise(Case("meta-llama/Meta-Llama-3-8B", "sft", 100_000, 300.0, 0.0, 24.0))
    assert data["config"]["r"] == expected.settings.r and data["config"]["peft_type"] == "LORA"
    assert data["trainable_params"] == expected.count.trainable_params
    assert data["memory"]["fits"] is expected.fits
    assert data["memory"]["required_gib"] == round(expected.estimate.required_bytes / GIB, 3)
    assert set(data["choices"]) >= {"targets", "r", "lora_alpha", "lora_dropout", "learning_rate", "epochs", "memory"}
    assert all(choice["claims"] for choice in data["choices"].values())


def test_advise_text_lists_each_choice_and_the_sources(capsys) -> None:
    code, out, _ = _advise(capsys, "--model", "facebook/opt-125m", "--examples", "2000", "--completion-tokens", "100")
    assert code == 0
    assert "r = " in out and "learning_rate = " in out and "Claims:" in out and "arXiv:2405.09673" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--examples", "10"], "--completion-tokens"),
        (["--examples", "-5", "--completion-tokens", "10"], "`examples`"),
        (["--examples", "1e9", "--completion-tokens", "10"], "invalid int value"),
        (["--examples", "10", "--completion-tokens", "nan"], "`completion_tokens`"),
        (["--examples", "10", "--completion-tokens", "10", "--gpu-gb", "-1"], "`gpu_gib`"),
        (["--examples", "10", "--completion-tokens", "10", "--task", "rlhf"], "invalid choice"),
        (["--examples", "10", "--completion-tokens", "10", "--dataset", "reverse_list"], "not both"),
        (["--dataset", "upload:../../etc/passwd"], "use a .jsonl or .csv file"),
        (["--dataset", "upload:/nonexistent/x.jsonl"], "does not exist"),
    ],
)
def test_advise_refuses_bad_flags_with_exit_2_and_one_line(capsys, argv, message) -> None:
    code, out, err = _advise(capsys, "--model", "facebook/opt-125m", *argv)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and message in err


def test_advise_refuses_a_binary_upload_and_an_unknown_model(capsys, tmp_path) -> None:
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(bytes(range(256)) * 4)
    code, _, err = _advise(capsys, "--model", "facebook/opt-125m", "--dataset", f"upload:{junk}")
    assert code == 2 and "UTF-8" in err and len(err.strip().splitlines()) == 1
    code, _, err = _advise(capsys, "--model", "../../nope", "--examples", "5", "--completion-tokens", "5")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_tasks_are_the_four_the_page_offers() -> None:
    assert set(TASKS) == {"sft", "domain", "classification", "preference"}


# --- Verify ------------------------------------------------------------------------------------


def test_verify_grid_is_the_advice_with_its_ladder_neighbours_and_lr_factors() -> None:
    from lora_core.advisor.verify import verify_grid

    advice = advise(Case("facebook/opt-125m", examples=2000, completion_tokens=100.0))
    ladder = list(EVIDENCE.number("app-rank-ladder", "ladder"))
    ranks, rates = verify_grid(advice)
    index = ladder.index(advice.settings.r)
    assert ranks == f"r={ladder[index - 1]},{ladder[index]},{ladder[index + 1]}"
    factors = EVIDENCE.number("app-verify", "lr_factors")
    assert [float(v) for v in rates.removeprefix("lr=").split(",")] == pytest.approx(
        [advice.training.learning_rate * f for f in factors]
    )


@pytest.mark.parametrize(
    ("losses", "verdicts", "says"),
    [
        ([1.0, 1.2], ["best", "worse"], "has the lowest eval loss"),
        ([1.1, 1.0], ["not significant", "best"], "within seed noise"),
        ([1.5, 1.0], ["worse", "best"], "more than the seeds' spread"),
        ([1.5, 1.0], ["no seed spread", "best"], "one seed each"),
    ],
)
def test_the_verdict_reads_the_ranking_of_the_advised_config(losses, verdicts, says) -> None:
    import pandas as pd

    from lora_core.advisor.verify import verify_verdict

    ranking = pd.DataFrame({"r": [16, 32], "lr": [1e-3, 5e-4], "eval_loss": losses, "verdict": verdicts})
    ranking = ranking.sort_values("eval_loss").reset_index(drop=True)
    assert says in verify_verdict(16, 1e-3, ranking)
    assert "not finished" in verify_verdict(64, 1e-3, ranking)
    assert "No trial" in verify_verdict(16, 1e-3, ranking.iloc[0:0])


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_a_folders_own_code_never_runs_even_when_stdin_says_yes(tmp_path, where) -> None:
    """transformers asks on stdin before running a folder's `auto_map` code when trust_remote_code is
    left at None; the engine passes False, so nothing asks and a piped "y" runs nothing."""
    import subprocess
    import sys

    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Thing: pass\n")
    config = json.loads((Path(__file__).parent / "fixtures" / "meta-llama__Llama-3.2-3B.config.json").read_text())
    if where == "config":
        config.update(auto_map={"AutoConfig": "evil.Thing"}, model_type="evil")  # only the folder's code knows it
    else:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"auto_map": {"AutoTokenizer": ["evil.Thing", None]}, "tokenizer_class": "Thing"})
        )
    (folder / "config.json").write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-m", "lora_core", "advise", "--model", str(folder), "--dataset", "reverse_list", "--json"],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert not marker.exists()
    assert "custom code" not in out.stdout and "[y/N]" not in out.stdout
    assert out.returncode in (0, 2) and "Traceback" not in out.stderr
    if out.returncode == 0:
        json.loads(out.stdout)


# --- found by a hostile test -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["meta-llama/Llama-2-7b-hf", "facebook/opt-1.3b", "openai-community/gpt2-medium"])
@pytest.mark.parametrize("gpu", [8.0, 16.0, 24.0, 40.0])
def test_micro_batch_times_accumulation_is_exactly_the_effective_batch(model, gpu) -> None:
    advice = advise(
        Case(model, examples=5000, completion_tokens=300.0, prompt_tokens=200.0, gpu_gib=gpu, priority="speed")
    )
    if advice.fits:
        assert advice.training.effective_batch == EVIDENCE.number("app-batch", "effective_batch")


def test_the_sequence_never_exceeds_the_models_context() -> None:
    with pytest.raises(AdviceError, match="longer than openai-community/gpt2's context of 1,024"):
        advise(Case("openai-community/gpt2", examples=10, seq_len=4096))
    long = advise(Case("openai-community/gpt2", examples=10, completion_tokens=5000.0))
    assert long.training.seq_len == 1024 and any("context" in warning for warning in long.warnings)
    _check_provenance(long)


def test_a_measured_sequence_length_says_so() -> None:
    advice = advise(Case("openai-community/gpt2", examples=10, seq_len=83, seq_len_share=0.95))
    assert "measured: 95% of the dataset's examples fit" in advice.choice("seq_len").rule
    assert "as given" in advise(Case("openai-community/gpt2", examples=10, seq_len=83)).choice("seq_len").rule
    _check_provenance(advice)


def test_a_model_that_is_not_a_causal_lm_is_warned_about() -> None:
    assert any("not a causal language model" in w for w in advise(Case("google-bert/bert-base-uncased")).warnings)
    assert not advise(Case("openai-community/gpt2")).warnings


def test_the_rank_never_exceeds_the_narrowest_adapted_layer() -> None:
    advice = advise(Case("HuggingFaceTB/SmolLM2-135M", examples=10**8, completion_tokens=1000.0))
    widths = advice.count.modules[["in_features", "out_features"]].min(axis=1)
    assert advice.settings.r <= widths.min() < 256  # k_proj / v_proj are 192 wide


# --- the app's own evidence: the dropout study ---------------------------------------------------------


def test_the_dropout_studys_cells_in_the_file_are_what_the_study_computes() -> None:
    """The file holds the Dropout page's default study as numbers; recomputed on this CPU it must
    agree: the study is seeded and was bit-identical across runs and thread counts, and its closest
    decisions (best rate, `clear`) sit more than 1e-4 relative from flipping."""
    from lora_core.dropout_study import study_summary

    summary = study_summary()
    study = EVIDENCE["app-dropout-study"]
    assert EVIDENCE.number("app-dropout-study", "d") == summary["study"]["d"]
    assert list(EVIDENCE.number("app-dropout-study", "ranks")) == summary["study"]["ranks"]
    assert list(EVIDENCE.number("app-dropout-study", "samples")) == summary["study"]["samples"]
    assert len(study.cells) == len(summary["cells"])
    for stored, computed in zip(study.cells, summary["cells"], strict=True):
        for key in ("rank", "samples", "best_rate", "wins", "clear"):
            assert stored[key] == computed[key], (key, stored, computed)
        for key in ("loss_at_0", "loss_at_best", "gain", "seed_spread"):
            assert stored[key] == pytest.approx(computed[key], rel=1e-3, abs=1e-6), (key, stored, computed)


def test_dropout_follows_the_studys_regime() -> None:
    """Few completion tokens per trainable parameter (the capacity rule's small datasets) is the
    study's regime where dropout helped; many tokens per parameter is where it did not."""
    few = advise(Case("meta-llama/Llama-2-7b-hf", examples=500, completion_tokens=100.0, priority="speed"))
    assert few.settings.lora_dropout > 0 and "gained from dropout beyond seed noise" in few.choice("lora_dropout").rule
    many = advise(Case("openai-community/gpt2", examples=10**9, completion_tokens=500.0))
    assert many.settings.lora_dropout == 0 and "train without dropout" in many.choice("lora_dropout").rule
    moe = advise(Case("mistralai/Mixtral-8x7B-v0.1", examples=500, completion_tokens=100.0))
    assert moe.settings.lora_dropout == 0 and "PEFT refuses dropout" in moe.choice("lora_dropout").rule
    for advice in (few, many, moe):
        _check_provenance(advice)


# --- found by review ---------------------------------------------------------------------------


def test_a_measured_length_beyond_the_context_is_cut_not_refused() -> None:
    advice = advise(Case("facebook/opt-125m", examples=100, seq_len=3083, seq_len_share=0.95))
    assert advice.training.seq_len == 2048 and any("truncate" in w for w in advice.warnings)
    _check_provenance(advice)


def test_the_article_is_not_quoted_for_a_scenario_it_does_not_have() -> None:
    advice = advise(Case("meta-llama/Llama-3.2-1B", task="preference", examples=1000))
    assert "in its scenario" not in advice.choice("r").article
    assert "in its scenario" not in advice.choice("lora_dropout").article
    assert advice.choice("targets").article.startswith("nothing for preference tuning")
    assert "in its scenario" in advise(Case("meta-llama/Llama-3.2-1B", examples=1000)).choice("r").article


def test_equally_near_measured_models_that_disagree_are_named_and_the_lower_rate_taken() -> None:
    advice = advise(Case("mistralai/Mistral-7B-v0.1", examples=1000))  # 7.2B: Llama-3.1-8B and Qwen3-8B tie
    assert advice.training.learning_rate == 3e-4
    assert "Equally near models disagree (Qwen/Qwen3-8B 1e-3" in advice.choice("learning_rate").rule
    _check_provenance(advice)


def test_advise_takes_the_embedded_model_by_its_name_and_measures_with_its_tokenizer(capsys) -> None:
    code, out, err = _advise(capsys, "--model", "embedded", "--dataset", "reverse_list", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "HuggingFaceTB/SmolLM2-135M"  # the embedded Instruct model's config
    assert data["case"]["seq_len_share"] == 0.95 and data["case"]["examples"] > 1000


def test_an_80b_moe_gets_its_familys_rate_no_dropout_on_fused_experts_and_an_honest_does_not_fit() -> None:
    model = str(Path(__file__).parent / "fixtures" / "Qwen__Qwen3-Next-80B-A3B.config.json")
    advice = advise(Case(model, examples=50_000, completion_tokens=400.0, prompt_tokens=200.0, gpu_gib=80.0))
    assert 75e9 < advice.count.all_params - advice.count.trainable_params < 85e9
    assert advice.training.learning_rate == 1e-3 and "Qwen/Qwen3-30B-A3B" in advice.choice("learning_rate").rule
    assert advice.settings.lora_dropout == 0 and "PEFT refuses dropout" in advice.choice("lora_dropout").rule
    assert not advice.fits and "it fits none of the common GPU sizes" in advice.choice("memory").rule
    _check_provenance(advice)


def test_an_moe_that_fits_no_gpu_with_its_experts_adapted_is_offered_them_frozen() -> None:
    adapted = advise(Case("mistralai/Mixtral-8x7B-v0.1", examples=50_000, completion_tokens=400.0, gpu_gib=141.0))
    assert adapted.choice("targets").value == "All linear" and adapted.fits
    frozen = advise(Case("mistralai/Mixtral-8x7B-v0.1", examples=50_000, completion_tokens=400.0, gpu_gib=90.0))
    assert frozen.fits and frozen.choice("targets").value == "All attention"
    assert "Experts frozen" in frozen.choice("targets").rule and "shard the model" in frozen.choice("targets").rule
    assert frozen.count.trainable_params < adapted.count.trainable_params
    _check_provenance(frozen)
    # frozen fused experts still stay bf16 under bitsandbytes: an 80B MoE fits no 80 GiB GPU either way
    model = str(Path(__file__).parent / "fixtures" / "Qwen__Qwen3-Next-80B-A3B.config.json")
    assert advise(Case(model, examples=50_000, gpu_gib=80.0)).choice("targets").value == "All linear"
