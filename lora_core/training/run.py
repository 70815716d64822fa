"""A run from start to end: `run_training` trains one queued run with transformers' Trainer on a
PEFT model and writes every outcome to the store; the app's worker, the CLI and `accelerate
launch` all come through here."""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

from lora_core.devices import pick_device, train_dtype
from lora_core.errors import InputError, one_line
from lora_core.settings import LoraSettings
from lora_core.store import Store
from lora_core.training.config import TrainConfig, load_model_and_tokenizer
from lora_core.training.data import collator, load_dataset
from lora_core.training.errors import TrainingError
from lora_core.training.memory import eval_batch_size, peak_memory_mb, reset_peak_memory, run_memory_estimate_mb


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


def _train(store: Store, run_id: int, config: TrainConfig, settings: LoraSettings, cancel) -> RunResult:
    from peft import get_peft_model
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lora_core.datasets import tokenize_examples
    from lora_core.training.callback import StoreCallback

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
    callback = StoreCallback(store, run_id, cancel)
    scratch = store.scratch_dir(run_id)  # under the data dir: a killed run's is removed by the next Store.open
    try:
        trainer = Trainer(
            model=peft_model,
            args=_training_arguments(config, device, str(scratch)),
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=collator(tokenizer),
            callbacks=[callback],
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)

        def baseline() -> None:
            with peft_model.disable_adapter():
                trainer.evaluate(metric_key_prefix="baseline")

        callback.baseline = baseline
        reset_peak_memory(device)
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


def _training_arguments(config: TrainConfig, device: str, output_dir: str):
    """The Trainer's arguments for `config`: a constant learning rate after a short warmup, a log
    line every step, evaluation every `eval_every` steps, no checkpoints."""
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
        report_to=[],
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


def _finish(store: Store, run_id: int, peft_model, callback, cancel, trainable: int, device: str) -> RunResult:
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
