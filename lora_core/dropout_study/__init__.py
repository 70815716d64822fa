"""The dropout study: does lora_dropout lower held-out loss, and where? A simulation that tests the
seed article's claims instead of drawing output histograms.

Task: inputs x ~ N(0, I_d), a frozen base W0 and a target y = (W0 + D*) x + noise, where D* has low
true rank k and ||D*||_F^2 = d (signal variance 1 per output). Only the adapter trains:
h = W0 x + (alpha / r) B A Dropout(x), which is where PEFT puts lora_dropout
(`lora_B(lora_A(dropout(x))) * scaling`); the article's B Dropout(A x) is the `"rank"` placement.
W0 x appears in both h and y, so it cancels from every loss and is never formed. A is PEFT's
kaiming-uniform (a = sqrt(5): U(-1/sqrt(d), 1/sqrt(d))), B is zero; Adam with a linear decay to 0
(transformers' default schedule), inverted dropout with fresh masks each step, evaluation without
dropout. The held-out loss is the exact expected MSE on fresh data, ||(alpha/r) B A - D*||_F^2 / d
+ noise^2 (x ~ N(0, I)), so it carries no sampling noise of its own.

The modules: `study` (the parameters and their validation), `streams` (the grid-independent
random numbers), `batched` (every configuration in one program), `reference` (one configuration
at a time, the check on `batched`) and `findings` (the table, the article's claims, the summary).
Torch is imported inside the functions that use it, so importing this package does not load it.
"""

from lora_core.dropout_study.batched import batch_rows, run_dropout_study
from lora_core.dropout_study.findings import (
    ARTICLE_RATES,
    GAIN_FLOOR,
    LOW_RANK,
    Finding,
    Verdict,
    dropout_findings,
    dropout_table,
    study_summary,
)
from lora_core.dropout_study.reference import dropout_study_loop
from lora_core.dropout_study.streams import Streams, make_streams
from lora_core.dropout_study.study import (
    DATA_CHUNK,
    DEFAULT_STUDY,
    MAX_BYTES,
    MAX_D,
    MAX_SAMPLES,
    MAX_SEEDS,
    MAX_STEPS,
    PLACEMENTS,
    DropoutStudy,
    Placement,
    check_study,
    stream_rows,
    study_bytes,
    study_problems,
)

__all__ = [
    "ARTICLE_RATES",
    "DATA_CHUNK",
    "DEFAULT_STUDY",
    "GAIN_FLOOR",
    "LOW_RANK",
    "MAX_BYTES",
    "MAX_D",
    "MAX_SAMPLES",
    "MAX_SEEDS",
    "MAX_STEPS",
    "PLACEMENTS",
    "DropoutStudy",
    "Finding",
    "Placement",
    "Streams",
    "Verdict",
    "batch_rows",
    "check_study",
    "dropout_findings",
    "dropout_study_loop",
    "dropout_table",
    "make_streams",
    "run_dropout_study",
    "stream_rows",
    "study_bytes",
    "study_problems",
    "study_summary",
]
