"""Fine-tuning speed: the app's path (run manager, store, streaming callback) against a plain
PEFT + Trainer script with identical settings, same machine, same process; and the time from
Start to the first loss point.

Goals (issue 4): tokens/s ratio app / plain >= 0.95; first loss point within 10 s of Start on this
CPU with a warm model cache (the page polls the store every 2 s, so add <= 2 s on screen).

Run: `.venv/bin/python bench/bench_train.py [--steps 12]` (SmolLM2-135M-Instruct, json_extraction,
batch 4 x 128 tokens, r=8 q,v).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_core import LoraSettings
from lora_core.runner import RunManager
from lora_core.store import Store
from lora_core.training import TrainConfig

SETTINGS = LoraSettings(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))


def steady_rate(step_times: list[float], step_tokens: list[int]) -> float:
    """Tokens per second from the end of step 2 to the end of step N: the first step pays one-off
    costs on both paths, and the app's before-training eval runs right after step 1."""
    return (step_tokens[-1] - step_tokens[1]) / (step_times[-1] - step_times[1])


def plain_trainer(config: TrainConfig) -> float:
    """The reference: load, get_peft_model, Trainer.train(); a timing-only callback."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lora_core.datasets import tokenize_examples
    from lora_core.training import collator, load_dataset, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model, "cpu")
    data = tokenize_examples(
        load_dataset(config.dataset).train[: config.steps * config.batch_size], tokenizer, config.seq_len
    )
    peft_model = get_peft_model(model, copy.deepcopy(SETTINGS.to_peft_config()))
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

    scratch = tempfile.TemporaryDirectory(prefix="bench-train-")
    args = TrainingArguments(
        output_dir=scratch.name,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, config.steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        seed=config.seed,
        data_seed=config.seed,
    )
    with scratch:
        Trainer(
            model=peft_model, args=args, train_dataset=data, data_collator=collator(tokenizer), callbacks=[Clock()]
        ).train()
    return steady_rate(times, tokens)


def app_path(config: TrainConfig, data_dir: Path) -> tuple[float, float]:
    """The app's path: RunManager.submit, then read the store as the page does.
    Returns (steady tokens/s, seconds from submit to the first stored loss point)."""
    manager = RunManager(Store.open(data_dir))
    manager.wait_ready()  # the app starts its worker with the server, long before anyone presses Start
    start = time.perf_counter()
    run_id = manager.submit(config, SETTINGS, "bench")
    first = None
    while first is None:
        if not manager.store.metrics([run_id]).query("kind == 'train'").empty:
            first = time.perf_counter() - start
        time.sleep(0.05)
    run = manager.wait(run_id, 1800)
    if run["status"] != "completed":
        raise SystemExit(f"app run {run['status']}: {run['error']}")
    train = manager.store.metrics([run_id]).query("kind == 'train'")
    # the store's own clock: elapsed seconds and cumulative tokens at each step
    rate = steady_rate(train["elapsed"].tolist(), train["tokens"].tolist())
    manager.shutdown()
    return rate, first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternate plain/app this many times; best of each")
    args = parser.parse_args()
    from lora_core.embedded import ensure_embedded

    start = time.perf_counter()
    ensure_embedded()  # warm model cache, as the goal states
    print(f"embedded model cache ready in {time.perf_counter() - start:.1f} s")
    # eval_every > steps: the app's baseline eval still runs once after step 1 and is excluded from
    # the steady rate, which is measured between step 2 and the last step on both paths
    config = TrainConfig(dataset="json_extraction", steps=args.steps, eval_every=10_000, batch_size=4, seq_len=128)
    # This VM's speed drifts by +-20% over minutes: alternate the two paths and keep each one's best.
    plains, apps, firsts = [], [], []
    for _ in range(args.rounds):
        plains.append(plain_trainer(config))
        with tempfile.TemporaryDirectory() as data_dir:
            app, first = app_path(config, Path(data_dir))
        apps.append(app)
        firsts.append(first)
    plain, app, first = max(plains), max(apps), min(firsts)
    print(
        f"per round, plain: {', '.join(f'{v:.1f}' for v in plains)}; app: {', '.join(f'{v:.1f}' for v in apps)} tokens/s"
    )
    print(
        f"setup: SmolLM2-135M-Instruct, {config.dataset}, batch {config.batch_size} x {config.seq_len} tokens, r=8 q,v, {args.steps} steps, CPU"
    )
    print(f"plain PEFT + Trainer: {plain:,.1f} tokens/s")
    print(f"app path (manager + store + streaming callback): {app:,.1f} tokens/s")
    print(f"ratio app / plain: {app / plain:.3f} (goal >= 0.95)")
    print(f"Start -> first loss point in the store: {first:.2f} s (+ <= 2 s page poll; goal < 10 s)")


if __name__ == "__main__":
    main()
