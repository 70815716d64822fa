"""What the advisor takes and gives: the user's `Case` (checked by `Case.problems`), and the
`Advice` with one `Choice` per decision, its `Alternative`s and the `Training` setup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_core.advisor.evidence import TASKS
from lora_core.advisor.figures import Figure
from lora_core.counting import CountResult
from lora_core.errors import InputError, is_int, is_number, short_repr
from lora_core.memory import GIB, MAX_SEQ_LEN, MemoryEstimate, TrainSetup
from lora_core.models import Inventory
from lora_core.settings import LoraSettings

PRIORITIES = {"quality": "the best result", "speed": "the shortest run", "memory": "the smallest GPU footprint"}
MAX_EXAMPLES = 10**10
MAX_TOKENS_PER_EXAMPLE = MAX_SEQ_LEN
MIN_GPU_GIB, MAX_GPU_GIB = 1e-3, 4096.0


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
