"""The advisor: a LoRA config for a model, a dataset and a GPU, with the evidence for each choice.

`advise(case)` returns an `Advice`: the settings and training setup, the exact trainable count and
the memory estimate from the engine, and one `Choice` per decision with its rule, the claims it
stands on (ids in `evidence.toml`), how far the user's case lies from those claims' conditions,
and the alternatives. Every number in the text is a `Figure` whose origin is a claim's number, the
engine, or the user's input, so a test can check that nothing shown is made up here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from lora_core.advisor.advice import PRIORITIES, Advice, AdviceError, Alternative, Case, Choice, Training
from lora_core.advisor.evidence import TASKS, Evidence, load_evidence
from lora_core.advisor.figures import Figure, Ledger, numbers_in, show, show_ratio
from lora_core.advisor.fit import choose_setup
from lora_core.advisor.rules import (
    choose_alpha,
    choose_dropout,
    choose_method,
    choose_rank,
    choose_rslora,
    choose_targets,
)
from lora_core.advisor.schedule import choose_epochs, choose_learning_rate, choose_seq_len
from lora_core.counting import count_lora_params
from lora_core.models import Inventory, as_inventory

# the names this module held before the advisor was split, still importable from here
__all__ = [
    "PRIORITIES",
    "Advice",
    "AdviceError",
    "Alternative",
    "Case",
    "Choice",
    "Figure",
    "Training",
    "advise",
    "numbers_in",
    "show",
]

NOTABLE_RATIO = 1.5  # a case this close to a claim's conditions is called "as measured"


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
    book = Ledger(ev)
    params_b = inv.total_params / 1e9
    warnings: list[str] = []

    targets, settings = choose_targets(inv, case, book, strategies, instead_of)
    rank, r = choose_rank(inv, settings, case, book, warnings)
    settings = settings.replace(r=r)
    alpha, settings = choose_alpha(settings, case, book)
    rslora = choose_rslora(settings, book)
    trainable = count_lora_params(inv, settings).trainable_params
    dropout, settings = choose_dropout(inv, settings, case, params_b, trainable, book)
    lr_choice, lr = choose_learning_rate(inv, params_b, case, book)
    seq_len, seq_choice = choose_seq_len(inv, case, book, warnings)
    epochs_choice, epochs = choose_epochs(case, book)
    count = count_lora_params(inv, settings)
    fit_choice, estimate, accumulation, fits = choose_setup(inv, settings, count, seq_len, case, book)
    setup, micro = estimate.setup, estimate.setup.batch_size
    steps = max(1, math.ceil(case.examples * epochs / (micro * accumulation)))
    method = choose_method(book)
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


def _causal_lm(inv: Inventory) -> bool:
    from lora_core.training.config import is_causal_lm

    return is_causal_lm(inv.model_type, inv.spec.config.get("architectures") or [])


def _distances(claims: Iterable[str], book: Ledger, case: Case, params_b: float) -> tuple[str, ...]:
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
                    f"model {book.engine(factor, 'size ratio', show_ratio(factor))}x {side} the {measured}B measured"
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
                    f"{book.engine(factor, 'dataset ratio', show_ratio(factor))}x {side} examples than the "
                    f"{book.scope(claim_id, 'examples', low)} measured"
                )
        if parts:
            lines.append(f"{claim_id}: " + "; ".join(parts))
    return tuple(lines)
