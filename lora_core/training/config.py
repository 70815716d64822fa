"""What a run trains on and how (`TrainConfig`), and everything about it that can be checked before
it starts: its fields, its device, its dataset and its model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.devices import check_device_name, pick_device, torch_dtype, train_dtype
from lora_core.embedded import EMBEDDED
from lora_core.errors import is_int, one_line, positive_int_problem, short_repr
from lora_core.settings import LoraSettings
from lora_core.training.data import check_dataset
from lora_core.training.errors import TrainingError, TrainSetupError
from lora_core.training.trackers import tracker_problems

MAX_STEPS = 100_000
# Trackers a run can report to through Trainer's `report_to`, and the package each one needs.
# (transformers takes tensorboard's own package or tensorboardX, which `ray[tune]` brings.)


@dataclass(frozen=True)
class TrainConfig:
    """What a run trains on and how. `model` is "embedded" (SmolLM2-135M-Instruct), a Hub id or a
    local folder; `dataset` a built-in task name, "upload:<path>" or "hub:<repo id>"."""

    model: str = EMBEDDED
    dataset: str = "json_extraction"
    steps: int = 60
    learning_rate: float = 2e-4
    batch_size: int = 4
    seq_len: int = 128
    eval_every: int = 10
    eval_examples: int = 32
    seed: int = 0
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # LoRA+ (Hayou et al. 2024): B's learning rate is this many times A's; None trains both alike.
    loraplus_ratio: float | None = None
    # Trainer's `report_to`: any of TRACKERS; none by default.
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.report_to, (list, str)):  # a run's config comes back from JSON as a list
            names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
            object.__setattr__(self, "report_to", names)

    def problems(self) -> list[str]:
        """Every bad value, fields named."""
        counts = ("steps", "batch_size", "seq_len", "eval_every", "eval_examples")
        found = [problem for name in counts if (problem := positive_int_problem(name, getattr(self, name)))]
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            found.append(f"`learning_rate` must be in (0, 1), got {short_repr(self.learning_rate)}")
        if is_int(self.seq_len) and self.seq_len > 4096:
            found.append("`seq_len` above 4096 is not supported in short runs")
        if is_int(self.steps) and self.steps > MAX_STEPS:
            found.append(f"`steps` above {MAX_STEPS:,} is not a short run: use your own training script")
        if is_int(self.batch_size) and self.batch_size > 1024:
            found.append("`batch_size` above 1024 is not supported in short runs")
        if self.device is not None:
            found += check_device_name(self.device)
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            found.append("`dataset` must name a built-in task, upload:PATH or hub:REPO")
        if not isinstance(self.model, str) or not self.model.strip():
            found.append("`model` must be 'embedded', a Hub id or a local folder")
        if self.loraplus_ratio is not None and not (
            isinstance(self.loraplus_ratio, (int, float)) and 1 <= self.loraplus_ratio <= 1024
        ):
            found.append(f"`loraplus_ratio` must be from 1 to 1024 (or None), got {short_repr(self.loraplus_ratio)}")
        found += tracker_problems(self.report_to)
        return found


def causal_lm_config(name: str):
    """(path, config, local_files_only) of a causal LM named "embedded", a Hub id or a folder.
    Raises `TrainSetupError` when its config cannot be found or it is not a causal LM. The
    embedded model is converted here if it has not been yet."""
    from transformers import AutoConfig

    from lora_core.embedded import EmbeddedModelError, ensure_embedded
    from lora_core.models import hub_reachable

    try:
        path = str(ensure_embedded()) if name == EMBEDDED else name
        if name != EMBEDDED and path.startswith("~"):
            path = str(Path(path).expanduser())
        local = Path(path).is_dir()
        exists = Path(path).exists()
    except EmbeddedModelError as error:
        raise TrainSetupError(str(error)) from None
    except (OSError, RuntimeError) as error:  # a name too long for a path, ~nosuchuser
        raise TrainSetupError(f"model {short_repr(name)}: not a usable path or Hub id ({one_line(error)})") from None
    if not local and (exists or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise TrainSetupError(f"model {name!r}: give a model folder (with config.json) or a Hub id")
    offline = not local and not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local or offline, trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a missing or broken config
        hint = " (the Hub is unreachable and it is not in the local cache)" if offline else ""
        raise TrainSetupError(f"model {name!r} could not be loaded{hint}: {one_line(error)}") from None
    if not is_causal_lm(config.model_type, getattr(config, "architectures", None) or []):
        raise TrainSetupError(f"model {name!r} ({config.model_type}) is not a causal language model: pick a decoder LM")
    return path, config, local or offline


def is_causal_lm(model_type: str, architectures: Sequence[str]) -> bool:
    """A model type transformers builds as a causal LM, whose architectures (when the config names
    any) generate: BERT's type has a causal head too, but a BertForMaskedLM config is no decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    generates = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (generates or not architectures)


def pretrained_tokenizer(path: str, local_only: bool):
    """The tokenizer at `path` (from `causal_lm_config`), never running the folder's own code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=local_only, trust_remote_code=False)


def load_model_and_tokenizer(name: str, device: str):
    """The base causal LM, in `devices.train_dtype(device)`, and its tokenizer, set to pad on the
    right with its EOS token when it has no pad token. Raises `TrainSetupError` for a model that
    is not a causal LM and `TrainingError` for one whose weights cannot be loaded."""
    from transformers import AutoModelForCausalLM

    path, _, local_only = causal_lm_config(name)
    try:
        # trust_remote_code=False, not None: with None transformers asks on stdin whether to run a
        # folder's own code, and a "y" would run it
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(train_dtype(device)), local_files_only=local_only, trust_remote_code=False
        )
        tokenizer = pretrained_tokenizer(path, local_only)
    except Exception as error:  # as above: any loading failure becomes the run's one-line reason
        raise TrainingError(f"model {name!r} could not be loaded ({one_line(error)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every real token at its position; a left-padded batch would shift them.
    tokenizer.padding_side = "right"
    return model, tokenizer


def preflight(config: TrainConfig, settings: LoraSettings) -> str:
    """Everything about a run that can be checked before it is created, so bad input never leaves
    a failed run behind: the fields, the device (present here), the dataset (read and parsed)
    and the model (its config found, a causal LM). Returns the device; raises `InputError`."""
    problems = config.problems() + settings.problems()
    if problems:
        raise TrainSetupError("; ".join(problems))
    device = pick_device(config.device)
    check_dataset(config.dataset, config.seed)
    if config.model == EMBEDDED:  # a causal LM by construction; only its package must be there
        from lora_core.embedded import EmbeddedModelError, gguf_path

        try:
            gguf_path()
        except EmbeddedModelError as error:
            raise TrainSetupError(str(error)) from None
    else:
        causal_lm_config(config.model)
    return device
