"""Short real fine-tuning runs: transformers' Trainer on a PEFT model built from the same
`LoraSettings` the pages count and export, with every step written to the run store.

`run_training` is the one code path for the app's worker, the CLI and `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_core.devices import check_device_name, pick_device
from lora_core.errors import InputError, one_line, short_repr
from lora_core.settings import LoraSettings
from lora_core.store import Store

EMBEDDED = "embedded"
MAX_STEPS = 100_000


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is the reason stored with the failed run."""


class TrainSetupError(InputError):
    """A run that cannot start, found before it is created (`preflight`): a bad field, a device
    this machine lacks, a dataset that cannot be read, a model that is not a causal LM."""


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

    def problems(self) -> list[str]:
        """Every bad value, fields named."""
        found = []
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"`{name}` must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            found.append(f"`learning_rate` must be in (0, 1), got {self.learning_rate!r}")
        if isinstance(self.seq_len, int) and self.seq_len > 4096:
            found.append("`seq_len` above 4096 is not supported in short runs")
        if isinstance(self.steps, int) and self.steps > MAX_STEPS:
            found.append(f"`steps` above {MAX_STEPS:,} is not a short run: use your own training script")
        if isinstance(self.batch_size, int) and self.batch_size > 1024:
            found.append("`batch_size` above 1024 is not supported in short runs")
        if self.device is not None:
            found += check_device_name(self.device)
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            found.append("`dataset` must name a built-in task, upload:PATH or hub:REPO")
        if not isinstance(self.model, str) or not self.model.strip():
            found.append("`model` must be 'embedded', a Hub id or a local folder")
        return found


def causal_lm_config(name: str):
    """(path, config, local_files_only) of a causal LM named "embedded", a Hub id or a folder.
    Raises `TrainSetupError` when its config cannot be found or it is not a causal LM. The
    embedded model is converted here if it has not been yet."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
        config = AutoConfig.from_pretrained(path, local_files_only=local or offline)
    except Exception as error:  # transformers raises many types for a missing or broken config
        hint = " (the Hub is unreachable and it is not in the local cache)" if offline else ""
        raise TrainSetupError(f"model {name!r} could not be loaded{hint}: {one_line(error)}") from None
    architectures = getattr(config, "architectures", None) or []
    causal_names = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal_names):
        raise TrainSetupError(f"model {name!r} ({config.model_type}) is not a causal language model: pick a decoder LM")
    return path, config, local or offline


def load_model_and_tokenizer(name: str, device: str):
    """The base causal LM and its tokenizer. Raises `TrainSetupError` for a model that is not a
    causal LM and `TrainingError` for one whose weights cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, local_only = causal_lm_config(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(device), local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except Exception as error:  # as above: any loading failure becomes the run's one-line reason
        raise TrainingError(f"model {name!r} could not be loaded ({one_line(error)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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


def _dtype(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_dataset(spec: str, seed: int = 0) -> None:
    """Raise `DatasetError` unless `spec` can be trained on: a built-in task or an upload is read
    and parsed; a Hub dataset is only checked for its id's form and the Hub's reach (downloading
    it is the run's work, not the form's)."""
    from lora_core.datasets import check_hub_dataset

    if isinstance(spec, str) and spec.startswith("hub:"):
        check_hub_dataset(spec.removeprefix("hub:"))
        return
    load_dataset(spec, seed)


def load_dataset(spec: str, seed: int = 0):
    """A `Dataset` for a built-in task name, "upload:<path>" or "hub:<repo id>"."""
    from lora_core.datasets import (
        BUILTIN_TASKS,
        MAX_UPLOAD_BYTES,
        DatasetError,
        builtin_dataset,
        hub_dataset,
        parse_upload,
    )

    if spec in BUILTIN_TASKS:
        return builtin_dataset(spec, seed=seed)
    if spec.startswith("upload:"):
        name = spec.removeprefix("upload:")
        try:
            path = Path(name).expanduser()
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise DatasetError(f"dataset file {short_repr(name)} {what}: give a JSONL or CSV file")
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                raise DatasetError(
                    f"dataset file {path} is over {MAX_UPLOAD_BYTES // 1_000_000} MB: use a smaller sample"
                )
            data = path.read_bytes()
        except (OSError, RuntimeError) as error:  # unreadable, a name too long, ~nosuchuser
            raise DatasetError(f"dataset file {short_repr(name)} cannot be read ({one_line(error)})") from None
        return parse_upload(data, path.name, seed=seed)
    if spec.startswith("hub:"):
        return hub_dataset(spec.removeprefix("hub:"), seed=seed)
    raise DatasetError(
        f"unknown dataset {spec!r}: a built-in task ({', '.join(BUILTIN_TASKS)}), upload:PATH or hub:REPO"
    )


class _Collator:
    """Right-pads input_ids / labels (-100) / attention_mask to the longest example of the batch."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(features), width), pad, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[i, :length] = torch.tensor(feature["input_ids"])
            labels[i, :length] = torch.tensor(feature["labels"])
            mask[i, :length] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _callback_class():
    from transformers import TrainerCallback

    class StoreCallback(TrainerCallback):
        """Writes each step's loss, learning rate, grad norm and tokens/s, and each eval loss, to the
        store; stops after the current step on cancel; fails the run on a NaN loss."""

        def __init__(self, store: Store, run_id: int, cancel: threading.Event) -> None:
            self.store, self.run_id, self.cancel = store, run_id, cancel
            self.tokens = 0
            self.start = time.perf_counter()
            self.last_time, self.last_tokens = self.start, 0
            self.nan_step: int | None = None
            self.train_losses: list[float] = []
            self.eval_losses: list[tuple[int, float]] = []
            self.tokens_per_s: list[float] = []
            self.baseline = None  # set to a callable that evaluates the base model

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last_time = time.perf_counter()
            self.last_tokens = self.tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self.cancel.is_set() or self.nan_step is not None:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now = time.perf_counter()
            if "loss" in logs:
                loss = float(logs["loss"])
                tokens = self.tokens = int(state.num_input_tokens_seen)  # non-padding training tokens
                rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_time, self.last_tokens = now, tokens
                self.train_losses.append(loss)
                self.tokens_per_s.append(rate)
                grad_norm = logs.get("grad_norm")
                self.store.add_metric(
                    self.run_id,
                    "train",
                    state.global_step,
                    loss=loss if math.isfinite(loss) else None,
                    learning_rate=logs.get("learning_rate"),
                    grad_norm=float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None,
                    tokens=tokens,
                    tokens_per_s=rate,
                    elapsed=now - self.start,
                )
                if not math.isfinite(loss):
                    self.nan_step = state.global_step
                    control.should_training_stop = True
                elif self.baseline is not None:
                    # The eval loss before training, taken once the first step's loss is stored so that
                    # point shows at once: with the adapters disabled the PEFT model is the base model.
                    evaluate, self.baseline = self.baseline, None
                    evaluate()
            if "eval_loss" in logs:
                self.record_eval(state.global_step, float(logs["eval_loss"]), now - self.start)
            if "baseline_loss" in logs:
                self.record_eval(0, float(logs["baseline_loss"]), 0.0)
                self.store.update_run(self.run_id, initial_eval_loss=float(logs["baseline_loss"]))
            return control

        def record_eval(self, step: int, loss: float, elapsed: float) -> None:
            self.eval_losses.append((step, loss))
            self.store.add_metric(self.run_id, "eval", step, loss=loss, tokens=self.tokens, elapsed=elapsed)

    return StoreCallback


@dataclass
class RunResult:
    run_id: int
    status: str
    trainable_params: int = 0
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_training(
    store: Store,
    run_id: int,
    config: TrainConfig,
    settings: LoraSettings,
    cancel=None,
) -> RunResult:
    """Train run `run_id` to the end, a cancel, or a failure; every outcome is written to the store
    (status, error, final losses, adapter files). Never raises for run failures. `cancel` is
    anything with `is_set()` (a `threading.Event`, or the runner's store-backed flag)."""
    cancel = cancel or threading.Event()
    store.update_run(run_id, status="running", started=time.time(), owner_pid=os.getpid())
    try:
        result = _train(store, run_id, config, settings, cancel)
    except Exception as error:
        message = _failure_message(error)
        store.update_run(run_id, status="failed", error=message, finished=time.time())
        return RunResult(run_id, "failed", error=message)
    return result


def _failure_message(error: BaseException) -> str:
    text = one_line(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory ({text}): lower the batch size or sequence length"
    return text if isinstance(error, (TrainingError, InputError)) else f"{type(error).__name__}: {text}"


def _train(
    store: Store, run_id: int, config: TrainConfig, settings: LoraSettings, cancel: threading.Event
) -> RunResult:
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lora_core.datasets import tokenize_examples

    problems = config.problems() + settings.problems()
    if problems:
        raise TrainingError("; ".join(problems))
    device = pick_device(config.device)
    store.update_run(run_id, device=device)
    dataset = load_dataset(config.dataset, config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, device)
    # every example the run will see, once: steps x batch (the Trainer shuffles them)
    train = tokenize_examples(dataset.train[: config.steps * config.batch_size], tokenizer, config.seq_len)
    evaluation = tokenize_examples(dataset.eval[: config.eval_examples], tokenizer, config.seq_len)
    longest = max((len(example["input_ids"]) for example in [*train, *evaluation]), default=config.seq_len)
    estimate_mb = run_memory_estimate_mb(model, settings, config, longest, device)
    peft_model = get_peft_model(model, copy.deepcopy(settings.to_peft_config()))
    trainable, total = peft_model.get_nb_trainable_parameters()
    store.update_run(
        run_id, trainable_params=trainable, all_params=total, memory_estimate_mb=estimate_mb, longest_seq=longest
    )
    callback = _callback_class()(store, run_id, cancel)
    scratch = store.scratch_dir(run_id)  # under the data dir: a killed run's is removed by the next Store.open
    try:
        args = TrainingArguments(
            output_dir=str(scratch),
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=eval_batch_size(config),
            learning_rate=config.learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(5, config.steps // 10),
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=config.eval_every,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=device == "cpu",
            bf16=_dtype(device) == torch.bfloat16,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
            logging_nan_inf_filter=False,  # a NaN loss must reach the callback, not be averaged away
        )
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=_Collator(tokenizer),
            callbacks=[callback],
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)

        def baseline() -> None:
            with peft_model.disable_adapter():
                trainer.evaluate(metric_key_prefix="baseline")

        callback.baseline = baseline
        _track_peak_memory_reset(device)
        trainer.train()
        if (
            callback.nan_step is None
            and not cancel.is_set()
            and (not callback.eval_losses or callback.eval_losses[-1][0] != trainer.state.global_step)
        ):
            final_eval = trainer.evaluate()["eval_loss"]
            callback.record_eval(trainer.state.global_step, float(final_eval), time.perf_counter() - callback.start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _finish(store, run_id, peft_model, callback, cancel, trainable, device)


def _finish(
    store: Store, run_id: int, peft_model, callback, cancel: threading.Event, trainable: int, device: str
) -> RunResult:
    rate = sum(callback.tokens_per_s[1:]) / max(len(callback.tokens_per_s) - 1, 1) if callback.tokens_per_s else 0.0
    base = RunResult(run_id, "completed", trainable, callback.train_losses, callback.eval_losses, rate)
    final_eval = callback.eval_losses[-1][1] if callback.eval_losses else None
    final_train = callback.train_losses[-1] if callback.train_losses else None
    fields = {"finished": time.time(), "final_eval_loss": final_eval, "peak_memory_mb": _peak_memory_mb(device)}
    if callback.nan_step is not None:
        base.status, base.error = "failed", f"the loss became NaN at step {callback.nan_step}: lower the learning rate"
        store.update_run(run_id, status="failed", error=base.error, final_train_loss=None, **fields)
        return base
    adapter_dir = store.adapter_dir(run_id)
    if process_rank() == 0:  # one writer under multi-GPU `accelerate launch`
        peft_model.save_pretrained(adapter_dir)
    base.status = "cancelled" if cancel.is_set() else "completed"
    store.update_run(run_id, status=base.status, final_train_loss=final_train, adapter_dir=str(adapter_dir), **fields)
    return base


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun ($RANK), 0 when alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def eval_batch_size(config: TrainConfig) -> int:
    """The evaluation batch of a run: at least 8, so the baseline and eval passes stay quick."""
    return max(config.batch_size, 8)


def memory_setup(config: TrainConfig, seq: int, device: str, attention: str = "sdpa"):
    """The estimator's `TrainSetup` for a run of `config` on `device`: the dtype the run loads the
    model in, its batch, `seq` tokens per example and its evaluation batch."""
    import torch

    from lora_core.memory import TrainSetup

    return TrainSetup(
        batch_size=config.batch_size,
        seq_len=seq,
        dtype="bf16" if _dtype(device) == torch.bfloat16 else "fp32",
        device="cuda" if device.startswith("cuda") else "cpu",
        attention=attention,
        eval_batch_size=eval_batch_size(config),
    )


def run_memory_estimate_mb(model, settings: LoraSettings, config: TrainConfig, seq: int, device: str):
    """`lora_core.memory`'s peak estimate for this run, from the loaded model's own config (its
    longest example as the sequence length: batches are padded to their longest); None when the
    estimator cannot take the model."""
    from lora_core.memory import estimate_memory
    from lora_core.models import inventory, spec_from_text

    if device == "mps":  # unified memory: the process's RSS is not what Metal holds
        return None
    try:
        spec = spec_from_text(
            model.config.to_json_string(use_diff=False), getattr(model, "name_or_path", "") or "model", "local"
        )
        setup = memory_setup(config, seq, device, _attention_of(model))
        return estimate_memory(inventory(spec), settings, setup).peak_bytes / 2**20
    except Exception:  # an estimate is a nicety: it never stops a run
        return None


def _attention_of(model) -> str:
    name = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return name if name in ("sdpa", "eager", "flash_attention_2") else "sdpa"


def _track_peak_memory_reset(device: str) -> None:
    """Start this run's peak: CUDA's counters, or the process's RSS high-water mark (Linux lets a
    process reset VmHWM; elsewhere the lifetime peak of the worker is what there is)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what earlier runs left, so the peak is this run's
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(device: str) -> float:
    """CUDA max allocated on GPU; the process's peak RSS on CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
