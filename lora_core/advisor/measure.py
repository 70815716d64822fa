"""What the advisor needs of a dataset, measured: its size in examples and its mean prompt and
completion tokens, with the tokenizer of the model it is for (or the embedded model's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lora_core.datasets import IGNORE_INDEX, Dataset, DatasetError, tokenize_examples
from lora_core.errors import one_line
from lora_core.memory import MAX_SEQ_LEN
from lora_core.training.config import EMBEDDED, TrainSetupError, causal_lm_config, pretrained_tokenizer

LONGEST_QUANTILE = 0.95  # the sequence length covers this share of examples; the rest are truncated


@dataclass(frozen=True)
class DatasetMeasure:
    """`examples` (train + eval), mean `prompt_tokens` / `completion_tokens`, and `long_tokens`:
    the prompt + completion length that LONGEST_QUANTILE of examples fit in. `tokenizer` names
    the tokenizer that counted."""

    name: str
    examples: int
    prompt_tokens: float
    completion_tokens: float
    long_tokens: int
    tokenizer: str


def load_tokenizer(model: str):
    """The tokenizer of a local causal LM folder, a Hub id (online) or "embedded". Raises
    `TrainSetupError` when there is none."""
    path, _, local_only = causal_lm_config(model)
    try:
        return pretrained_tokenizer(path, local_only)
    except Exception as error:  # transformers raises many types for a missing or broken tokenizer
        raise TrainSetupError(f"model {model!r} has no loadable tokenizer: {one_line(error)}") from None


def measure_dataset(dataset: Dataset, tokenizer, tokenizer_name: str = EMBEDDED) -> DatasetMeasure:
    """Measure `dataset` (from `training.data.load_dataset` or an upload) with `tokenizer`.
    Raises `DatasetError` for a dataset without examples."""
    examples = [*dataset.train, *dataset.eval]
    if not examples:
        raise DatasetError(f"dataset {dataset.name!r} has no examples")
    # as training frames them (chat template, EOS), so the counts are the tokens a run sees
    encoded = tokenize_examples(examples, tokenizer, MAX_SEQ_LEN)
    completions = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded]
    totals = [len(e["input_ids"]) for e in encoded]
    prompts = np.subtract(totals, completions)
    return DatasetMeasure(
        dataset.name,
        len(examples),
        float(np.mean(prompts)),
        float(np.mean(completions)),
        math.ceil(np.quantile(totals, LONGEST_QUANTILE)),
        tokenizer_name,
    )
