"""The advisor: a LoRA config for a model, a dataset and a GPU, with the evidence for each choice.

`advise(case)` returns an `Advice`: the settings and training setup, the exact trainable count and
the memory estimate from the engine, and one `Choice` per decision with its rule, the claims it
stands on (ids in `evidence.toml`), how far the user's case lies from those claims' conditions,
and the alternatives. Every number in the text is a `Figure` whose origin is a claim's number, the
engine, or the user's input, so a test can check that nothing shown is made up here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from lora_core.advisor.evidence import TASKS, Claim, Evidence, load_evidence
from lora_core.counting import CountResult, count_lora_params
from lora_core.errors import InputError, is_int, is_number, short_repr
from lora_core.memory import GIB, GPUS_GIB, MAX_SEQ_LEN, MemoryEstimate, TrainSetup, estimate_memory, largest_fitting
from lora_core.models import Inventory, as_inventory
from lora_core.settings import LoraSettings, LoraSettingsError
from lora_core.strategies import STRATEGIES, StrategyError, resolve_strategy

PRIORITIES = {"quality": "the best result", "speed": "the shortest run", "memory": "the smallest GPU footprint"}
MAX_EXAMPLES = 10**10
MAX_TOKENS_PER_EXAMPLE = MAX_SEQ_LEN
MIN_GPU_GIB, MAX_GPU_GIB = 1e-3, 4096.0
NOTABLE_RATIO = 1.5  # a case this close to a claim's conditions is called "as measured"
SEQ_ROUNDING = 64  # sequences are padded to a multiple of this (tensor-core friendly, and what tokenizers pad to)


class AdviceError(InputError):
    """A case the advisor cannot take; the message says which field and what to give."""


@dataclass(frozen=True)
class Case:
    """What the user gives: the model (catalogue id, Hub id, folder, or an `Inventory`), the task
    kind (a key of TASKS), the dataset's size in examples and its mean completion (and prompt)
    tokens per example, the GPU's memory in GiB, and what matters most (a key of PRIORITIES).
    `seq_len` overrides the sequence length derived from the token counts; `seq_len_share` says it was
    measured as the length that share of the examples fit in."""

    model: str | Inventory
    task: str = "sft"
    examples: int = 1000
    completion_tokens: float = 256.0
    prompt_tokens: float = 0.0
    gpu_gib: float = 24.0
    priority: str = "quality"
    seq_len: int | None = None
    seq_len_share: float | None = None  # when seq_len was measured: the share of examples that fit in it

    def problems(self) -> list[str]:
        found = []
        if self.task not in TASKS:
            found.append(f"`task` must be one of {', '.join(TASKS)}, got {short_repr(self.task)}")
        if self.priority not in PRIORITIES:
            found.append(f"`priority` must be one of {', '.join(PRIORITIES)}, got {short_repr(self.priority)}")
        if not (is_int(self.examples) and 1 <= self.examples <= MAX_EXAMPLES):
            found.append(
                f"`examples` must be a whole number from 1 to {MAX_EXAMPLES:,}, got {short_repr(self.examples)}"
            )
        for name, low in (("completion_tokens", 1.0), ("prompt_tokens", 0.0)):
            value = getattr(self, name)
            if not (is_number(value) and low <= value <= MAX_TOKENS_PER_EXAMPLE):
                found.append(
                    f"`{name}` must be a number from {low:g} to {MAX_TOKENS_PER_EXAMPLE:,}, got {short_repr(value)}"
                )
        if not (is_number(self.gpu_gib) and MIN_GPU_GIB <= self.gpu_gib <= MAX_GPU_GIB):
            found.append(
                f"`gpu_gib` must be a number of GiB from {MIN_GPU_GIB:g} to {MAX_GPU_GIB:g}, got {short_repr(self.gpu_gib)}"
            )
        if self.seq_len is not None and not (is_int(self.seq_len) and 1 <= self.seq_len <= MAX_SEQ_LEN):
            found.append(f"`seq_len` must be a whole number from 1 to {MAX_SEQ_LEN:,}, got {short_repr(self.seq_len)}")
        return found


@dataclass(frozen=True)
class Figure:
    """A number as shown (`text`), its value, and where it comes from: "claim:<id>:<key>",
    "table:<id>:<model>" (a row of a claim's table), "scope:<id>:<key>", "engine:<what>" or
    "input:<field>"."""

    text: str
    value: float
    origin: str


@dataclass(frozen=True)
class Alternative:
    value: str
    when: str
    claims: tuple[str, ...]


@dataclass(frozen=True)
class Choice:
    """One decision: `name` (a LoRA or training field), the `value` shown, the `rule` that chose
    it, the `claims` it stands on, `distance` (how the user's case compares with each claim's
    conditions), the `alternatives`, and what the article says (`article`, empty when nothing)."""

    name: str
    value: str
    rule: str
    claims: tuple[str, ...]
    distance: tuple[str, ...]
    alternatives: tuple[Alternative, ...]
    article: str = ""  # what the article this app follows says about this choice, next to the evidence


@dataclass(frozen=True)
class Training:
    learning_rate: float
    epochs: int
    micro_batch: int
    grad_accumulation: int
    seq_len: int
    steps: int

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accumulation


@dataclass(frozen=True)
class Advice:
    case: Case
    model_id: str
    settings: LoraSettings
    training: Training
    setup: TrainSetup
    count: CountResult
    estimate: MemoryEstimate
    fits: bool
    choices: tuple[Choice, ...]
    figures: tuple[Figure, ...]
    warnings: tuple[str, ...] = ()

    def choice(self, name: str) -> Choice:
        return next(choice for choice in self.choices if choice.name == name)

    def claims_used(self) -> list[str]:
        seen: dict[str, None] = {}
        for choice in self.choices:
            seen.update(dict.fromkeys(choice.claims))
            for alternative in choice.alternatives:
                seen.update(dict.fromkeys(alternative.claims))
        return list(seen)

    def shown_text(self) -> list[str]:
        """Every sentence the page and the CLI show."""
        texts = [*self.warnings]
        for choice in self.choices:
            texts += [choice.value, choice.rule, choice.article, *choice.distance]
            texts += [text for alt in choice.alternatives for text in (alt.value, alt.when)]
        return texts

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "case": {k: v for k, v in self.case.__dict__.items() if k != "model"},
            "config": self.settings.to_peft_dict(),
            "training": {**self.training.__dict__, "effective_batch": self.training.effective_batch},
            "setup": self.setup.__dict__,
            "trainable_params": self.count.trainable_params,
            "all_params": self.count.all_params,
            "memory": {
                "required_gib": round(self.estimate.required_bytes / GIB, 3),
                "gpu_gib": self.case.gpu_gib,
                "fits": self.fits,
            },
            "choices": {
                c.name: {
                    "value": c.value,
                    "rule": c.rule,
                    "claims": list(c.claims),
                    "distance": list(c.distance),
                    "article": c.article,
                    "alternatives": [a.__dict__ | {"claims": list(a.claims)} for a in c.alternatives],
                }
                for c in self.choices
            },
            "claims": self.claims_used(),
            "warnings": list(self.warnings),
        }


def show(value: float) -> str:
    """How the advisor writes a number: whole numbers with thousands separators, learning rates
    as 3e-4, everything else with up to 3 significant digits."""
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


@dataclass
class _Ledger:
    """The figures behind the text being written: every number goes through here."""

    evidence: Evidence
    figures: list[Figure] = field(default_factory=list)

    def _add(self, value: float, origin: str, text: str | None = None) -> str:
        text = text if text is not None else show(value)
        self.figures.append(Figure(text, float(value), origin))
        return text

    def claim(self, claim_id: str, key: str) -> str:
        value = self.evidence.number(claim_id, key)
        if isinstance(value, tuple):
            raise TypeError(f"{claim_id}.{key} is a list; use claim_list")
        return self._add(value, f"claim:{claim_id}:{key}")

    def claim_value(self, claim_id: str, key: str) -> float:
        value = self.evidence.number(claim_id, key)
        assert not isinstance(value, tuple)
        return float(value)

    def claim_list(self, claim_id: str, key: str) -> tuple[float, ...]:
        value = self.evidence.number(claim_id, key)
        return tuple(float(v) for v in (value if isinstance(value, tuple) else (value,)))

    def listed(self, claim_id: str, key: str, value: float) -> str:
        """A member of a claim's list (a rung of the rank ladder)."""
        assert value in self.claim_list(claim_id, key)
        return self._add(value, f"claim:{claim_id}:{key}")

    def cell(self, claim_id: str, cell: dict[str, Any], key: str) -> str:
        """A number of one cell of a claim's `cells` table."""
        return self._add(cell[key], f"cell:{claim_id}:{cell['rank']}:{cell['samples']}:{key}")

    def cell_percent(self, claim_id: str, cell: dict[str, Any], key: str) -> str:
        """A fraction in one cell of a claim's `cells` table, shown as a percentage."""
        value = 100 * cell[key]
        return self._add(value, f"cellpct:{claim_id}:{cell['rank']}:{cell['samples']}:{key}", f"{value:.3g}")

    def table(self, claim_id: str, row: dict[str, Any], key: str) -> str:
        return self._add(row[key], f"table:{claim_id}:{row['model']}:{key}")

    def scope(self, claim_id: str, key: str, value: float) -> str:
        return self._add(value, f"scope:{claim_id}:{key}")

    def engine(self, value: float, what: str, text: str | None = None) -> str:
        return self._add(value, f"engine:{what}", text)

    def given(self, value: float, name: str) -> str:
        return self._add(value, f"input:{name}")


def advise(case: Case, evidence: Evidence | None = None) -> Advice:
    """The recommended config for `case`. Raises `AdviceError` for a bad case and the engine's
    own errors for a model it cannot resolve."""
    problems = case.problems()
    if problems:
        raise AdviceError("; ".join(problems))
    ev = evidence if evidence is not None else load_evidence()
    inv = as_inventory(case.model)
    advice = _recommend(inv, case, ev, STRATEGY_ORDER)
    if not advice.fits and inv.facts.get("experts"):
        # an MoE whose adapted experts fit no GPU here: freezing them is the change that may fit one
        frozen = _recommend(inv, case, ev, ("All attention",), instead_of=advice)
        if frozen.fits:
            return frozen
    return advice


# The widest target strategy that maps onto a model comes first.
STRATEGY_ORDER = ("All linear", "FFN only", "All attention", "Q,V")


def _recommend(
    inv: Inventory, case: Case, ev: Evidence, strategies: tuple[str, ...], instead_of: Advice | None = None
) -> Advice:
    """The advice with the first of `strategies` that maps onto the model; `instead_of` is the
    advice it replaces (an MoE with its experts adapted that fits no GPU here)."""
    book = _Ledger(ev)
    params_b = inv.total_params / 1e9
    warnings: list[str] = []

    targets, settings = _targets(inv, case, book, strategies, instead_of)
    rank, r = _rank(inv, settings, case, book, warnings)
    settings = settings.replace(r=r)
    alpha, settings = _alpha(settings, case, book)
    rslora = _rslora(settings, book)
    trainable = count_lora_params(inv, settings).trainable_params
    dropout, settings = _dropout(inv, settings, case, params_b, trainable, book)
    lr_choice, lr = _learning_rate(inv, params_b, case, book)
    seq_len, seq_choice = _seq_len(inv, case, book, warnings)
    epochs_choice, epochs = _epochs(case, book)
    count = count_lora_params(inv, settings)
    fit_choice, estimate, accumulation, fits = _fit(inv, settings, count, seq_len, case, book)
    setup, micro = estimate.setup, estimate.setup.batch_size
    steps = max(1, math.ceil(case.examples * epochs / (micro * accumulation)))
    method = _method(book)
    decided = (targets, rank, alpha, rslora, dropout, lr_choice, epochs_choice, seq_choice, fit_choice, method)
    choices = tuple(
        replace(
            c,
            distance=_distances(c.claims, book, case, params_b),
            alternatives=tuple(a for a in c.alternatives if a.value not in (c.value, f"r={c.value}")),
        )
        for c in decided
    )
    if not _causal_lm(inv):
        warnings.append(
            f"{inv.spec.model_id} is not a causal language model ({inv.model_class}): the evidence here was measured "
            "on decoder LMs fine-tuned to generate, and Verify can only train causal LMs."
        )
    if case.task == "domain":
        warnings.append(
            "Continued pretraining is where LoRA falls furthest behind full fine-tuning (bid-underperform): "
            "verify before a long run."
        )
    training = Training(lr, epochs, micro, accumulation, seq_len, steps)
    return Advice(
        case,
        inv.spec.model_id,
        settings,
        training,
        setup,
        count,
        estimate,
        fits,
        choices,
        tuple(book.figures),
        tuple(warnings),
    )


def _targets(
    inv: Inventory, case: Case, book: _Ledger, strategies: tuple[str, ...], instead_of: Advice | None
) -> tuple[Choice, LoraSettings]:
    chosen = None
    for strategy in strategies:
        try:
            chosen = resolve_strategy(inv, strategy)
            break
        except StrategyError:
            continue
    if chosen is None:
        raise AdviceError(f"{inv.spec.model_id} has no layers LoRA can adapt: none of {', '.join(STRATEGIES)} maps")
    settings = chosen.apply(LoraSettings())
    mlp, qv = book.claim("peft-lora-mlp-r10", "accuracy_pct"), book.claim("peft-lora-qv-r32", "accuracy_pct")
    rule = (
        "Adapt every linear layer, the MLP included: LoRA on all layers beats attention-only even at a "
        f"matched parameter count, and in PEFT's benchmark MLP-only LoRA scored {mlp}% against {qv}% for q,v "
        "with about the same parameters."
    )
    if chosen.strategy != "All linear" and instead_of is None:
        rule = f"This model has no layers for 'All linear'; {chosen.strategy} is the widest strategy that maps."
    if instead_of is not None:
        need = instead_of.estimate.required_bytes / GIB
        rule = (
            f"Experts frozen, attention adapted: with its experts adapted this MoE needs "
            f"{book.engine(need, 'estimated GiB with experts adapted', f'{need:.1f}')} GiB even with QLoRA, more "
            f"than your {book.given(case.gpu_gib, 'gpu_gib')} GiB, and freezing them is the change that fits. It "
            "goes against the evidence that LoRA on the MLP and MoE layers matters most: to keep them adapted, "
            "shard the model over several GPUs."
        )
    alternatives = (
        Alternative(
            "FFN only", "the same evidence, fewer parameters: when the adapter must stay small", ("peft-lora-mlp-r10",)
        ),
        Alternative(
            "Q,V",
            "the article's and PEFT's default: the weakest in the benchmark",
            ("peft-lora-qv-r32", "article-scenarios"),
        ),
    )
    article: str | None = {
        "classification": "q_proj and v_proj for classification on little data",
        "domain": "all linear layers for domain adaptation",
        "sft": "the four attention projections for instruction tuning",
    }.get(case.task)
    article = (
        f"{article}, in its scenarios; its own comparison counts parameters but measures no quality."
        if article
        else "nothing for preference tuning; its own comparison of targets counts parameters but measures no quality."
    )
    claims = ("tm-all-layers", "peft-lora-mlp-r10", "peft-lora-qv-r32", "bid-lr-alpha", "article-scenarios")
    return Choice("targets", chosen.strategy, rule, claims, (), alternatives, article), settings


def _rank(inv: Inventory, settings: LoraSettings, case: Case, book: _Ledger, warnings: list[str]) -> tuple[Choice, int]:
    ladder = [int(r) for r in book.claim_list("app-rank-ladder", "ladder")]
    # a rank above a layer's narrower side adds parameters but no capacity to that layer
    narrowest = _narrowest_adapted(inv, settings, ladder[0])
    ladder = [r for r in ladder if r <= narrowest] or ladder[:1]
    tokens = case.examples * case.completion_tokens
    per_token = book.claim_value("tm-capacity", "params_per_completion_token")
    counts = {r: count_lora_params(inv, settings.replace(r=r)).trainable_params for r in ladder}
    claims: tuple[str, ...]
    if case.task == "preference":
        index = 0
        rule = (
            f"Preference and RL tuning gives the adapter little to store: policy-gradient RL matched full "
            f"fine-tuning at rank {book.claim('tm-rl-rank1', 'rank')}; the lowest rung of the ladder, "
            f"r={book.listed('app-rank-ladder', 'ladder', ladder[0])}, leaves room."
        )
        claims = ("tm-rl-rank1", "app-rank-ladder")
    else:
        needed = tokens * per_token
        index = next((i for i, r in enumerate(ladder) if counts[r] >= needed), len(ladder) - 1)
        enough = counts[ladder[index]] >= needed
        rule = (
            f"Capacity: the dataset has about {book.engine(tokens, 'completion tokens = examples x tokens')} completion "
            f"tokens, and LoRA learns well while its parameters are at least "
            f"{book.claim('tm-capacity', 'params_per_completion_token')} per completion token; "
            f"r={book.listed('app-rank-ladder', 'ladder', ladder[index])} gives "
            f"{book.engine(counts[ladder[index]], 'trainable parameters at this rank')} trainable parameters"
            + ("." if enough else ", the most the ladder offers.")
        )
        claims = ("tm-capacity", "app-rank-ladder", "tm-sweep-rank-lr")
        if not enough:
            warnings.append(
                "The dataset exceeds this adapter's capacity even at the top rung: LoRA will learn less per step "
                "than full fine-tuning would (tm-capacity, bid-underperform)."
            )
    if case.priority == "quality" and index + 1 < len(ladder):
        index += 1
        rule += f" Quality first: one rung up, r={book.listed('app-rank-ladder', 'ladder', ladder[index])}."
    r = ladder[index]
    alternatives = [
        Alternative(
            f"r={book.listed('app-rank-ladder', 'ladder', ladder[max(index - 1, 0)])}",
            f"when the Verify experiment shows no gain: from rank 1 to 64 the cookbook's NLL moved from "
            f"{book.claim('tm-sweep-rank-lr', 'nll_r1')} to {book.claim('tm-sweep-rank-lr', 'nll_r64')}",
            ("tm-sweep-rank-lr",),
        ),
    ]
    scenario = _SCENARIO.get(case.task)
    article = (
        (f"r={book.claim('article-scenarios', scenario + '_r')} in its scenario for this task; " if scenario else "")
        + "its bands "
        f"put most tasks at {book.claim('article-rank-bands', 'sweet_low')}-"
        f"{book.claim('article-rank-bands', 'sweet_high')}, complex ones at "
        f"{book.claim('article-rank-bands', 'complex_low')}-{book.claim('article-rank-bands', 'complex_high')}, "
        "without an experiment behind them; the rule above scales with the data instead."
    )
    claims += ("article-scenarios", "article-rank-bands")
    return Choice("r", str(r), rule, claims, (), tuple(alternatives), article), r


def _refuses_dropout(inv: Inventory, settings: LoraSettings) -> bool:
    """Whether PEFT refuses these settings' dropout (it does on fused MoE expert parameters)."""
    try:
        count_lora_params(inv, settings)
    except LoraSettingsError:
        return True
    return False


def _narrowest_adapted(inv: Inventory, settings: LoraSettings, floor: int) -> int:
    """The smallest min(in, out) over the modules `settings` adapts, leaving out those narrower than
    `floor` or as narrow (an MoE router, one output per expert), which caps its own rank."""
    modules = count_lora_params(inv, settings.replace(r=1)).modules
    widths = [int(w) for w in modules[["in_features", "out_features"]].min(axis=1)] if len(modules) else []
    return min((w for w in widths if w > floor), default=1)


# The article's scenario (its get_lora_config) for each task; it has none for preference tuning.
_SCENARIO = {"sft": "instruction", "domain": "domain", "classification": "classification"}


def _alpha(settings: LoraSettings, case: Case, book: _Ledger) -> tuple[Choice, LoraSettings]:
    alpha = book.claim_value("tm-lr-table", "lora_alpha")
    rule = (
        f"alpha={book.claim('tm-lr-table', 'lora_alpha')}, fixed across ranks: the learning rates measured by the "
        "cookbook use it, and with alpha fixed (scale alpha/r) the best learning rate barely moves with rank."
    )
    ratio = book.claim("bid-lr-alpha", "alpha_over_r")
    alternatives = (
        Alternative(
            f"alpha = {ratio} x r",
            "Biderman et al.'s and the article's choice: a larger scale at every rank, so re-tune the learning rate",
            ("bid-lr-alpha", "article-scenarios"),
        ),
    )
    article = (
        f"alpha = {book.claim('article-scenarios', 'alpha_over_r')} x r in every scenario (scale "
        f"{book.claim('article-scenarios', 'alpha_over_r')} at every rank), with the claim that alpha/r spares "
        "re-tuning the learning rate; the cookbook's sweep instead fixes alpha and finds the best rate barely moves."
    )
    claims = ("tm-lr-table", "tm-sweep-rank-lr", "article-scenarios")
    return Choice("lora_alpha", show(alpha), rule, claims, (), alternatives, article), settings.replace(
        lora_alpha=alpha
    )


def _rslora(settings: LoraSettings, book: _Ledger) -> Choice:
    rule = (
        "Off: the learning rates recommended here were measured with the alpha/r scale; rsLoRA's alpha/sqrt(r) "
        "changes the scale by a factor of sqrt(r)."
    )
    alternatives = (
        Alternative("on", "at high ranks with a re-tuned learning rate: it keeps higher ranks learning", ("rslora",)),
    )
    return Choice("use_rslora", "off", rule, ("tm-lr-table", "rslora"), (), alternatives)


def _dropout(
    inv: Inventory, settings: LoraSettings, case: Case, params_b: float, trainable: int, book: _Ledger
) -> tuple[Choice, LoraSettings]:
    """Dropout where this app's study found it helps: the study's cells nearest to the case in target
    values per trainable parameter (completion tokens here; a regression's outputs there) decide; the
    rate is QLoRA's for the nearest model size, the only rates measured on LLMs."""
    study = book.evidence["app-dropout-study"]
    d = book.claim_value("app-dropout-study", "d")
    ratio = case.examples * case.completion_tokens / max(trainable, 1)

    def cell_ratio(cell: dict[str, Any]) -> float:  # n samples x d outputs over r x (d + d) parameters
        return cell["samples"] * d / (cell["rank"] * 2 * d)

    distance = {id(c): abs(math.log(cell_ratio(c) / max(ratio, 1e-12))) for c in study.cells}
    nearest = [c for c in study.cells if distance[id(c)] == min(distance.values())]
    clear = [c for c in nearest if c["clear"]]
    top = max(nearest, key=lambda c: c["gain"])
    ours = book.engine(ratio, "completion tokens per trainable parameter", _ratio(ratio))
    theirs = book.engine(cell_ratio(nearest[0]), "study cell: targets per parameter", _ratio(cell_ratio(nearest[0])))
    cells = ", ".join(f"r={book.cell(study.id, c, 'rank')} n={book.cell(study.id, c, 'samples')}" for c in nearest)
    gain = book.cell_percent(study.id, top, "gain")
    size, qlora, qlora_rate = _qlora_row(params_b, book, "dropout_by_size")
    benchmarks = Alternative(
        book.claim("no-dropout-benchmarks", "dropout"),
        "what PEFT's benchmark and Tinker train with (no comparison with other rates)",
        ("no-dropout-benchmarks",),
    )
    situation = (
        f"this case has {ours} completion tokens per trainable parameter; in this app's dropout study the nearest "
        f"regime ({theirs} target values per parameter: {cells}) gained from dropout beyond seed noise in "
        f"{book.engine(len(clear), 'clear cells')} of {book.engine(len(nearest), 'nearest cells')} cells "
        f"(by up to {gain}%)"
    )
    helps = len(clear) * 2 > len(nearest)
    alternatives: tuple[Alternative, ...]
    if helps and _refuses_dropout(inv, settings.replace(lora_dropout=qlora_rate)):
        dropout = book.claim_value("no-dropout-benchmarks", "dropout")
        rule = (
            f"{book.claim('no-dropout-benchmarks', 'dropout')}: PEFT refuses dropout on the fused expert parameters "
            f"this config adapts, although {situation}."
        )
        alternatives = ()
    elif helps:
        dropout = qlora_rate
        low = book.cell(study.id, min(clear, key=lambda c: c["best_rate"]), "best_rate")
        high = book.cell(study.id, max(clear, key=lambda c: c["best_rate"]), "best_rate")
        rates = f"{low}" if low == high else f"{low} to {high}"
        rule = (
            f"{qlora}: {situation}; the rate is QLoRA's for the {size}B model, the nearest size it trained "
            f"(the study's best rate there: {rates})."
        )
        alternatives = (benchmarks,)
    else:
        dropout = book.claim_value("no-dropout-benchmarks", "dropout")
        rule = (
            f"{book.claim('no-dropout-benchmarks', 'dropout')}: {situation}, and the measured LLM setups (PEFT's "
            "benchmark, Tinker) train without dropout."
        )
        alternatives = (
            Alternative(
                qlora, f"QLoRA's released script for the {size}B model, the nearest size it trained", ("qlora-scripts",)
            ),
        )
    scenario = _SCENARIO.get(case.task)
    article = (
        (
            f"{book.claim('article-scenarios', scenario + '_dropout')} in its scenario for this task, and "
            if scenario
            else ""
        )
        + f"{book.claim('article-dropout', 'low')}-{book.claim('article-dropout', 'high')} for small datasets, without "
        "an experiment; its formula drops A x, while PEFT drops the layer's input x."
    )
    claims = ("app-dropout-study", "qlora-scripts", "no-dropout-benchmarks", "article-dropout", "article-scenarios")
    choice = Choice("lora_dropout", show(dropout), rule, claims, (), alternatives, article)
    return choice, settings.replace(lora_dropout=dropout)


def _learning_rate(inv: Inventory, params_b: float, case: Case, book: _Ledger) -> tuple[Choice, float]:
    claim = book.evidence["tm-lr-table"]
    rows, exact = _nearest_rows(claim, inv, params_b)
    row = rows[0]
    lr = float(row["lr"])
    lr_text = book.table("tm-lr-table", row, "lr")
    if exact:
        rule = f"{lr_text}: the cookbook's best LoRA learning rate for {row['model']}, from its sweep."
    else:
        rule = (
            f"{lr_text}: the cookbook's best LoRA learning rate for {row['model']} "
            f"({book.table('tm-lr-table', row, 'params_b')}B parameters), the nearest model it measured to this one "
            f"({book.engine(params_b, 'model parameters in billions', _ratio(params_b))}B); the cookbook itself "
            "refuses to extrapolate, so verify it."
        )
        others = [other for other in rows[1:] if other["lr"] != row["lr"]]
        if others:
            listed = ", ".join(f"{other['model']} {book.table('tm-lr-table', other, 'lr')}" for other in others)
            rule += f" Equally near models disagree ({listed}): the lowest rate is taken."
    rule += (
        f" Full fine-tuning's best rate is about a {book.claim('tm-lr-factor-code', 'lora_over_full_lr')}th of LoRA's "
        f"in the cookbook's code; older docs said {book.claim('tm-lr-factor-text', 'old_docs_low')}-"
        f"{book.claim('tm-lr-factor-text', 'old_docs_high')}x."
    )
    size, qlora_lr, _ = _qlora_row(params_b, book, "lr_by_size")
    factor = book.claim_value("tm-lr-factor-text", "short_run_factor") / book.claim_value(
        "tm-lr-factor-text", "lora_over_full_lr"
    )
    alternatives = (
        Alternative(
            qlora_lr,
            f"QLoRA's script for the {size}B model, the nearest size it trained (constant schedule, alpha "
            f"{book.claim('qlora-scripts', 'lora_alpha')} at r={book.claim('qlora-scripts', 'r')})",
            ("qlora-scripts",),
        ),
        Alternative(
            book.engine(lr * factor, "learning rate x short-run factor / usual factor"),
            f"for runs under {book.claim('tm-lr-factor-text', 'short_run_steps')} steps, where the text puts the "
            f"factor at {book.claim('tm-lr-factor-text', 'short_run_factor')}x instead of "
            f"{book.claim('tm-lr-factor-text', 'lora_over_full_lr')}x",
            ("tm-lr-factor-text",),
        ),
    )
    claims = ("tm-lr-table", "tm-lr-factor-code", "tm-lr-factor-text", "tm-sweep-rank-lr")
    return Choice("learning_rate", lr_text, rule, claims, (), alternatives), lr


def _qlora_row(params_b: float, book: _Ledger, key: str) -> tuple[str, str, float]:
    """The QLoRA script nearest in model size to `params_b`: its size and its `key` as shown,
    and that value."""
    sizes = book.claim_list("qlora-scripts", "sizes_b")
    index = min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i] / max(params_b, 1e-3))))
    value = book.claim_list("qlora-scripts", key)[index]
    return book.listed("qlora-scripts", "sizes_b", sizes[index]), book.listed("qlora-scripts", key, value), value


# model_type -> the cookbook table's family, so a model's nearest measured relative is preferred
_FAMILIES = {
    "llama": "llama",
    **dict.fromkeys(("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe"), "qwen"),
    "gpt_oss": "gpt_oss",
    **dict.fromkeys(("deepseek_v3", "deepseek_v32"), "deepseek"),
}


def _nearest_rows(claim: Claim, inv: Inventory, params_b: float) -> tuple[list[dict[str, Any]], bool]:
    """The table row for this model (exact id), else the rows nearest in size (the same family and
    dense/MoE kind first); several when they are equally near, lowest learning rate first."""
    model_id = inv.spec.model_id.lower()
    for row in claim.lr_by_model:
        if row["model"].lower() == model_id:
            return [row], True
    family = _FAMILIES.get(inv.model_type)
    moe = bool(inv.facts.get("experts"))
    rows = [row for row in claim.lr_by_model if row.get("family") == family] or list(claim.lr_by_model)
    same_kind = [row for row in rows if bool(row.get("moe")) == moe] or rows

    def distance(row: dict[str, Any]) -> float:
        return abs(math.log(row["params_b"] / max(params_b, 1e-3)))

    nearest = min(distance(row) for row in same_kind)
    tied = [row for row in same_kind if distance(row) <= nearest + 1e-9]
    return sorted(tied, key=lambda row: (row["lr"], row["model"])), False


def _seq_len(inv: Inventory, case: Case, book: _Ledger, warnings: list[str]) -> tuple[int, Choice]:
    context = context_length(inv)
    if case.seq_len is not None and case.seq_len_share is None:
        if context is not None and case.seq_len > context:
            raise AdviceError(
                f"`seq_len` {case.seq_len:,} is longer than {inv.spec.model_id}'s context of {context:,} tokens"
            )
        text = book.given(case.seq_len, "seq_len")
        return case.seq_len, Choice("seq_len", text, f"{text} tokens, as given.", ("app-batch",), (), ())
    if case.seq_len is not None and case.seq_len_share is not None:  # measured: the user typed nothing
        share = book.engine(100 * case.seq_len_share, "percent of examples that fit")
        measured = book.given(case.seq_len, "seq_len")
        if context is not None and case.seq_len > context:
            warnings.append(f"The dataset's long examples exceed {inv.spec.model_id}'s context: runs truncate them.")
            text = book.engine(context, "context length")
            rule = (
                f"{text}: the model's context; {share}% of the dataset's examples fit in {measured} tokens, "
                "so the longest are truncated."
            )
            return context, Choice("seq_len", text, rule, ("app-batch",), (), ())
        rule = f"{measured} tokens, measured: {share}% of the dataset's examples fit in it, the rest are truncated."
        return case.seq_len, Choice("seq_len", measured, rule, ("app-batch",), (), ())
    tokens = case.prompt_tokens + case.completion_tokens
    seq_len = min(MAX_SEQ_LEN, SEQ_ROUNDING * math.ceil(tokens / SEQ_ROUNDING))
    if context is not None and seq_len > context:
        seq_len = context
        warnings.append(f"Examples average more tokens than {inv.spec.model_id}'s context: runs truncate them to it.")
    text = book.engine(seq_len, "prompt + completion tokens, padded to a multiple of 64, within the context")
    rule = (
        f"{text}: the mean prompt ({book.given(case.prompt_tokens, 'prompt_tokens')}) and completion "
        f"({book.given(case.completion_tokens, 'completion_tokens')}) tokens, padded up to a multiple of "
        f"{book.engine(SEQ_ROUNDING, 'padding multiple')}"
        + (f", cut to the model's context of {book.engine(context, 'context length')}" if seq_len == context else "")
        + "; give the longest examples' length if they vary a lot."
    )
    return seq_len, Choice("seq_len", text, rule, ("app-batch",), (), ())


def _causal_lm(inv: Inventory) -> bool:
    from lora_core.training.config import is_causal_lm

    return is_causal_lm(inv.model_type, inv.spec.config.get("architectures") or [])


def context_length(inv: Inventory) -> int | None:
    """The model's longest sequence (max_position_embeddings, n_positions or n_ctx), None when its
    config names none (relative positions, as in T5)."""
    config = inv.spec.config
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = text.get(key, config.get(key))
        if is_int(value) and value > 0:
            return int(value)
    return None


def _epochs(case: Case, book: _Ledger) -> tuple[Choice, int]:
    small, medium = book.claim_value("app-epochs", "small_examples"), book.claim_value("app-epochs", "medium_examples")
    if case.examples < small:
        key, bound = "small_epochs", f"under {book.claim('app-epochs', 'small_examples')} examples"
    elif case.examples < medium:
        key, bound = "medium_epochs", f"under {book.claim('app-epochs', 'medium_examples')} examples"
    else:
        key, bound = "large_epochs", f"{book.claim('app-epochs', 'medium_examples')} examples or more"
    epochs = int(book.claim_value("app-epochs", key))
    text = book.claim("app-epochs", key)
    noun = "epoch" if epochs == 1 else "epochs"
    rule = f"{text} {noun} for {bound}: this app's convention, as no source measured it; check it by training."
    return Choice("epochs", text, rule, ("app-epochs",), (), ()), epochs


def _fit(
    inv: Inventory, settings: LoraSettings, count: CountResult, seq_len: int, case: Case, book: _Ledger
) -> tuple[Choice, MemoryEstimate, int, bool]:
    """The first setup, in the order of what it costs the run, where a micro-batch fits the GPU:
    bf16, then gradient checkpointing, then QLoRA (NF4) with checkpointing; with memory first,
    QLoRA with checkpointing at micro-batch 1 straight away. Returns the choice, the estimate of
    the setup chosen (the lightest tried when none fits), the gradient accumulation and whether
    it fits."""
    effective = int(book.claim_value("app-batch", "effective_batch"))
    base = TrainSetup(batch_size=1, seq_len=seq_len, dtype="bf16", device="cuda")
    ladder = [
        ("bf16", base),
        ("bf16 with gradient checkpointing", replace(base, gradient_checkpointing=True)),
        ("QLoRA (NF4) with gradient checkpointing", replace(base, quantization="nf4", gradient_checkpointing=True)),
    ]
    if case.priority == "memory":
        ladder = ladder[-1:]
    gpu = book.given(case.gpu_gib, "gpu_gib")
    tried: list[str] = []
    for label, setup in ladder:
        if case.priority == "memory":
            micro = 1
        else:
            fitting = largest_fitting(inv, settings, setup, case.gpu_gib, "batch_size", effective, count)
            # a divisor of the effective batch, so micro-batch x accumulation is exactly it
            micro = max((d for d in range(1, fitting + 1) if effective % d == 0), default=1)
        estimate = estimate_memory(inv, settings, replace(setup, batch_size=micro), count)
        need = estimate.required_bytes / GIB
        if estimate.fits(case.gpu_gib):
            accumulation = max(1, math.ceil(effective / micro))
            rule = (
                f"Fits on your {gpu} GiB GPU: {label}, micro-batch {book.engine(micro, 'largest micro-batch that fits')} x "
                f"{book.engine(accumulation, 'gradient accumulation')} accumulation steps = an effective batch of "
                f"{book.claim('app-batch', 'effective_batch')} (QLoRA's), estimated peak "
                f"{book.engine(need, 'estimated GiB', f'{need:.1f}')} GiB."
            )
            if tried:
                rule += " Nearest change that makes it fit: " + label + "; " + "; ".join(tried) + "."
            alternatives: tuple[Alternative, ...] = ()
            if label == "bf16":
                alternatives = (
                    Alternative(
                        "gradient checkpointing",
                        "a larger micro-batch, paid for by recomputing each layer's activations in backward",
                        ("app-batch",),
                    ),
                )
            claims = ("app-batch", "tm-batch-penalty") + (("qlora-scripts",) if "QLoRA" in label else ())
            value = f"{label}, micro-batch {show(micro)} x {show(accumulation)}"
            return Choice("memory", value, rule, claims, (), alternatives), estimate, accumulation, True
        tried.append(f"{label} at micro-batch 1 needs {book.engine(need, 'estimated GiB', f'{need:.1f}')} GiB")
    label = ladder[-1][0]
    smallest = next((gib for gib in GPUS_GIB if estimate.fits(gib)), None)  # the lightest: the last tried
    where = (
        f"the smallest common GPU it fits is {book.engine(smallest, 'smallest fitting GPU size')} GiB"
        if smallest
        else f"it fits none of the common GPU sizes up to {book.engine(GPUS_GIB[-1], 'largest GPU size')} GiB"
    )
    rule = f"Does not fit on your {gpu} GiB GPU even with {label} at micro-batch 1: " + "; ".join(tried) + f"; {where}."
    alternatives = (
        Alternative("several GPUs", "shard the model (FSDP, DeepSpeed ZeRO): not estimated here", ("app-batch",)),
    )
    choice = Choice("memory", "does not fit", rule, ("app-batch", "qlora-scripts"), (), alternatives)
    return choice, estimate, effective, False  # at micro-batch 1, the whole effective batch is accumulated


def _method(book: _Ledger) -> Choice:
    rule = (
        f"Vanilla LoRA: tuned for their learning rates, LoRA variants land within {book.claim('lr-matters', 'within_pct_low')}-"
        f"{book.claim('lr-matters', 'within_pct_high')}% of it; PEFT's one-seed DoRA gain "
        f"({book.claim('peft-dora-qv-r32', 'accuracy_pct')}% vs {book.claim('peft-lora-qv-r32', 'accuracy_pct')}%) is within noise."
    )
    alternatives = (
        Alternative(
            f"LoRA+ (ratio {book.claim('loraplus', 'ratio')})",
            f"B learns faster than A: {book.claim('loraplus', 'gain_low_pct')}-{book.claim('loraplus', 'gain_high_pct')}% "
            "better in its paper; cheap to try as an experiment's loraplus dimension",
            ("loraplus",),
        ),
        Alternative("DoRA, PiSSA", "only with their own learning-rate search", ("peft-dora-qv-r32", "lr-matters")),
    )
    return Choice("method", "LoRA", rule, ("lr-matters", "peft-dora-qv-r32"), (), alternatives)


def _distances(claims: Iterable[str], book: _Ledger, case: Case, params_b: float) -> tuple[str, ...]:
    """How far the case is from each claim's conditions: model size, task, dataset size."""
    lines = []
    for claim_id in claims:
        claim = book.evidence[claim_id]
        parts = []
        sizes = claim.scope.get("params_b")
        if sizes:
            low, high = float(sizes[0]), float(sizes[1])
            factor = low / params_b if params_b < low else params_b / high
            if factor >= NOTABLE_RATIO:
                side = "smaller than" if params_b < low else "larger than"
                measured = book.scope(claim_id, "params_b", low) + (
                    f"-{book.scope(claim_id, 'params_b', high)}" if high != low else ""
                )
                parts.append(
                    f"model {book.engine(factor, 'size ratio', _ratio(factor))}x {side} the {measured}B measured"
                )
            else:
                parts.append("model size as measured")
        tasks = claim.scope.get("tasks")
        if tasks and case.task not in tasks:
            parts.append(f"task not measured (only {', '.join(TASKS[t] for t in tasks)})")
        counts = claim.scope.get("examples")
        if counts:
            low, high = float(counts[0]), float(counts[1])
            factor = low / case.examples if case.examples < low else case.examples / high
            if factor >= NOTABLE_RATIO:
                side = "fewer" if case.examples < low else "more"
                parts.append(
                    f"{book.engine(factor, 'dataset ratio', _ratio(factor))}x {side} examples than the "
                    f"{book.scope(claim_id, 'examples', low)} measured"
                )
        if parts:
            lines.append(f"{claim_id}: " + "; ".join(parts))
    return tuple(lines)


def _ratio(factor: float) -> str:
    if factor >= 100:
        return f"{round(factor):,}"
    return show(factor) if factor < 0.01 else f"{factor:.3g}"


_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?")


def numbers_in(text: str) -> list[str]:
    """The numbers written in `text` (what a test checks against the figures)."""
    return _NUMBER.findall(text)
