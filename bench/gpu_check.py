"""`make gpu-check`: the CUDA paths in one prepared run, one table, within 5 minutes on an H200.

On a machine with CUDA it
  (a) runs the GPU-marked tests (`pytest -m gpu` on the test files that carry the mark);
  (b) times the rank simulation and the dropout simulation at d=4096 on CUDA (synchronised), checks
      their results (finite losses that fall and never go below their closed-form floors; dropout's
      spread zero at p=0 and growing with p, equal to the CPU's), and times the same calls on the
      CPU at a size where that is cheap; and runs the Dropout page's study (360 configs in one batched
      program) on CUDA and on the CPU, comparing their held-out losses;
  (c) makes a short bf16 run of the embedded SmolLM2 through the app's own path
      (`python -m lora_core train --model embedded --dataset json_extraction --steps 20 --device cuda`)
      and reports its status, tokens/s, the dtypes it trained in, and its measured peak
      (`torch.cuda.max_memory_allocated()`) against its own estimate;
  (d) trains the embedded model a few steps for a few configs (q,v r=8 and all-linear r=16, batch
      4 x 256 and 16 x 512, on text long enough that every example fills the sequence) through the
      same CLI path and compares each measured peak with `lora_core.memory.estimate_memory` for the
      matching `TrainSetup` (`training.memory_setup`, unpadded: equal-length batches carry no mask);
  (e) runs an experiment of 4 trials (Q,V and all-linear x r=4 and 64) through `sweep` on one
      loaded model and checks that each trial completes on the GPU and that each trial's peak is
      its own (reset between trials) and within the estimate's goal.
Every part runs in a subprocess with a timeout taken from one overall budget (295 s by default).
It prints one table (check | result | time | detail) and exits 0 when every check passed, 1 when
any failed. `--out FILE` also writes the table to FILE and every subprocess's output to FILE.log.
Runs use a temporary LORA_EXPLORER_DATA, so the user's run store is untouched.

On a machine without CUDA it prints one line saying so and exits 0.

Run: `.venv/bin/python bench/gpu_check.py [--out artifacts/gpu-check.txt] [--budget 295]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

NO_CUDA_LINE = (
    "no CUDA device: gpu-check has nothing to run; torch {version} sees no CUDA GPU "
    "(run it on a machine with an NVIDIA GPU and a CUDA build of torch)"
)
PASS, FAIL = "PASS", "FAIL"
BUDGET_S = 295.0  # the 5 minutes, less a margin for the table and interpreter exit
MIN_START_S = 15.0  # a part is not started with less than this left
ESTIMATE_GOAL = 0.15  # the README's goal for the memory estimate's error
OBSERVED_TAG = "GPU_CHECK_OBSERVED "
RESULT_TAG = "GPU_CHECK_RESULT "
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# (b) realistic sizes: a 4096-wide projection (Llama-7B's hidden size), LoRA ranks up to 128
RANK_SIZE = {"d_in": 4096, "d_out": 4096, "true_rank": 16, "ranks": (4, 8, 16, 32, 64, 128)}
RANK_SIZE |= {"num_samples": 8192, "epochs": 200}
RANK_CPU_SIZE = {**RANK_SIZE, "d_in": 1024, "d_out": 1024, "num_samples": 2048, "epochs": 50}
DROPOUT_SIZE = {"d_in": 4096, "d_out": 4096, "rank": 64, "dropout_rates": (0.0, 0.05, 0.1, 0.2), "num_forward": 1000}
# the same code at sizes a 2-core CPU does in seconds (the tests of this script use them)
STUDY_SMALL = {"ranks": (1, 4), "rates": (0.0, 0.1), "samples": (16, 64), "seeds": 2, "steps": 20}
RANK_SMALL = {"d_in": 64, "d_out": 64, "true_rank": 4, "ranks": (2, 4, 8), "num_samples": 128, "epochs": 20}
DROPOUT_SMALL = {"d_in": 64, "d_out": 64, "rank": 8, "dropout_rates": (0.0, 0.1, 0.2), "num_forward": 50}

# (c) the app's run, as the issue states it
TRAIN_STEPS = 20
SWEEP_STEPS = 5
# (d) configs: LoRA settings as PEFT adapter_config fields, batch x sequence
QV_R8 = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
ALL_R16 = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
MEMORY_STEPS = 6


@dataclass(frozen=True)
class MemoryConfig:
    name: str
    lora: dict[str, Any]
    batch: int
    seq: int


MEMORY_CONFIGS = (
    MemoryConfig("q,v r=8, 4x256", QV_R8, 4, 256),
    MemoryConfig("q,v r=8, 16x512", QV_R8, 16, 512),
    MemoryConfig("all-linear r=16, 4x256", ALL_R16, 4, 256),
    MemoryConfig("all-linear r=16, 16x512", ALL_R16, 16, 512),
)


@dataclass(frozen=True)
class Row:
    check: str
    result: str  # PASS or FAIL
    seconds: float | None
    detail: str


# --- the table ----------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, columns check | result | time | detail, aligned; detail is the last
    column and kept on one line."""
    header = ("check", "result", "time", "detail")
    cells = [header] + [
        (r.check, r.result, "" if r.seconds is None else f"{r.seconds:.1f} s", " ".join(r.detail.split())) for r in rows
    ]
    widths = [max(len(cell[i]) for cell in cells) for i in range(4)]
    lines = []
    for index, cell in enumerate(cells):
        parts = [cell[0].ljust(widths[0]), cell[1].ljust(widths[1]), cell[2].rjust(widths[2]), cell[3]]
        lines.append(" | ".join(parts).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def total_row(rows: Sequence[Row], seconds: float, budget: float, device: str) -> Row:
    failed = [r.check for r in rows if r.result != PASS]
    detail = f"{len(rows) - len(failed)} of {len(rows)} checks passed; budget {budget:.0f} s; {device}"
    if failed:
        detail += "; failed: " + ", ".join(failed)
    return Row("total", FAIL if failed or not rows else PASS, seconds, detail)


# --- subprocesses and the budget ----------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def timeout(self, cap: float) -> float | None:
        """The timeout for a part capped at `cap` seconds, or None when too little is left to start it."""
        left = self.deadline - time.monotonic()
        return None if left < MIN_START_S else min(cap, left)


@dataclass
class Done:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def last_error(self) -> str:
        """The most telling line of a failed subprocess: its last stderr (else stdout) line."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1][:300]
        return f"exit code {self.returncode}, no output"


class Log:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, title: str, command: Sequence[str], done: Done) -> None:
        self.parts.append(
            f"=== {title}: {' '.join(command)}\n"
            f"exit {done.returncode}{' (timed out)' if done.timed_out else ''} after {done.seconds:.1f} s\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n"
        )

    def text(self) -> str:
        return "\n".join(self.parts)


def run_subprocess(command: Sequence[str], timeout: float, env: dict[str, str]) -> Done:
    """Run `command` in ROOT in its own process group; on timeout the whole group is killed."""
    start = time.perf_counter()
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except BaseException as error:  # the timeout, or Ctrl-C: end what this call started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        timed_out = True
    return Done(process.returncode, stdout, stderr, time.perf_counter() - start, timed_out)


def check_env(data_dir: Path) -> dict[str, str]:
    """The environment of every part: offline, a temporary run store."""
    env = dict(os.environ)
    env.update(
        LORA_EXPLORER_DATA=str(data_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def tagged_json(text: str, tag: str) -> dict | None:
    """The JSON object of the last line starting with `tag`."""
    for line in reversed(text.splitlines()):
        if line.startswith(tag):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line[len(tag) :])
    return None


def cli_run_json(stdout: str) -> dict | None:
    """`python -m lora_core train --json`'s object: the last stdout line that is a JSON object with a run id."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(line)
                if isinstance(data, dict) and "run_id" in data:
                    return data
    return None


# --- (a) the GPU-marked tests -------------------------------------------------------------------

_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b")
_GPU_MARK = re.compile(r"^\s*@pytest\.mark\.gpu\b", re.MULTILINE)
COUNT_KEYS = ("passed", "failed", "error", "skipped", "deselected", "xfailed", "xpassed", "warning")


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files (relative to `root`) that carry `pytest.mark.gpu`: collecting only these keeps
    the run short and independent of the browser tests' dependencies."""
    found = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if _GPU_MARK.search(path.read_text()):
                found.append(str(path.relative_to(root)))
    return found


def parse_pytest_summary(output: str) -> dict[str, int] | None:
    """Counts from pytest's final summary line ("1 failed, 2 passed, 250 deselected in 3.2s",
    "no tests ran in 0.1s", with or without ===), or None when there is none."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip().strip("=").strip()
        found = _COUNT.findall(line)
        if (found and re.search(r"\bin [\d.]+s", line)) or line.startswith("no tests ran"):
            counts = dict.fromkeys(COUNT_KEYS, 0)
            for number, word in found:
                counts[word[:-1] if word in ("errors", "warnings") else word] += int(number)
            return counts
    return None


def pytest_row(counts: dict[str, int] | None, done: Done, files: Sequence[str]) -> Row:
    """PASS when every selected GPU test passed: none failed, errored or was skipped (a skip on a
    CUDA machine means the path still has not run)."""
    where = ", ".join(Path(f).name for f in files) or "no file has the mark"
    if done.timed_out or counts is None:
        return Row("gpu tests (pytest -m gpu)", FAIL, done.seconds, f"{done.last_error()} ({where})")
    ok = (
        done.returncode == 0 and counts["passed"] > 0 and not (counts["failed"] or counts["error"] or counts["skipped"])
    )
    detail = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped ({where})"
    )
    if counts["skipped"]:
        detail += "; a skip on a CUDA machine leaves that path unverified"
    if counts["passed"] == 0 and not counts["failed"]:
        detail += "; no GPU test ran"
    return Row("gpu tests (pytest -m gpu)", PASS if ok else FAIL, done.seconds, detail)


def check_gpu_tests(budget: Budget, env: dict[str, str], log: Log) -> Row:
    files = gpu_test_files()
    timeout = budget.timeout(120)
    if timeout is None:
        return not_run("gpu tests (pytest -m gpu)", budget)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *files]
    done = run_subprocess(command, timeout, env)
    log.add("gpu tests", command, done)
    return pytest_row(parse_pytest_summary(done.stdout), done, files)


def not_run(check: str, budget: Budget) -> Row:
    return Row(check, FAIL, None, f"not run: the {budget.seconds:.0f} s budget is spent")


# --- (b) the simulations ------------------------------------------------------------------------


def simulation_worker(device: str, small: bool = False) -> dict[str, Any]:
    """Time and check the rank and dropout simulations on `device` (in a subprocess of the check)."""
    import numpy as np
    import torch

    from lora_core import devices, simulate

    cuda = device.startswith("cuda")

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if cuda:
            torch.cuda.synchronize()
        return value, time.perf_counter() - start

    rank_size = RANK_SMALL if small else RANK_SIZE
    dropout_size = DROPOUT_SMALL if small else DROPOUT_SIZE
    result: dict[str, Any] = {
        "device": device,
        "description": simulate.device_description(device),
        "auto_device": devices.pick_device(),
        "auto_rank_device": simulate.rank_sweep_device(),
    }
    # warm-up: the CUDA context, cuBLAS handles and the fused Adam kernel are no simulation's cost
    _, result["warmup_s"] = timed(lambda: simulate.simulate_rank_sweep(**RANK_SMALL, device=device))
    simulate.simulate_dropout(**DROPOUT_SMALL, device=device)

    sweep, seconds = timed(lambda: simulate.simulate_rank_sweep(**rank_size, device=device))
    losses = sweep.pivot(index="epoch", columns="rank", values="loss")
    floors = sweep.groupby("rank")["floor"].first()
    first, last = losses.iloc[0], losses.iloc[-1]
    rank = {
        "size": {k: list(v) if isinstance(v, tuple) else v for k, v in rank_size.items()},
        "seconds": seconds,
        "finite": bool(np.isfinite(sweep["loss"]).all() and np.isfinite(sweep["floor"]).all()),
        "all_decrease": bool((last < first).all()),
        # relative gap of each rank's last loss to its floor; a loss below its floor is a numerical error
        "min_gap": float(((last - floors) / floors).min()),
        "final": {str(r): [float(last[r]), float(floors[r])] for r in losses.columns},
    }
    with contextlib.suppress(Exception):  # the loop alone (private API): where the GPU time goes
        size = rank_size
        _target, x, y = simulate.make_rank_task(size["d_in"], size["d_out"], size["true_rank"], size["num_samples"])
        moments = simulate._moments(x, y)
        init_a = simulate.shared_init(max(size["ranks"]), size["d_in"], 42)
        ranks = sorted(size["ranks"])
        _, rank["loop_seconds"] = timed(
            lambda: simulate._train_concatenated(moments, init_a, ranks, size["epochs"], 0.01, device)
        )
    if cuda and not small:  # the same call on both devices at a size the CPU does in about a second
        cpu, cpu_s = timed(lambda: simulate.simulate_rank_sweep(**RANK_CPU_SIZE, device="cpu"))
        gpu, gpu_s = timed(lambda: simulate.simulate_rank_sweep(**RANK_CPU_SIZE, device=device))
        difference = np.abs(gpu["loss"].to_numpy() - cpu["loss"].to_numpy()) / np.abs(cpu["loss"].to_numpy())
        rank["compare"] = {
            "d": RANK_CPU_SIZE["d_in"],
            "cpu_s": cpu_s,
            "gpu_s": gpu_s,
            "max_rel": float(difference.max()),
        }
    result["rank"] = rank

    (stats, samples), seconds = timed(lambda: simulate.simulate_dropout(**dropout_size, device=device))
    hist, hist_s = timed(lambda: simulate.dropout_histogram(samples))
    (cpu_stats, _), cpu_s = timed(lambda: simulate.simulate_dropout(**dropout_size, device="cpu"))
    stds = stats["std"].to_numpy()
    scale = float(np.abs(stats[["min", "max"]].to_numpy()).max()) or 1.0
    rates = list(dropout_size["dropout_rates"])
    result["dropout"] = {
        "size": {k: list(v) if isinstance(v, tuple) else v for k, v in dropout_size.items()},
        "seconds": seconds,
        "histogram_s": hist_s,
        "cpu_s": cpu_s,
        "std": [float(s) for s in stds],
        "zero_at_p0": bool(0.0 not in rates or stds[rates.index(0.0)] <= 1e-6 * scale),
        "increasing": bool(np.all(np.diff(stds) > 0)),
        "histogram_complete": int(hist["count"].sum()) == len(samples),
        "max_rel_vs_cpu": float(np.max(np.abs(stds - cpu_stats["std"].to_numpy()) / np.maximum(stds, 1e-30))),
    }
    result["dropout_study"] = study_worker(device, small, timed)
    return result


def study_worker(device: str, small: bool, timed) -> dict[str, Any]:
    """The Dropout page's study (every rank x rate x n x seed in one batched program) on `device`
    and on the CPU: seconds each, and how far the held-out losses and the `clear` verdicts agree."""
    import dataclasses

    import numpy as np

    from lora_core import dropout_study

    study = dataclasses.replace(dropout_study.DEFAULT_STUDY, **STUDY_SMALL) if small else dropout_study.DEFAULT_STUDY
    curves, seconds = timed(lambda: dropout_study.run_dropout_study(study, device))
    cpu, cpu_s = timed(lambda: dropout_study.run_dropout_study(study, "cpu"))
    here, there = dropout_study.dropout_table(curves), dropout_study.dropout_table(cpu)
    loss, reference = here["loss_at_0"].to_numpy(), there["loss_at_0"].to_numpy()
    return {
        "configs": len(study.ranks) * len(study.rates) * len(study.samples) * study.seeds,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "finite": bool(np.isfinite(curves["heldout_loss"]).all()),
        "max_rel_vs_cpu": float(np.max(np.abs(loss - reference) / np.abs(reference))),
        "clear_differs": int((here["clear"].to_numpy() != there["clear"].to_numpy()).sum()),
        "cells": len(here),
    }


def study_row(study: dict[str, Any], where: str, pick_note: str, picks_ok: bool) -> Row:
    """PASS when the study's losses are finite and within 1e-2 of the CPU's (float32 sums differ by
    device); cells whose `clear` verdict flips are reported, as borderline cells may."""
    ok = picks_ok and study["finite"] and study["max_rel_vs_cpu"] < 1e-2
    detail = (
        f"{study['configs']} configs in one program on {where} (CPU {study['cpu_s']:.2f} s, "
        f"{study['cpu_s'] / max(study['seconds'], 1e-9):.1f}x); losses {'finite' if study['finite'] else 'NOT finite'}, "
        f"max rel. held-out difference to CPU {study['max_rel_vs_cpu']:.1e}, "
        f"{study['clear_differs']} of {study['cells']} 'clear' verdicts differ"
    )
    return Row("dropout study", PASS if ok else FAIL, study["seconds"], detail + pick_note)


def simulation_rows(result: dict[str, Any] | None, done: Done, expected: str = "cuda") -> list[Row]:
    """One row per simulation from `simulation_worker`'s result; PASS needs the app's automatic
    device pick to be `expected` too (the pages call the simulations without a device)."""
    if result is None:
        reason = done.last_error()
        return [
            Row("rank simulation", FAIL, done.seconds, reason),
            Row("dropout simulation", FAIL, None, reason),
            Row("dropout study", FAIL, None, reason),
        ]
    where = result["description"]
    picks_ok = result["auto_device"].startswith(expected) and result["auto_rank_device"].startswith(expected)
    pick_note = "" if picks_ok else f"; the app would pick {result['auto_rank_device']}, not {expected}"

    rank = result["rank"]
    size = rank["size"]
    ok = picks_ok and rank["finite"] and rank["all_decrease"] and rank["min_gap"] >= -1e-3
    detail = (
        f"d={size['d_in']}, n={size['num_samples']}, ranks {','.join(map(str, size['ranks']))}, "
        f"{size['epochs']} epochs on {where}"
    )
    if "loop_seconds" in rank:
        detail += f" (training loop {rank['loop_seconds']:.2f} s, the rest is CPU-side float64 statistics and floors)"
    detail += "; losses " + ("finite" if rank["finite"] else "NOT finite")
    detail += ", all fall" if rank["all_decrease"] else ", NOT all fall"
    detail += f", closest to floor {rank['min_gap']:+.1e}" + (" (below it!)" if rank["min_gap"] < -1e-3 else "")
    if "compare" in rank:
        c = rank["compare"]
        detail += (
            f"; d={c['d']}: CPU {c['cpu_s']:.2f} s vs {c['gpu_s']:.2f} s ({c['cpu_s'] / max(c['gpu_s'], 1e-9):.0f}x), "
            f"max rel. loss difference {c['max_rel']:.1e}"
        )
    rows = [Row("rank simulation", PASS if ok else FAIL, rank["seconds"], detail + pick_note)]

    drop = result["dropout"]
    size = drop["size"]
    ok = picks_ok and drop["zero_at_p0"] and drop["increasing"] and drop["histogram_complete"]
    ok = ok and drop["max_rel_vs_cpu"] < 1e-3
    detail = (
        f"d={size['d_in']}, rank {size['rank']}, {size['num_forward']} passes x {len(size['dropout_rates'])} rates "
        f"on {where} (histogram {drop['histogram_s']:.2f} s; CPU {drop['cpu_s']:.2f} s); std "
        + " < ".join(f"{s:.3g}" for s in drop["std"])
        + ("" if drop["increasing"] else " NOT increasing")
        + ("" if drop["zero_at_p0"] else "; NOT zero at p=0")
        + ("" if drop["histogram_complete"] else "; histogram loses samples")
        + f"; max rel. std difference to CPU {drop['max_rel_vs_cpu']:.1e}"
    )
    rows.append(Row("dropout simulation", PASS if ok else FAIL, drop["seconds"], detail + pick_note))
    rows.append(study_row(result["dropout_study"], where, pick_note, picks_ok))
    return rows


def check_simulations(budget: Budget, env: dict[str, str], log: Log) -> list[Row]:
    timeout = budget.timeout(90)
    if timeout is None:
        return [not_run(name, budget) for name in ("rank simulation", "dropout simulation", "dropout study")]
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "sim", "--device", "cuda"]
    done = run_subprocess(command, timeout, env)
    log.add("simulations", command, done)
    result = tagged_json(done.stdout, RESULT_TAG) if done.returncode == 0 else None
    return simulation_rows(result, done)


# --- (c), (d) training runs ---------------------------------------------------------------------


def train_worker(cli_args: Sequence[str]) -> int:
    """`python -m lora_core train ...` in this process, unchanged, with observers on the model the
    run loads and the PEFT model it builds: they print the dtypes it really trains in."""
    import peft

    import lora_core.training.run as training_run
    from lora_core.cli import main as cli_main

    load, get_peft_model = training_run.load_model_and_tokenizer, peft.get_peft_model

    def observe(**fields) -> None:
        print(OBSERVED_TAG + json.dumps(fields), flush=True)

    def observed_load(name, device):
        import torch

        model, tokenizer = load(name, device)
        observe(
            model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            attention=getattr(model.config, "_attn_implementation", None),
            bf16_supported=bool(device.startswith("cuda") and torch.cuda.is_bf16_supported()),
            gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None,
        )
        return model, tokenizer

    def observed_peft(model, *args, **kwargs):
        peft_model = get_peft_model(model, *args, **kwargs)
        trainable = {str(p.dtype).removeprefix("torch.") for p in peft_model.parameters() if p.requires_grad}
        observe(adapter_dtypes=sorted(trainable))
        return peft_model

    training_run.load_model_and_tokenizer = observed_load
    peft.get_peft_model = observed_peft
    return cli_main(["train", *cli_args])


@dataclass
class TrainOutcome:
    done: Done
    run: dict | None
    observed: dict = field(default_factory=dict)


def run_train(cli_args: Sequence[str], timeout: float, env: dict[str, str], log: Log, title: str) -> TrainOutcome:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "train", "--", *cli_args]
    done = run_subprocess(command, timeout, env)
    log.add(title, command, done)
    observed: dict = {}
    for line in done.stdout.splitlines():
        if line.startswith(OBSERVED_TAG):
            with contextlib.suppress(json.JSONDecodeError):
                observed.update(json.loads(line[len(OBSERVED_TAG) :]))
    return TrainOutcome(done, cli_run_json(done.stdout), observed)


def train_args(
    out_dir: Path,
    *,
    model: str = "embedded",
    dataset: str = "json_extraction",
    steps: int = TRAIN_STEPS,
    device: str = "cuda",
    batch: int | None = None,
    seq: int | None = None,
    eval_every: int | None = None,
    lora_file: Path | None = None,
) -> list[str]:
    args = ["--model", model, "--dataset", dataset, "--steps", str(steps), "--device", device]
    args += ["--json", "--out", str(out_dir)]
    for flag, value in (("--batch-size", batch), ("--seq-len", seq), ("--eval-every", eval_every)):
        if value is not None:
            args += [flag, str(value)]
    if lora_file is not None:
        args += ["--lora", str(lora_file)]
    return args


def estimate_error(estimate_mb: float | None, measured_mb: float | None) -> float | None:
    """estimate / measured - 1, or None when either is missing."""
    if not estimate_mb or not measured_mb:
        return None
    return estimate_mb / measured_mb - 1


def _run_failure(outcome: TrainOutcome) -> str | None:
    run = outcome.run
    if run is None:
        return outcome.done.last_error()
    if run.get("status") != "completed":
        return f"run {run.get('status')}: {run.get('error') or outcome.done.last_error()}"
    return None


def _dtypes(observed: dict) -> str:
    model = observed.get("model_dtype", "?")
    adapters = "/".join(observed.get("adapter_dtypes", ["?"]))
    return f"base {model}, adapters {adapters}"


def bf16_run_row(outcome: TrainOutcome) -> Row:
    """(c): completed, trained in bf16 where the GPU supports it, peak within the goal of its estimate."""
    check = "bf16 run, embedded model"
    failure = _run_failure(outcome)
    if failure:
        return Row(check, FAIL, outcome.done.seconds, failure)
    run, observed = outcome.run or {}, outcome.observed
    problems = []
    if observed.get("bf16_supported", True) and observed.get("model_dtype") != "bfloat16":
        problems.append(f"trained in {observed.get('model_dtype', 'an unknown dtype')}, not bfloat16")
    if not observed.get("bf16_supported", True):
        problems.append("this GPU has no bf16: the bf16 path is not checked")
    peak, estimate = run.get("peak_memory_mb"), run.get("memory_estimate_mb")
    error = estimate_error(estimate, peak)
    if error is None:
        problems.append("no peak or no estimate recorded")
    elif abs(error) > ESTIMATE_GOAL:
        problems.append(f"estimate off by more than {ESTIMATE_GOAL:.0%}")
    evals = run.get("eval_losses") or []
    losses = f"eval loss {evals[0][1]:.3f} -> {evals[-1][1]:.3f}" if evals else "no eval loss"
    memory = (
        f"peak {peak:,.0f} MiB vs its estimate {estimate:,.0f} MiB ({error:+.1%})"
        if error is not None
        else f"peak {peak} MiB, estimate {estimate} MiB"
    )
    detail = (
        f"{run.get('status')}, {len(run.get('train_losses') or [])} steps, {_dtypes(observed)}, "
        f"{run.get('tokens_per_s') or 0:,.0f} tokens/s, {losses}, {memory} (longest example {run.get('longest_seq')})"
    )
    if observed.get("gpu"):
        detail += f" on {observed['gpu']}"
    if problems:
        detail += "; " + "; ".join(problems)
    return Row(check, FAIL if problems else PASS, outcome.done.seconds, detail)


def sweep_args(out_dir: Path, model: str = "embedded", device: str = "cuda", steps: int = SWEEP_STEPS) -> list[str]:
    """Four trials of different sizes in one process: a trial's peak that was not reset after a
    larger one would show as the larger one's."""
    args = ["sweep", "--model", model, "--dataset", "json_extraction", "--steps", str(steps), "--device", device]
    return [
        *args,
        "--eval-every",
        str(steps),
        "--grid",
        "r=4,64",
        "--grid",
        "targets=Q,V|All linear",
        "--json",
        "--out",
        str(out_dir),
    ]


def run_sweep(cli_args: Sequence[str], timeout: float, env: dict[str, str], log: Log) -> tuple[Done, dict | None]:
    command = [sys.executable, "-m", "lora_core", *cli_args]
    done = run_subprocess(command, timeout, env)
    log.add("experiment", command, done)
    summary = None
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    return done, summary


def experiment_row(done: Done, summary: dict | None, device: str = "cuda") -> Row:
    """(e): an experiment's trials on one loaded model: every trial completes, in this process, and
    each trial's peak is its own (reset between trials), within the estimate's goal."""
    check = "experiment: 4 trials on one loaded model"
    if summary is None:
        return Row(check, FAIL, done.seconds, done.last_error())
    trials = summary.get("trials") or []
    problems = [f"trial {t['trial']} {t['status']}: {t['error']}" for t in trials if t["status"] != "completed"]
    if len(trials) != 4:
        problems.append(f"{len(trials)} trials, not 4")
    if any(not str(t.get("trained_by") or "").startswith("pid") for t in trials):
        problems.append("a trial did not train in this process")
    errors = [estimate_error(t.get("memory_estimate_mb"), t.get("peak_memory_mb")) for t in trials]
    if any(e is None or abs(e) > ESTIMATE_GOAL for e in errors):
        problems.append(f"a trial's peak is off its estimate by more than {ESTIMATE_GOAL:.0%}")
    detail = "; ".join(
        f"{t['label']}: {t.get('peak_memory_mb') or 0:,.0f} MiB ({e:+.1%})"
        if e is not None
        else f"{t['label']}: no peak"
        for t, e in zip(trials, errors, strict=True)
    )
    if problems:
        detail += "; " + "; ".join(problems)
    return Row(check, FAIL if problems else PASS, done.seconds, detail)


def check_experiment(budget: Budget, env: dict[str, str], log: Log, work: Path) -> Row:
    timeout = budget.timeout(90)
    if timeout is None:
        return not_run("experiment: 4 trials on one loaded model", budget)
    return experiment_row(*run_sweep(sweep_args(work / "store-experiment"), timeout, env, log))


def write_long_dataset(path: Path, rows: int = 200, words: int = 1000, seed: int = 0) -> Path:
    """JSONL of `text` rows long enough that every example fills a 512-token sequence, so each
    batch is exactly batch x seq tokens (and unpadded). 10% of the rows become the eval split."""
    vocabulary = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "this",
        "which",
        "are",
        "were",
        "an",
        "be",
        "or",
        "had",
        "not",
        "but",
        "have",
        "one",
        "all",
        "their",
        "they",
        "has",
        "been",
        "its",
        "who",
        "more",
        "would",
        "other",
        "when",
        "there",
        "some",
        "time",
        "can",
        "into",
        "river",
        "stone",
        "cloud",
        "garden",
        "window",
        "morning",
        "winter",
        "harbor",
        "market",
        "letter",
        "village",
        "mountain",
        "teacher",
    ]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for _ in range(rows):
            file.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words))}) + "\n")
    return path


def matching_setup(batch: int, seq: int, dtype: str, attention: str, padded: bool, device: str = "cuda"):
    """The estimator's `TrainSetup` for a CLI run of batch x seq: the run's own
    (`training.memory_setup`: evaluation batch, attention) with the dtype the run was seen to
    load, the device, and whether its batches carry a padding mask."""
    from lora_core.training import TrainConfig, memory_setup

    base = memory_setup(TrainConfig(batch_size=batch, seq_len=seq), seq, "cpu", attention)
    return replace(base, dtype=dtype, device=device, padded=padded)


def estimate_mb(model_dir: Path | str, lora: dict[str, Any], setup) -> tuple[float, str]:
    """`lora_core.memory.estimate_memory`'s peak (MiB) and peak phase for the model folder's config."""
    from lora_core.memory import estimate_memory
    from lora_core.models import inventory, resolve_model
    from lora_core.settings import LoraSettings

    estimate = estimate_memory(inventory(resolve_model(str(model_dir))), LoraSettings.from_peft_dict(lora), setup)
    return estimate.peak_bytes / 2**20, estimate.phase


def memory_row(config: MemoryConfig, outcome: TrainOutcome, estimate: tuple[float, str] | None) -> Row:
    """(d): the run's measured peak against the matching estimate (and, for reference, the run's
    own estimate, which assumes padded batches)."""
    check = f"memory: {config.name}"
    failure = _run_failure(outcome)
    if failure:
        return Row(check, FAIL, outcome.done.seconds, failure)
    run = outcome.run or {}
    peak = run.get("peak_memory_mb")
    problems = []
    if run.get("longest_seq") != config.seq:
        problems.append(f"longest example {run.get('longest_seq')} tokens, not {config.seq}: the data is too short")
    error = estimate_error(estimate[0] if estimate else None, peak)
    if estimate is None:
        problems.append("no estimate")
    if error is None:
        detail = f"peak {peak} MiB, estimate {estimate}"
    else:
        detail = f"peak {peak:,.0f} MiB, estimate {estimate[0]:,.0f} MiB ({error:+.1%}, {estimate[1]} phase)"
        if abs(error) > ESTIMATE_GOAL:
            problems.append(f"off by more than {ESTIMATE_GOAL:.0%}")
    own_error = estimate_error(run.get("memory_estimate_mb"), peak)
    if own_error is not None:
        detail += f"; the run's own estimate (padded) {run['memory_estimate_mb']:,.0f} MiB ({own_error:+.1%})"
    detail += f"; {_dtypes(outcome.observed)}, {run.get('tokens_per_s') or 0:,.0f} tokens/s"
    if problems:
        detail += "; " + "; ".join(problems)
    return Row(check, FAIL if problems else PASS, outcome.done.seconds, detail)


def prepare_embedded(budget: Budget, env: dict[str, str], log: Log) -> tuple[Path | None, Row | None]:
    """The embedded model's folder (converted from the GGUF once, cached); a FAIL row when it cannot be had."""
    check = "embedded model"
    timeout = budget.timeout(120)
    if timeout is None:
        return None, not_run(check, budget)
    code = "from lora_core.embedded import ensure_embedded; print(ensure_embedded())"
    command = [sys.executable, "-c", code]
    done = run_subprocess(command, timeout, env)
    log.add(check, command, done)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not Path(lines[-1]).is_dir():
        return None, Row(check, FAIL, done.seconds, done.last_error())
    return Path(lines[-1]), None


def check_bf16_run(budget: Budget, env: dict[str, str], log: Log, work: Path) -> Row:
    timeout = budget.timeout(90)
    if timeout is None:
        return not_run("bf16 run, embedded model", budget)
    args = train_args(work / "store")
    return bf16_run_row(run_train(args, timeout, env, log, "bf16 run"))


def check_memory(budget: Budget, env: dict[str, str], log: Log, work: Path, model_dir: Path) -> list[Row]:
    data = write_long_dataset(work / "long.jsonl")
    rows = []
    for index, config in enumerate(MEMORY_CONFIGS):
        timeout = budget.timeout(60)
        if timeout is None:
            rows.append(not_run(f"memory: {config.name}", budget))
            continue
        lora_file = work / f"lora-{index}" / "adapter_config.json"
        lora_file.parent.mkdir(parents=True, exist_ok=True)
        lora_file.write_text(json.dumps(config.lora))
        args = train_args(
            work / "store",
            dataset=f"upload:{data}",
            steps=MEMORY_STEPS,
            batch=config.batch,
            seq=config.seq,
            eval_every=MEMORY_STEPS,
            lora_file=lora_file,
        )
        outcome = run_train(args, timeout, env, log, f"memory {config.name}")
        estimate = None
        if outcome.run is not None:
            with contextlib.suppress(Exception):
                dtype = DTYPE_NAMES.get(outcome.observed.get("model_dtype", ""), "bf16")
                attention = outcome.observed.get("attention") or "sdpa"
                attention = attention if attention in ("sdpa", "eager", "flash_attention_2") else "sdpa"  # as the run
                setup = matching_setup(config.batch, config.seq, dtype, attention, padded=False)
                estimate = estimate_mb(model_dir, config.lora, setup)
        rows.append(memory_row(config, outcome, estimate))
    return rows


# --- the whole check ----------------------------------------------------------------------------


def run_checks(budget: Budget, log: Log) -> list[Row]:
    """Every part, in order of importance, within `budget`."""

    def say(text: str) -> None:
        print(f"gpu-check: {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        env = check_env(work / "data")
        say("GPU-marked tests")
        rows = [check_gpu_tests(budget, env, log)]
        say("rank and dropout simulations at d=4096")
        rows += check_simulations(budget, env, log)
        say("embedded model")
        model_dir, failure = prepare_embedded(budget, env, log)
        if model_dir is None:
            reason = f"needs the embedded model: {failure.detail if failure else 'unavailable'}"
            names = ["bf16 run, embedded model"] + [f"memory: {c.name}" for c in MEMORY_CONFIGS]
            return [*rows, *([failure] if failure else []), *(Row(n, FAIL, None, reason) for n in names)]
        say(f"bf16 run of the embedded model ({TRAIN_STEPS} steps)")
        rows.append(check_bf16_run(budget, env, log, work))
        say("memory estimate against max_memory_allocated for each config")
        rows += check_memory(budget, env, log, work, model_dir)
        say(f"an experiment of 4 trials of {SWEEP_STEPS} steps on one loaded model")
        rows.append(check_experiment(budget, env, log, work))
    return rows


def write_out(path: Path | None, text: str, log: Log | None = None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    if log is not None:
        Path(f"{path}.log").write_text(log.text())


def _worker(argv: Sequence[str]) -> int:
    kind, rest = argv[0], list(argv[1:])
    if kind == "train":
        return train_worker(rest[1:] if rest[:1] == ["--"] else rest)
    if kind == "sim":
        parser = argparse.ArgumentParser(prog="gpu_check.py --worker sim")
        parser.add_argument("--device", default="cuda")
        parser.add_argument("--small", action="store_true")
        args = parser.parse_args(rest)
        print(RESULT_TAG + json.dumps(simulation_worker(args.device, args.small)), flush=True)
        return 0
    print(f"error: unknown worker {kind!r}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"] and len(argv) > 1:
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table here (and the parts' output to OUT.log)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="overall time budget in seconds")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        line = NO_CUDA_LINE.format(version=torch.__version__)
        print(line)
        write_out(args.out, line)
        return 0
    start = time.perf_counter()
    budget, log = Budget(args.budget), Log()
    rows = run_checks(budget, log)
    device = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    with contextlib.suppress(Exception):
        device += f", {torch.cuda.get_device_name()}"
    rows.append(total_row(rows, time.perf_counter() - start, budget.seconds, device))
    table = format_table(rows)
    print(table)
    write_out(args.out, table, log)
    return 0 if all(row.result == PASS for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
