"""The advisor's rules for the training schedule: the learning rate (the cookbook's nearest
measured model), the sequence length (within the model's context) and the number of epochs."""

from __future__ import annotations

import math
from typing import Any

from lora_core.advisor.advice import AdviceError, Alternative, Case, Choice
from lora_core.advisor.evidence import Claim
from lora_core.advisor.figures import Ledger, show_ratio
from lora_core.advisor.rules import qlora_row
from lora_core.errors import is_int
from lora_core.memory import MAX_SEQ_LEN
from lora_core.models import Inventory

SEQ_ROUNDING = 64  # sequences are padded to a multiple of this (tensor-core friendly, and what tokenizers pad to)


def choose_learning_rate(inv: Inventory, params_b: float, case: Case, book: Ledger) -> tuple[Choice, float]:
    """The learning rate: the cookbook's best for this model, else for the nearest model it
    measured (the lowest rate when several are equally near). Returns the choice and the rate."""
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
            f"({book.engine(params_b, 'model parameters in billions', show_ratio(params_b))}B); the cookbook itself "
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
    size, qlora_lr, _ = qlora_row(params_b, book, "lr_by_size")
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


def choose_seq_len(inv: Inventory, case: Case, book: Ledger, warnings: list[str]) -> tuple[int, Choice]:
    """The sequence length: as given, as measured on the dataset, or the mean prompt and
    completion tokens padded to a multiple of SEQ_ROUNDING, within the model's context. Returns the
    length and the choice; truncation adds to `warnings`. Raises `AdviceError` for a given length
    past the model's context."""
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


def choose_epochs(case: Case, book: Ledger) -> tuple[Choice, int]:
    """The number of epochs, by this app's convention for the dataset's size. Returns the choice
    and the epochs."""
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
