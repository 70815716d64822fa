"""A run from start to end: `run_training` trains one queued run with transformers' Trainer on a
PEFT model and writes every outcome to the store; the app's worker, the CLI and `accelerate
launch` all come through here."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

from lora_core.devices import pick_device, train_dtype
from lora_core.errors import InputError, one_line
from lora_core.settings import LoraSettings
from lora_core.store import RunWriter
from lora_core.training.config import TrainConfig, load_model_and_tokenizer
from lora_core.training.data import collator, load_dataset
from lora_core.training.errors import TrainingError
from lora_core.training.memory import eval_batch_size, peak_memory_mb, reset_peak_memory, run_memory_estimate_mb
from lora_core.training.trackers import tensorboard_callbacks, tracker_runs


@dataclass
class RunResult:
    """How a run ended: its status, losses, mean tokens/s and, when it failed, the reason."""

    run_id: int
    status: str
    trainable_params: int = 0
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class BaseModels:
    """The base model a process trains on, kept loaded from one run to the next on the same model
    and device: an experiment's trials load it once and each gets a fresh adapter on it.

    A run adds its adapter with `get_peft_model`, which changes the loaded model in place, and
    takes it out again with PEFT's `unload()` when it ends, however it ends; an init that rewrites
    the base weights (PiSSA, OLoRA) has them put back from a copy taken before. A model that cannot
    be restored is dropped, so the next run loads it afresh: no run ever sees another's adapter."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._loaded: tuple | None = None
        self.loads = 0  # how many times a model was loaded (tests and benchmarks read it)

    def get(self, name: str, device: str):
        """(model, tokenizer) of `name` on `device`, loaded unless it already is."""
        if self._key != (name, device) or self._loaded is None:
            self.clear()
            self._loaded = load_model_and_tokenizer(name, device)
            self._key = (name, device)
            self.loads += 1
        return self._loaded

    def keep_only(self, name: str | None, device: str | None = None) -> None:
        """Drop the loaded model unless it is `name` (on `device`, when given): what a worker calls
        between runs, so an idle worker holds no model and the next trial reuses it."""
        if self._key is None or name != self._key[0] or (device is not None and device != self._key[1]):
            self.clear()

    def clear(self) -> None:
        if self._loaded is None:
            return
        self._key, self._loaded = None, None
        import gc

        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_training(
    store: RunWriter,
    run_id: int,
    config: TrainConfig,
    settings: LoraSettings,
    cancel=None,
    base_models: BaseModels | None = None,
) -> RunResult:
    """Train run `run_id` to the end, a cancel, or a failure; every outcome is written to the store
    (status, error, final losses, adapter files). Never raises for run failures. `cancel` is
    anything with `is_set()` (a `threading.Event`, or the runner's store-backed flag). With
    `base_models`, the base model is taken from (and left, adapter removed, in) that cache."""
    cancel = cancel or threading.Event()
    store.update_run(
        run_id,
        status="running",
        started=time.time(),
        owner_pid=os.getpid(),
        trained_by=f"pid {os.getpid()} on {socket.gethostname()}",
    )
    try:
        result = _train(store, run_id, config, settings, cancel, base_models)
    except Exception as error:
        message = _failure_message(error)
        store.update_run(run_id, status="failed", error=message, finished=time.time())
        return RunResult(run_id, "failed", error=message)
    return result


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun ($RANK), 0 when alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _failure_message(error: BaseException) -> str:
    text = one_line(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory ({text}): lower the batch size or sequence length"
    return text if isinstance(error, (TrainingError, InputError)) else f"{type(error).__name__}: {text}"


def _train(
    store: RunWriter,
    run_id: int,
    config: TrainConfig,
    settings: LoraSettings,
    cancel,
    base_models: BaseModels | None = None,
) -> RunResult:
    from peft import get_peft_model
    from transformers import set_seed

    from lora_core.datasets import tokenize_examples

    problems = config.problems() + settings.problems()
    if problems:
        raise TrainingError("; ".join(problems))
    device = pick_device(config.device)
    store.update_run(run_id, device=device)
    dataset = load_dataset(config.dataset, config.seed)
    cache = base_models or BaseModels()
    model, tokenizer = cache.get(config.model, device)
    # every example the run will see, once: steps x batch (the Trainer shuffles them)
    train = tokenize_examples(dataset.train[: config.steps * config.batch_size], tokenizer, config.seq_len)
    evaluation = tokenize_examples(dataset.eval[: config.eval_examples], tokenizer, config.seq_len)
    longest = max((len(example["input_ids"]) for example in [*train, *evaluation]), default=config.seq_len)
    sizes = {
        "memory_estimate_mb": run_memory_estimate_mb(model, settings, config, longest, device),
        "longest_seq": longest,
    }
    peft_config = copy.deepcopy(settings.to_peft_config())
    saved = _base_weights(model, peft_config) if base_models is not None and rewrites_base(peft_config) else None
    # The adapter's initial weights depend on the seed alone, not on what this process ran before.
    set_seed(config.seed)
    try:
        peft_model = get_peft_model(model, peft_config)
    except Exception:
        if base_models is not None:  # PEFT leaves the layers it wrapped before the one that failed
            base_models.clear()
        raise
    try:
        with tracker_runs(config.report_to):
            return _train_adapter(
                store, run_id, config, cancel, device, peft_model, tokenizer, (train, evaluation), sizes
            )
    finally:
        if base_models is not None:
            if trains_base_tensors(peft_config):
                base_models.clear()
            else:
                _restore(base_models, peft_model, saved)


def rewrites_base(peft_config) -> bool:
    """Whether this LoraConfig's init rewrites the base layers' weights (PiSSA, OLoRA, CorDA, LoftQ)."""
    init = getattr(peft_config, "init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq"))


def trains_base_tensors(peft_config) -> bool:
    """Whether training changes tensors that `unload()` leaves in the base model: a bias
    (`bias` "all" / "lora_only" trains the base layers' own), `modules_to_save` (unload puts the
    trained copy in place of the module, untied from the embeddings) or trainable tokens."""
    return bool(
        getattr(peft_config, "bias", "none") != "none"
        or getattr(peft_config, "modules_to_save", None)
        or getattr(peft_config, "trainable_token_indices", None)
    )


def _base_weights(model, peft_config) -> dict:
    """A copy, in host memory, of the weights an init may rewrite: those of the layers the config
    targets (PEFT's own matching), not the whole model."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return {
        f"{name}.weight": module.weight.detach().to("cpu", copy=True)
        for name, module in model.named_modules()
        if name and getattr(module, "weight", None) is not None and check_target_module_exists(peft_config, name)
    }


def _restore(base_models: BaseModels, peft_model, saved: dict | None) -> None:
    """Take the run's adapter out of the cached base model (and its weights back, when an init
    rewrote them); a model that cannot be restored is dropped from the cache."""
    try:
        base = peft_model.unload()
        if saved is not None and base.load_state_dict(saved, strict=False).unexpected_keys:
            raise RuntimeError("the rewritten weights could not all be put back")  # dropped below
        for parameter in base.parameters():
            parameter.requires_grad_(True)  # as loaded: PEFT froze every base parameter
        base.train(False)
        with contextlib.suppress(AttributeError):
            del base.peft_config
    except Exception:
        base_models.clear()


def _train_adapter(
    store: RunWriter,
    run_id: int,
    config: TrainConfig,
    cancel,
    device: str,
    peft_model,
    tokenizer,
    examples: tuple[list, list],
    sizes: dict,
) -> RunResult:
    """Train the adapter of `peft_model` on (train, eval) `examples` with Trainer; `sizes` are the
    run's memory estimate and longest sequence, stored with its parameter counts."""
    import warnings

    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lora_core.training.callback import StoreCallback

    # transformers 5.24's own Trainer calls its deprecated name on every run: noise, not news.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    train, evaluation = examples
    trainable, total = peft_model.get_nb_trainable_parameters()
    store.update_run(run_id, trainable_params=trainable, all_params=total, **sizes)
    callback = StoreCallback(store, run_id, cancel)
    scratch = store.scratch_dir(run_id)  # under the data dir: a killed run's is removed by the next Store.open
    try:
        trainer = Trainer(
            model=peft_model,
            args=_training_arguments(config, device, str(scratch), run_id),
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=collator(tokenizer),
            callbacks=[callback, *tensorboard_callbacks(store, run_id, config.report_to)],
            optimizers=(_loraplus_optimizer(peft_model, config), None),
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)

        def baseline() -> None:
            with peft_model.disable_adapter():
                trainer.evaluate(metric_key_prefix="baseline")

        reset_peak_memory(device)
        if rewrites_base(peft_model.peft_config["default"]):
            # PiSSA / OLoRA moved part of each weight into the adapter: without it the model is the
            # residual, not the base. Before any step, base + adapter is the base model exactly.
            trainer.evaluate(metric_key_prefix="baseline")
        else:
            callback.baseline = baseline
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


def _loraplus_optimizer(peft_model, config: TrainConfig):
    """LoRA+'s AdamW (B learns `loraplus_ratio` times faster than A, PEFT's own builder), or None
    for the Trainer's default AdamW. Same defaults as the Trainer's: no weight decay."""
    if not config.loraplus_ratio:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        peft_model,
        torch.optim.AdamW,
        lr=config.learning_rate,
        loraplus_lr_ratio=float(config.loraplus_ratio),
        weight_decay=0.0,
    )


def _training_arguments(config: TrainConfig, device: str, output_dir: str, run_id: int = 0):
    """The Trainer's arguments for `config`: a constant learning rate after a short warmup, a log
    line every step, evaluation every `eval_every` steps, no checkpoints, and the trackers of
    `config.report_to` (none by default), which see the run as "run-<id>"."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
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
        report_to=[name for name in config.report_to if name != "tensorboard"],  # that one: tensorboard_callbacks
        run_name=f"run-{run_id}",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        bf16=train_dtype(device) == "bf16",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a NaN loss must reach the callback, not be averaged away
    )


def _finish(store: RunWriter, run_id: int, peft_model, callback, cancel, trainable: int, device: str) -> RunResult:
    rate = sum(callback.tokens_per_s[1:]) / max(len(callback.tokens_per_s) - 1, 1) if callback.tokens_per_s else 0.0
    base = RunResult(run_id, "completed", trainable, callback.train_losses, callback.eval_losses, rate)
    final_eval = callback.eval_losses[-1][1] if callback.eval_losses else None
    final_train = callback.train_losses[-1] if callback.train_losses else None
    fields = {"finished": time.time(), "final_eval_loss": final_eval, "peak_memory_mb": peak_memory_mb(device)}
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
