"""The two ways a run can be refused: before it exists (`TrainSetupError`) or while it runs
(`TrainingError`)."""

from __future__ import annotations

from lora_core.errors import InputError


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is the reason stored with the failed run."""


class TrainSetupError(InputError):
    """A run that cannot start, found before it is created (`preflight`): a bad field, a device
    this machine lacks, a dataset that cannot be read, a model that is not a causal LM."""
