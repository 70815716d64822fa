"""bench/gpu_check.py (`make gpu-check`): the CPU-only answer, and every piece of the CUDA branch
that runs without a GPU (table, pytest summary parsing, verdicts, the simulation and training
workers' plumbing on the CPU, the memory estimate's setup). The CUDA results themselves are only
produced on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_causal_lm

from lora_core.datasets import parse_upload
from lora_core.memory import TrainSetup
from lora_core.settings import LoraSettings
from lora_core.training import TrainConfig, memory_setup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
_spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer needs a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path) -> None:
    out = tmp_path / "gpu-check.txt"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: gpu-check has nothing to run; ")
    assert out.read_text().strip() == lines[0]


def test_with_cuda_available_the_cuda_branch_runs(monkeypatch, capsys) -> None:
    """Only the dispatch is checked: run_checks is replaced by a recorder that returns no rows, so
    the table has nothing but its total row (which fails: no check ran)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "run_checks", lambda budget, log: calls.append(budget.seconds) or [])
    code = gpu_check.main(["--budget", "123"])
    out = capsys.readouterr().out
    assert calls == [123.0]
    assert "no CUDA device" not in out
    assert out.splitlines()[0].split(" | ")[:2] == ["check", "result"] and "0 of 0 checks passed" in out
    assert code == 1


def test_table_columns_are_aligned() -> None:
    rows = [
        gpu_check.Row("gpu tests (pytest -m gpu)", "PASS", 12.345, "2 passed"),
        gpu_check.Row("memory: q,v r=8, 16x512", "FAIL", 101.0, "peak 1,234 MiB,\n estimate  1,100 MiB"),
        gpu_check.Row("embedded model", "FAIL", None, "not run"),
    ]
    rows.append(gpu_check.total_row(rows, 130.0, 295, "torch x"))
    lines = gpu_check.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert [cell.strip() for cell in lines[0].split(" | ")] == ["check", "result", "time", "detail"]
    assert set(lines[1]) == {"-", "+"}
    bars = {tuple(i for i, ch in enumerate(line) if ch == "|")[:3] for line in (lines[0], *lines[2:])}
    assert len(bars) == 1  # every row's first three separators at the same columns
    assert tuple(i for i, ch in enumerate(lines[1]) if ch == "+") == next(iter(bars))
    assert "12.3 s" in lines[2] and lines[3].endswith("peak 1,234 MiB, estimate 1,100 MiB")  # one line
    assert lines[4].split(" | ")[2].strip() == ""  # no time for a part that did not run
    assert "1 of 3 checks passed" in lines[-1] and "failed: memory: q,v r=8, 16x512, embedded model" in lines[-1]
    assert lines[-1].split(" | ")[1].strip() == "FAIL"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("2 passed, 250 deselected in 12.34s", {"passed": 2, "deselected": 250}),
        ("1 failed, 1 passed, 250 deselected, 3 warnings in 5.01s", {"failed": 1, "passed": 1, "warning": 3}),
        ("==== 2 skipped, 1 deselected in 0.50s ====", {"skipped": 2, "deselected": 1}),
        ("1 passed, 2 errors in 1.00s", {"passed": 1, "error": 2}),
        ("no tests ran in 0.01s", {"passed": 0}),
    ],
)
def test_pytest_summary_lines_are_parsed(line, expected) -> None:
    counts = gpu_check.parse_pytest_summary(f"....\nFAILED tests/x.py::t - 3 passed in a loop\n{line}\n")
    assert counts is not None
    assert {k: counts[k] for k in expected} == expected
    assert gpu_check.parse_pytest_summary("collecting ...\nInternalError\n") is None


def test_real_pytest_output_is_parsed_and_judged(tmp_path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.gpu\ndef test_a():\n    print('CUDA step: 10 MiB')\n"
        "@pytest.mark.gpu\ndef test_b():\n    assert False\n"
        "@pytest.mark.gpu\n@pytest.mark.skipif(True, reason='needs CUDA')\ndef test_c():\n    pass\n"
        "def test_not_gpu():\n    pass\n"
    )
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    command += ["-W", "ignore::pytest.PytestUnknownMarkWarning", "test_sample.py"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    outcome = gpu_check.Done(done.returncode, done.stdout, done.stderr, time.perf_counter() - start, False)
    counts = gpu_check.parse_pytest_summary(done.stdout)
    assert counts is not None and (counts["passed"], counts["failed"], counts["skipped"], counts["deselected"]) == (
        1,
        1,
        1,
        1,
    )
    row = gpu_check.pytest_row(counts, outcome, ["tests/test_sample.py"])
    assert row.result == "FAIL" and "1 passed, 1 failed, 0 errors, 1 skipped (test_sample.py)" in row.detail


def test_pytest_verdicts() -> None:
    ok = gpu_check.Done(0, "", "", 3.0, False)
    counts = dict.fromkeys(gpu_check.COUNT_KEYS, 0)
    assert gpu_check.pytest_row({**counts, "passed": 2}, ok, ["tests/test_memory.py"]).result == "PASS"
    skipped = gpu_check.pytest_row({**counts, "passed": 1, "skipped": 1}, ok, [])
    assert skipped.result == "FAIL" and "unverified" in skipped.detail
    assert gpu_check.pytest_row(counts, gpu_check.Done(5, "", "", 1.0, False), []).result == "FAIL"
    timed_out = gpu_check.pytest_row(None, gpu_check.Done(None, "", "", 120.0, True), [])
    assert timed_out.result == "FAIL" and "timed out after 120 s" in timed_out.detail


def test_the_gpu_marked_test_files_are_found() -> None:
    files = gpu_check.gpu_test_files()
    assert "tests/test_memory.py" in files and "tests/test_simulate.py" in files
    assert "tests/test_gpu_check.py" not in files  # the mark appears here only inside a string
    assert all((ROOT / f).is_file() for f in files)


def test_a_part_past_its_timeout_is_killed_and_the_budget_stops_new_parts() -> None:
    done = gpu_check.run_subprocess([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, {})
    assert done.timed_out and done.seconds < 10 and "timed out after 1 s" in done.last_error()
    assert gpu_check.Budget(5).timeout(60) is None  # less than MIN_START_S left
    assert gpu_check.Budget(100).timeout(60) == 60
    assert 30 < gpu_check.Budget(40).timeout(60) <= 40
    row = gpu_check.not_run("x", gpu_check.Budget(295))
    assert row.result == "FAIL" and "295 s budget is spent" in row.detail


def test_simulation_worker_on_the_cpu_and_its_verdicts(tmp_path) -> None:
    """The worker's real results at small sizes on the CPU; the verdict asks for the device the
    check expects, so the same results fail where CUDA was expected."""
    command = [sys.executable, str(SCRIPT), "--worker", "sim", "--device", "cpu", "--small"]
    done = gpu_check.run_subprocess(command, 120, gpu_check.check_env(tmp_path))
    assert done.returncode == 0, done.stderr
    result = gpu_check.tagged_json(done.stdout, gpu_check.RESULT_TAG)
    assert result is not None and result["device"] == "cpu"
    picked = "cuda" if torch.cuda.is_available() else "cpu"  # the app's automatic pick on this machine
    rank, dropout, study = gpu_check.simulation_rows(result, done, expected=picked)
    assert rank.result == "PASS" and dropout.result == "PASS" and study.result == "PASS", (rank, dropout, study)
    assert "16 configs in one program" in study.detail and "0 of 4 'clear' verdicts differ" in study.detail
    assert "d=64" in rank.detail and "all fall" in rank.detail and "training loop" in rank.detail
    assert dropout.detail.count("<") == 2 and result["dropout"]["std"][0] == 0.0
    if picked == "cpu":
        on_cuda = gpu_check.simulation_rows(result, done, expected="cuda")
        assert [r.result for r in on_cuda] == ["FAIL"] * 3 and "not cuda" in on_cuda[0].detail
    missing = gpu_check.simulation_rows(None, gpu_check.Done(1, "", "Traceback\nRuntimeError: boom\n", 2.0, False))
    assert [r.detail for r in missing] == ["RuntimeError: boom"] * 3


def test_realistic_sizes_are_the_issues() -> None:
    assert gpu_check.RANK_SIZE["d_in"] == gpu_check.RANK_SIZE["d_out"] == 4096
    assert gpu_check.DROPOUT_SIZE["d_in"] == gpu_check.DROPOUT_SIZE["d_out"] == 4096
    assert gpu_check.RANK_SIZE["num_samples"] >= gpu_check.RANK_SIZE["d_in"]  # a well-posed least squares


def test_lora_files_give_the_configs_settings() -> None:
    for config in gpu_check.MEMORY_CONFIGS:
        settings = LoraSettings.from_json(json.dumps(config.lora))  # how `train --lora FILE` reads it
        assert settings == LoraSettings.from_peft_dict(config.lora)
        assert settings.r in (8, 16) and settings.lora_dropout == 0.05


def test_the_long_dataset_fills_every_batch(tmp_path) -> None:
    path = gpu_check.write_long_dataset(tmp_path / "long.jsonl")
    dataset = parse_upload(path.read_bytes(), path.name)
    biggest = max(c.batch for c in gpu_check.MEMORY_CONFIGS)
    assert len(dataset.train) >= gpu_check.MEMORY_STEPS * biggest
    assert len(dataset.eval) >= biggest  # the evaluation batch max(batch, 8) is full too
    assert min(len(e.completion.split()) for e in dataset.train) >= 1000  # > 512 tokens for any tokenizer here


def test_matching_setup_is_the_runs_own_but_unpadded() -> None:
    own = memory_setup(TrainConfig(batch_size=16, seq_len=512), 512, "cpu", "sdpa")
    setup = gpu_check.matching_setup(16, 512, "bf16", "sdpa", padded=False)
    assert setup == TrainSetup(
        batch_size=16, seq_len=512, dtype="bf16", device="cuda", attention="sdpa", eval_batch_size=16, padded=False
    )
    assert gpu_check.matching_setup(4, 256, "fp32", "sdpa", padded=True, device="cpu") == memory_setup(
        TrainConfig(batch_size=4, seq_len=256), 256, "cpu", "sdpa"
    )
    assert own.eval_batch_size == setup.eval_batch_size


def test_estimates_for_the_memory_configs(capsys) -> None:
    """SmolLM2-135M's catalogue config has the embedded (Instruct) model's shape."""
    estimates = {}
    for config in gpu_check.MEMORY_CONFIGS:
        unpadded = gpu_check.matching_setup(config.batch, config.seq, "bf16", "sdpa", padded=False)
        padded = gpu_check.matching_setup(config.batch, config.seq, "bf16", "sdpa", padded=True)
        mib, phase = gpu_check.estimate_mb("HuggingFaceTB/SmolLM2-135M", config.lora, unpadded)
        padded_mib, _ = gpu_check.estimate_mb("HuggingFaceTB/SmolLM2-135M", config.lora, padded)
        assert 250 < mib <= padded_mib and phase in ("train", "eval")
        estimates[config.name] = mib
    with capsys.disabled():
        print("\nbf16 estimates (MiB): " + ", ".join(f"{k} {v:,.0f}" for k, v in estimates.items()))
    assert estimates["q,v r=8, 16x512"] > estimates["q,v r=8, 4x256"]
    assert estimates["all-linear r=16, 16x512"] > estimates["q,v r=8, 16x512"]


def test_run_rows_judge_what_the_run_reports() -> None:
    done = gpu_check.Done(0, "", "", 30.0, False)
    run = {
        "run_id": 1,
        "status": "completed",
        "train_losses": [2.0] * 20,
        "eval_losses": [[0, 2.5], [20, 1.0]],
        "tokens_per_s": 12345.0,
        "peak_memory_mb": 1000.0,
        "memory_estimate_mb": 1050.0,
        "longest_seq": 512,
    }
    observed = {"model_dtype": "bfloat16", "adapter_dtypes": ["float32"], "bf16_supported": True, "gpu": "G"}
    row = gpu_check.bf16_run_row(gpu_check.TrainOutcome(done, run, observed))
    assert row.result == "PASS" and "base bfloat16, adapters float32" in row.detail and "(+5.0%)" in row.detail
    fp32 = gpu_check.bf16_run_row(gpu_check.TrainOutcome(done, run, {**observed, "model_dtype": "float32"}))
    assert fp32.result == "FAIL" and "not bfloat16" in fp32.detail
    far = gpu_check.bf16_run_row(gpu_check.TrainOutcome(done, {**run, "memory_estimate_mb": 1200.0}, observed))
    assert far.result == "FAIL" and "more than 15%" in far.detail
    failed = gpu_check.bf16_run_row(gpu_check.TrainOutcome(done, {**run, "status": "failed", "error": "oom"}, {}))
    assert failed.result == "FAIL" and failed.detail == "run failed: oom"

    config = gpu_check.MEMORY_CONFIGS[1]
    row = gpu_check.memory_row(config, gpu_check.TrainOutcome(done, run, observed), (900.0, "train"))
    assert row.result == "PASS" and "estimate 900 MiB (-10.0%, train phase)" in row.detail
    assert "the run's own estimate (padded) 1,050 MiB (+5.0%)" in row.detail
    short = gpu_check.memory_row(config, gpu_check.TrainOutcome(done, {**run, "longest_seq": 80}, observed), (900, "x"))
    assert short.result == "FAIL" and "data is too short" in short.detail
    assert gpu_check.memory_row(config, gpu_check.TrainOutcome(done, run, observed), None).result == "FAIL"


def test_training_worker_plumbing_on_the_cpu(tmp_path) -> None:
    """The CLI path in the worker, with its observers, on a tiny model on the CPU: the run's JSON
    and the dtypes come back, every example fills the sequence, and the estimate built from the
    matching setup is the run's own when the setup matches it exactly."""
    model = build_tiny_causal_lm(tmp_path / "tiny")
    data = gpu_check.write_long_dataset(tmp_path / "long.jsonl", rows=40, words=200)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    lora_file = tmp_path / "lora" / "adapter_config.json"
    lora_file.parent.mkdir()
    lora_file.write_text(json.dumps(lora))
    args = gpu_check.train_args(
        tmp_path / "store",
        model=str(model),
        dataset=f"upload:{data}",
        steps=2,
        device="cpu",
        batch=2,
        seq=32,
        eval_every=2,
        lora_file=lora_file,
    )
    log = gpu_check.Log()
    outcome = gpu_check.run_train(args, 300, gpu_check.check_env(tmp_path / "data"), log, "tiny")
    assert outcome.run is not None, outcome.done.stderr[-2000:]
    run, observed = outcome.run, outcome.observed
    assert run["status"] == "completed" and len(run["train_losses"]) == 2 and run["longest_seq"] == 32
    assert observed["model_dtype"] == "float32" and observed["adapter_dtypes"] == ["float32"]
    assert observed["bf16_supported"] is False and observed["gpu"] is None and observed["attention"] == "sdpa"
    assert run["peak_memory_mb"] > 0 and run["memory_estimate_mb"] > 0
    assert (tmp_path / "store").is_dir() and "=== tiny:" in log.text()
    same = gpu_check.matching_setup(2, 32, "fp32", observed["attention"], padded=True, device="cpu")
    mib, _phase = gpu_check.estimate_mb(model, lora, same)
    assert mib == pytest.approx(run["memory_estimate_mb"], rel=1e-9)
    row = gpu_check.bf16_run_row(outcome)  # a CPU run is no bf16 run
    assert row.result == "FAIL" and "not bfloat16" not in row.detail and "no bf16" in row.detail


def test_experiment_rows_judge_each_trials_own_peak() -> None:
    done = gpu_check.Done(0, "", "", 30.0, False)
    trial = {"status": "completed", "error": None, "trained_by": "pid 1 on h", "label": "Q,V r=4"}
    trials = [{**trial, "trial": i, "peak_memory_mb": 1000.0, "memory_estimate_mb": 1100.0} for i in range(1, 5)]
    row = gpu_check.experiment_row(done, {"trials": trials})
    assert row.result == "PASS" and row.detail.count("(+10.0%)") == 4
    inflated = [*trials[:3], {**trials[3], "peak_memory_mb": 2000.0}]  # a peak not reset after a larger trial
    assert gpu_check.experiment_row(done, {"trials": inflated}).result == "FAIL"
    failed = [*trials[:3], {**trials[3], "status": "failed", "error": "oom"}]
    assert "trial 4 failed: oom" in gpu_check.experiment_row(done, {"trials": failed}).detail
    assert gpu_check.experiment_row(done, None).result == "FAIL"


def test_experiment_plumbing_on_the_cpu(tmp_path) -> None:
    model = build_tiny_causal_lm(tmp_path / "tiny")
    args = gpu_check.sweep_args(tmp_path / "store", model=str(model), device="cpu", steps=2)
    done, summary = gpu_check.run_sweep(args, 300, gpu_check.check_env(tmp_path / "data"), gpu_check.Log())
    assert summary is not None, done.stderr[-2000:]
    assert [t["status"] for t in summary["trials"]] == ["completed"] * 4
    assert [t["label"] for t in summary["trials"]] == ["Q,V r=4", "Q,V r=64", "All linear r=4", "All linear r=64"]
