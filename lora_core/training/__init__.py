"""Short real fine-tuning runs: transformers' Trainer on a PEFT model built from the same
`LoraSettings` the pages count and export, with every step written to the run store.

`run_training` (module `run`) is the one code path for the app's worker, the CLI and `accelerate
launch`; the parts it runs are the modules beside it: `config` (what a run trains on, checked
before it starts, and the model it loads), `data` (its examples and their batches), `callback`
(what each step writes to the store) and `memory` (its estimated and measured peak). Importing
this package imports neither torch nor transformers; a run imports them when it starts.
"""

from __future__ import annotations

from lora_core.training.config import (
    EMBEDDED,
    MAX_STEPS,
    TrainConfig,
    causal_lm_config,
    load_model_and_tokenizer,
    preflight,
)
from lora_core.training.data import check_dataset, collator, load_dataset
from lora_core.training.errors import TrainingError, TrainSetupError
from lora_core.training.memory import eval_batch_size, memory_setup, run_memory_estimate_mb
from lora_core.training.run import BaseModels, RunResult, process_rank, run_training

__all__ = [
    "EMBEDDED",
    "MAX_STEPS",
    "BaseModels",
    "RunResult",
    "TrainConfig",
    "TrainSetupError",
    "TrainingError",
    "causal_lm_config",
    "check_dataset",
    "collator",
    "eval_batch_size",
    "load_dataset",
    "load_model_and_tokenizer",
    "memory_setup",
    "preflight",
    "process_rank",
    "run_memory_estimate_mb",
    "run_training",
]
