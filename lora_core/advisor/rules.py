"""The advisor's rules for the adapter itself: which layers, rank, alpha, rsLoRA, dropout and
LoRA variant. Each returns its `Choice`, written through the `Ledger` so every number has an origin."""

from __future__ import annotations

import math
from typing import Any

from lora_core.advisor.advice import Advice, AdviceError, Alternative, Case, Choice
from lora_core.advisor.figures import Ledger, show, show_ratio
from lora_core.counting import count_lora_params
from lora_core.memory import GIB
from lora_core.models import Inventory
from lora_core.settings import LoraSettings, LoraSettingsError
from lora_core.strategies import STRATEGIES, StrategyError, resolve_strategy


def choose_targets(
    inv: Inventory, case: Case, book: Ledger, strategies: tuple[str, ...], instead_of: Advice | None
) -> tuple[Choice, LoraSettings]:
    """The target modules: the first of `strategies` that maps onto the model. Returns the
    choice and the settings with its targets; `instead_of` is the advice this one replaces (an MoE
    whose adapted experts fit no GPU here). Raises `AdviceError` when no strategy maps."""
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
    if chosen.strategy == "All linear" and instead_of is None:
        rule = (
            "Adapt every linear layer, the MLP included: Thinking Machines report LoRA on all layers beating "
            f"attention-only even at a matched parameter count. {_mlp_vs_attention(book)}"
        )
    elif instead_of is None:
        rule = f"This model has no layers for 'All linear'; {chosen.strategy} is the widest strategy that maps."
    else:
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
            "FFN only",
            "the same evidence, fewer parameters: when the adapter must stay small",
            ("peft-targets-rerun", "peft-lora-mlp-r10"),
        ),
        Alternative(
            "Q,V",
            "the article's and PEFT's default: behind MLP-only at the same budget in PEFT's benchmark, "
            "within noise in its re-run",
            ("peft-targets-rerun", "peft-lora-qv-r32", "article-scenarios"),
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
    claims = (
        "tm-all-layers",
        "peft-targets-rerun",
        "peft-lora-mlp-r10",
        "peft-lora-qv-r32",
        "bid-lr-alpha",
        "article-scenarios",
    )
    return Choice("targets", chosen.strategy, rule, claims, (), alternatives, article), settings


def _mlp_vs_attention(book: Ledger) -> str:
    """PEFT's MLP-only against q,v LoRA at about the same parameters: the re-run's accuracies, the earlier
    files', and the re-run's gap next to the standard error of one accuracy on its test set."""
    rerun, mlp_r10, qv_r32 = "peft-targets-rerun", "peft-lora-mlp-r10", "peft-lora-qv-r32"
    mlp, qv = book.claim_value(rerun, "mlp_pct"), book.claim_value(rerun, "qv_pct")
    earlier = book.claim_value(mlp_r10, "accuracy_pct") - book.claim_value(qv_r32, "accuracy_pct")
    between = book.claim_value(rerun, "between_mlp_pct") - book.claim_value(rerun, "between_qv_pct")
    scores = (
        "PEFT's benchmark compares MLP-only with q,v at about the same trainable parameters: in its re-run MLP-only "
        f"LoRA (r={book.claim(rerun, 'mlp_r')}, {book.claim(rerun, 'mlp_params')} parameters) scored "
        f"{book.claim(rerun, 'mlp_pct')}% against {book.claim(rerun, 'qv_pct')}% for q,v "
        f"(r={book.claim(rerun, 'qv_r')}, {book.claim(rerun, 'qv_params')}); its earlier result files gave "
        f"{book.claim(mlp_r10, 'accuracy_pct')}% against {book.claim(qv_r32, 'accuracy_pct')}%."
    )
    if min(mlp - qv, earlier, between) <= 0:
        return f"{scores} MLP-only did not lead in every version, so only the first reason stands."
    se = _standard_error(book, mlp, qv)
    verdict = (
        "so the re-run alone does not separate the two" if mlp - qv < 2 * se else "so the gap is beyond that noise"
    )
    return (
        f"{scores} The direction held in both, and in the version published between them; the size did not: "
        f"{book.engine(mlp - qv, 're-run gap, points', f'{mlp - qv:.1f}')} points in the re-run against "
        f"{book.engine(earlier, 'earlier gap, points', f'{earlier:.1f}')} before, one seed each, and the standard "
        f"error of one accuracy over GSM8K's {book.claim(rerun, 'test_questions')} test questions is "
        f"{book.engine(se, 'standard error of one accuracy, points', f'{se:.1f}')} points, {verdict}."
    )


def _standard_error(book: Ledger, *pcts: float) -> float:
    """The binomial standard error of one accuracy on PEFT's MetaMathQA benchmark (GSM8K's test questions,
    counted in peft-targets-rerun), in points: the largest over the accuracies `pcts`, given in %."""
    n = book.claim_value("peft-targets-rerun", "test_questions")
    # binomial standard error of an accuracy p over n test questions, sqrt(p (1 - p) / n), in points
    return max(100 * math.sqrt(p / 100 * (1 - p / 100) / n) for p in pcts)


def choose_rank(
    inv: Inventory, settings: LoraSettings, case: Case, book: Ledger, warnings: list[str]
) -> tuple[Choice, int]:
    """The rank: the lowest rung of the evidence's ladder whose trainable parameters cover the
    dataset's completion tokens (the lowest for preference tuning), one rung up when quality comes
    first. Returns the choice and the rank; a dataset past the top rung adds to `warnings`."""
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


def choose_alpha(settings: LoraSettings, case: Case, book: Ledger) -> tuple[Choice, LoraSettings]:
    """lora_alpha: the cookbook's fixed value, the one its learning rates were measured with.
    Returns the choice and the settings with it."""
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


def choose_rslora(settings: LoraSettings, book: Ledger) -> Choice:
    """rsLoRA: off, as the learning rates here were measured with the alpha/r scale."""
    rule = (
        "Off: the learning rates recommended here were measured with the alpha/r scale; rsLoRA's alpha/sqrt(r) "
        "changes the scale by a factor of sqrt(r)."
    )
    alternatives = (
        Alternative("on", "at high ranks with a re-tuned learning rate: it keeps higher ranks learning", ("rslora",)),
    )
    return Choice("use_rslora", "off", rule, ("tm-lr-table", "rslora"), (), alternatives)


def choose_dropout(
    inv: Inventory, settings: LoraSettings, case: Case, params_b: float, trainable: int, book: Ledger
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
    ours = book.engine(ratio, "completion tokens per trainable parameter", show_ratio(ratio))
    theirs = book.engine(
        cell_ratio(nearest[0]), "study cell: targets per parameter", show_ratio(cell_ratio(nearest[0]))
    )
    cells = ", ".join(f"r={book.cell(study.id, c, 'rank')} n={book.cell(study.id, c, 'samples')}" for c in nearest)
    gain = book.cell_percent(study.id, top, "gain")
    size, qlora, qlora_rate = qlora_row(params_b, book, "dropout_by_size")
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


def qlora_row(params_b: float, book: Ledger, key: str) -> tuple[str, str, float]:
    """The QLoRA script nearest in model size to `params_b`: its size and its `key` as shown,
    and that value."""
    sizes = book.claim_list("qlora-scripts", "sizes_b")
    index = min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i] / max(params_b, 1e-3))))
    value = book.claim_list("qlora-scripts", key)[index]
    return book.listed("qlora-scripts", "sizes_b", sizes[index]), book.listed("qlora-scripts", key, value), value


def choose_method(book: Ledger) -> Choice:
    """The LoRA variant: vanilla LoRA, as tuned variants land within a few percent of it. DoRA and
    PiSSA are its alternatives, each with its paper's reported gain and its cost."""
    rule = (
        f"Vanilla LoRA: tuned for their learning rates, LoRA variants land within {book.claim('lr-matters', 'within_pct_low')}-"
        f"{book.claim('lr-matters', 'within_pct_high')}% of it. DoRA's and PiSSA's authors report larger gains, but in "
        f"the setups they released LoRA ran at a single learning rate (see the alternatives). {_dora_vs_lora(book)}"
    )
    alternatives = (
        Alternative(
            f"LoRA+ (ratio {book.claim('loraplus', 'ratio')})",
            f"B learns faster than A: {book.claim('loraplus', 'gain_low_pct')}-{book.claim('loraplus', 'gain_high_pct')}% "
            "better in its paper; cheap to try as an experiment's loraplus dimension",
            ("loraplus",),
        ),
        _dora(book),
        _pissa(book),
    )
    claims = (
        "lr-matters",
        "peft-dora-qv-r32",
        "peft-lora-qv-r32",
        "peft-dora-between",
        "peft-dora-rerun",
        "peft-targets-rerun",
        "dora-paper",
        "pissa-paper",
        "pissa-scripts",
    )
    return Choice("method", "LoRA", rule, claims, (), alternatives)


def _dora_vs_lora(book: Ledger) -> str:
    """PEFT's DoRA against LoRA run the same day, in three versions of its results on PEFT's main branch:
    by how many points DoRA was below or above LoRA in each, and whether any difference is beyond the
    standard error of one accuracy on the benchmark's test set."""
    pairs = {
        "in the earlier result files": (("peft-dora-qv-r32", "accuracy_pct"), ("peft-lora-qv-r32", "accuracy_pct")),
        "in the version after them": (("peft-dora-between", "dora_pct"), ("peft-dora-between", "lora_pct")),
        "in the re-run": (("peft-dora-rerun", "dora_pct"), ("peft-dora-rerun", "lora_pct")),
    }
    gaps = {where: book.claim_value(*dora) - book.claim_value(*lora) for where, (dora, lora) in pairs.items()}
    one_side = len({gap < 0 for gap in gaps.values()}) == 1
    shown: list[str] = []
    for where, gap in gaps.items():  # two decimals, as in the evidence file: 0.15 is 2 of 1,319 questions
        points = book.engine(abs(gap), f"DoRA minus LoRA {where}, points", f"{abs(gap):.2f}")
        side = "" if one_side else " below" if gap < 0 else " above"
        shown.append(f"{points}{'' if shown else ' points'}{side} {where}")
    dora, lora = pairs["in the re-run"]
    shown[-1] += f" ({book.claim(*dora)}% vs {book.claim(*lora)}%)"
    if one_side:
        lead = f"DoRA scored {'below' if min(gaps.values()) < 0 else 'above'} LoRA in each, by "
    else:
        lead = "The sign of DoRA's difference flips between them: "
    se = _standard_error(book, *(book.claim_value(*accuracy) for pair in pairs.values() for accuracy in pair))
    within = max(abs(gap) for gap in gaps.values()) < se
    return (
        "PEFT's benchmark ran DoRA and LoRA on the same day at the same settings "
        f"(r={book.claim('peft-lora-qv-r32', 'r')} on q,v, one seed each) in three versions of its results on "
        f"PEFT's main branch. {lead}{', '.join(shown[:-1])} and {shown[-1]}. "
        f"{'Each difference is smaller than' if within else 'The largest difference exceeds'} the standard error "
        f"of one accuracy over GSM8K's {book.claim('peft-targets-rerun', 'test_questions')} test questions "
        f"({book.engine(se, 'standard error of one accuracy, points', f'{se:.1f}')} points)"
        + (", so none of them separates the two." if within else ".")
    )


def _dora(book: Ledger) -> Alternative:
    """DoRA: its authors' gain, with the learning rates each side ran at, and what it costs in
    training time, memory and unmerged inference."""
    when = (
        f"its authors report {book.claim('dora-paper', 'llama3_8b_dora_pct')}% vs LoRA's "
        f"{book.claim('dora-paper', 'llama3_8b_lora_pct')}% on commonsense reasoning at r={book.claim('dora-paper', 'r')}, "
        f"LoRA at {book.claim('dora-paper', 'lora_lr')} for every rank and DoRA at {book.claim('dora-paper', 'dora_lr_low')} "
        f"or {book.claim('dora-paper', 'dora_lr_high')}. It is slower: {_extra_percent(book, 'train_s', 'training time')}% "
        f"more training time and {_extra_percent(book, 'peak_gb', 'peak memory')}% more peak memory in PEFT's re-run, "
        f"{book.claim('peft-dora-overhead', 'time_pct')}% more inference time until merged. Try it as an experiment's "
        "dora dimension, with its own learning rates"
    )
    return Alternative("DoRA (use_dora)", when, ("dora-paper", "peft-dora-rerun", "peft-dora-overhead", "lr-matters"))


def _extra_percent(book: Ledger, key: str, what: str) -> str:
    """How much more of `what` DoRA took than LoRA in PEFT's same-day re-run, in whole percent, as shown."""
    dora, lora = book.claim_value("peft-dora-rerun", f"dora_{key}"), book.claim_value("peft-dora-rerun", f"lora_{key}")
    return book.engine(round(100 * (dora / lora - 1)), f"DoRA's extra {what} over LoRA, %")


def _pissa(book: Ledger) -> Alternative:
    """PiSSA: its authors' gain, the single learning rate of their released comparison, and the SVD
    and base-weight change it costs."""
    when = (
        f"its authors report {book.claim('pissa-paper', 'pissa_pct')}% vs LoRA's {book.claim('pissa-paper', 'lora_pct')}% "
        f"on GSM8K; their released scripts train both at one learning rate, {book.claim('pissa-scripts', 'lr')}. It needs "
        "an SVD of every adapted weight before training (minutes; seconds with the fast pissa_niter SVD, at some error) "
        "and rewrites the base weights, so convert the adapter to plain LoRA to share it. Try it as an experiment's init "
        "dimension, with its own learning rates"
    )
    return Alternative(
        "PiSSA (init_lora_weights=pissa)", when, ("pissa-paper", "pissa-scripts", "peft-pissa-init", "lr-matters")
    )
