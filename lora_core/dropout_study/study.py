"""The dropout study's parameters: the grid and task (`DropoutStudy`), the limits on them, every
problem with a study named at once, and the memory a study would hold."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from lora_core.errors import InputError, is_int, positive_int_problem, short_repr

Placement = Literal["input", "rank"]
PLACEMENTS: dict[str, str] = {
    "input": "PEFT: B A Dropout(x)",
    "rank": "article: B Dropout(A x)",
}
MAX_SAMPLES = 65_536
MAX_STEPS = 5_000
MAX_SEEDS = 16
MAX_D = 512
MAX_BYTES = 2 * 1024**3  # tensors the study holds at once
DATA_CHUNK = 256  # rows drawn per call, so the first n rows do not depend on the largest n


@dataclass(frozen=True)
class DropoutStudy:
    """One study's grid and task. `alpha_per_rank` sets lora_alpha = alpha_per_rank * r (the
    article's common alpha = 2r), so the scale alpha / r is the same at every rank."""

    ranks: tuple[int, ...] = (1, 4, 16, 64)
    rates: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    samples: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    seeds: int = 3
    d: int = 64
    true_rank: int = 4
    noise: float = 1.0
    steps: int = 300
    batch: int = 64
    lr: float = 0.01
    alpha_per_rank: float = 2.0
    placement: Placement = "input"
    evals: int = 15
    seed: int = 0

    @property
    def scale(self) -> float:
        """alpha / r (PEFT's `scaling`)."""
        return self.alpha_per_rank

    def eval_steps(self) -> list[int]:
        """The steps after which losses are recorded: 0 (before training), evenly to `steps`."""
        return sorted({round(i * self.steps / self.evals) for i in range(self.evals + 1)})


DEFAULT_STUDY = DropoutStudy()


def study_problems(study: DropoutStudy) -> list[str]:
    """Every problem with `study`, each naming its field in backticks; empty when it can run."""
    problems = [
        p
        for name, value, limit in (
            ("d", study.d, MAX_D),
            ("seeds", study.seeds, MAX_SEEDS),
            ("steps", study.steps, MAX_STEPS),
            ("batch", study.batch, MAX_SAMPLES),
            ("evals", study.evals, MAX_STEPS),
        )
        if (p := positive_int_problem(name, value, limit))
    ]
    d = study.d if is_int(study.d) and 1 <= study.d <= MAX_D else MAX_D
    if p := positive_int_problem("true_rank", study.true_rank, d):
        problems.append(p)
    for name, values, limit in (("ranks", study.ranks, d), ("samples", study.samples, MAX_SAMPLES)):
        if not values:
            problems.append(f"`{name}` must name at least one value")
        bad = [v for v in values if positive_int_problem(name, v, limit)]
        if bad:
            problems.append(
                f"`{name}` must be integers in 1..{limit:,} (the layer width d for ranks), got {short_repr(bad)}"
            )
    if not study.rates:
        problems.append("`rates` must name at least one dropout rate")
    bad_rates = [p for p in study.rates if not (isinstance(p, (int, float)) and 0 <= p < 1)]
    if bad_rates:
        problems.append(f"`rates` must be dropout rates in [0, 1), got {short_repr(bad_rates)}")
    for name, value, low in (
        ("noise", study.noise, 0.0),
        ("lr", study.lr, None),
        ("alpha_per_rank", study.alpha_per_rank, None),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if low == 0.0 else value > 0)):
            problems.append(
                f"`{name}` must be a finite number {'>= 0' if low == 0.0 else '> 0'}, got {short_repr(value)}"
            )
    if study.placement not in PLACEMENTS:
        problems.append(f"`placement` must be one of {', '.join(PLACEMENTS)}, got {short_repr(study.placement)}")
    if not is_int(study.seed) or not 0 <= study.seed < 2**31:
        problems.append(f"`seed` must be an integer in 0..2**31-1, got {short_repr(study.seed)}")
    if not problems and (need := study_bytes(study)) > MAX_BYTES:
        problems.append(
            f"the study needs ~{need / 1024**3:.1f} GiB (over {MAX_BYTES / 1024**3:.0f} GiB): "
            "pick fewer ranks, rates, sample sizes or seeds, or fewer steps"
        )
    return problems


def stream_rows(study: DropoutStudy) -> int:
    """The data rows each seed draws: the largest training-set size rounded up to whole
    `DATA_CHUNK`s (the memory estimate and the stream drawing share this rule)."""
    return -(-max(study.samples) // DATA_CHUNK) * DATA_CHUNK


def study_bytes(study: DropoutStudy) -> int:
    """A float32 estimate of what the study holds at once: the seeds' data and per-step random
    numbers, four copies of every parameter (value, gradient, Adam's two moments), one step's
    activations and the recorded curves."""
    d, batch, seeds = study.d, study.batch, study.seeds
    data_configs = len(study.rates) * len(study.samples) * seeds
    rows = stream_rows(study)
    streams = seeds * (2 * rows * d + study.steps * batch * (d + 1) + d * d)
    params = 4 * data_configs * sum(2 * r * d for r in set(study.ranks))
    activations = data_configs * batch * (3 * d + 3 * max(study.ranks)) + len(study.samples) * seeds * 2 * d * d * 2
    curves = 2 * data_configs * len(set(study.ranks)) * (study.evals + 1) * 2
    return 4 * (streams + params + activations + curves)


def check_study(study: DropoutStudy) -> DropoutStudy:
    """`study` with its lists sorted and deduplicated; raises InputError naming every problem."""
    problems = study_problems(study)
    if problems:
        raise InputError("; ".join(problems))
    return replace(
        study,
        ranks=tuple(sorted(set(study.ranks))),
        rates=tuple(sorted({float(p) for p in study.rates})),
        samples=tuple(sorted(set(study.samples))),
    )
