"""Real training runs: a tiny random causal LM (seconds) and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny_model import build_nan_model, build_tiny_causal_lm

from lora_core import LoraSettings, count_lora_params
from lora_core.adapters import adapter_zip, effective_ranks
from lora_core.datasets import BUILTIN_TASKS, DatasetError, builtin_dataset, parse_upload, tokenize_examples
from lora_core.devices import train_dtype
from lora_core.errors import InputError
from lora_core.models import spec_from_text
from lora_core.runner import RunManager
from lora_core.store import Store
from lora_core.training import TrainConfig, collator, load_model_and_tokenizer, memory_setup, run_training

SETTINGS = LoraSettings(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> RunManager:
    """One worker process for the module (each spawn imports torch and transformers)."""
    manager = RunManager(Store.open(tmp_path_factory.mktemp("runs")))
    yield manager
    manager.shutdown()


def tiny_config(model: Path, **changes) -> TrainConfig:
    base = {
        "model": str(model),
        "dataset": "reverse_list",
        "steps": 12,
        "eval_every": 4,
        "seq_len": 64,
        "learning_rate": 1e-2,
    }
    return TrainConfig(**{**base, **changes})


def test_tiny_run_streams_every_step_and_saves_a_loadable_adapter(tiny_model, manager) -> None:
    run_id = manager.submit(tiny_config(tiny_model), SETTINGS, "tiny")
    run = manager.wait(run_id, 180)
    assert run["status"] == "completed", run["error"]
    metrics = manager.store.metrics([run_id])
    train = metrics[metrics["kind"] == "train"]
    evals = metrics[metrics["kind"] == "eval"]
    assert train["step"].tolist() == list(range(1, 13))
    assert train["loss"].notna().all() and (train["tokens_per_s"] > 0).all()
    assert train["learning_rate"].notna().all() and train["grad_norm"].notna().all()
    assert evals["step"].tolist() == [0, 4, 8, 12]
    assert run["initial_eval_loss"] == pytest.approx(evals["loss"].iloc[0])
    # the trainable count PEFT reports in the run equals the engine's count on the same config
    spec = spec_from_text((tiny_model / "config.json").read_text(), "tiny")
    assert run["trainable_params"] == count_lora_params(spec, SETTINGS).trainable_params
    assert LoraConfig.from_pretrained(run["adapter_dir"]).r == 4
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(_zip_names(adapter_zip(run["adapter_dir"])))
    summary, spectra = effective_ranks(run["adapter_dir"])
    assert len(summary) == 4  # 2 layers x (q, v)
    assert ((summary["effective_rank"] >= 1) & (summary["effective_rank"] <= 4)).all()
    assert len(spectra) == 4 * 4


def _zip_names(payload: bytes) -> list[str]:
    import io
    import zipfile

    return zipfile.ZipFile(io.BytesIO(payload)).namelist()


def test_cancel_stops_within_one_step(tiny_model, manager) -> None:
    run_id = manager.submit(tiny_config(tiny_model, steps=2000, eval_every=1000), SETTINGS)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        train = manager.store.metrics([run_id]).query("kind == 'train'")
        if len(train) >= 3:
            break
        time.sleep(0.05)
    manager.cancel(run_id)
    at_cancel = int(manager.store.metrics([run_id]).query("kind == 'train'")["step"].max())
    run = manager.wait(run_id, 60)
    last = int(manager.store.metrics([run_id]).query("kind == 'train'")["step"].max())
    assert run["status"] == "cancelled"
    assert last <= at_cancel + 2  # the step in flight, and at most one logged just before the flag was seen


def test_nan_loss_fails_the_run_and_the_worker_keeps_serving(tiny_model, manager, tmp_path) -> None:
    broken = build_nan_model(tiny_model, tmp_path / "nan-model")
    failed = manager.wait(manager.submit(tiny_config(broken, steps=5), SETTINGS), 120)
    assert failed["status"] == "failed" and "NaN" in failed["error"]
    after = manager.wait(manager.submit(tiny_config(tiny_model, steps=3), SETTINGS), 120)
    assert after["status"] == "completed"


@pytest.mark.parametrize(
    ("model", "dataset", "message"),
    [
        ("TINY", "upload:/no/such/file.jsonl", "does not exist"),
        ("TINY", "no_such_task", "unknown dataset"),
        ("TINY", "hub:../../etc", "not a Hub dataset id"),
        ("BERT", "reverse_list", "not a causal language model"),
        ("/no/such/model/folder", "reverse_list", "give a model folder"),
    ],
)
def test_unusable_inputs_are_refused_before_a_run_exists(
    tiny_model, manager, tmp_path, model, dataset, message
) -> None:
    """Before, each of these queued a run that then failed: a failed run stored per typo."""
    if model == "BERT":
        from transformers import BertConfig

        model = tmp_path / "bert"
        model.mkdir()
        config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        config.architectures = ["BertForMaskedLM"]
        config.save_pretrained(model)
    model = tiny_model if model == "TINY" else model
    before = len(manager.store.runs())
    with pytest.raises(InputError, match=message):
        manager.submit(tiny_config(model, dataset=dataset, steps=2), SETTINGS)
    assert len(manager.store.runs()) == before


def test_a_dataset_gone_after_queueing_fails_the_run_with_a_reason(tiny_model, tmp_path) -> None:
    """What the worker does when an input checked at submit is gone by the time it runs."""
    from lora_core.training import run_training

    store = Store.open(tmp_path / "store")
    config = tiny_config(tiny_model, dataset=f"upload:{tmp_path / 'gone.jsonl'}", steps=2)
    run_id = store.create_run("gone", config.model, config.dataset, SETTINGS.to_peft_dict(), {})
    result = run_training(store, run_id, config, SETTINGS)
    assert result.status == "failed" and "does not exist" in result.error
    assert store.run(run_id)["status"] == "failed" and not list((tmp_path / "store" / "scratch").glob("*"))


def right_padded(features: list[dict], pad_id: int) -> dict:
    """The batch a run trains on, built by hand: input_ids right-padded with the pad token to the
    longest example, labels with -100, and a mask of ones over each example's own tokens."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    gaps = [width - len(f["input_ids"]) for f in features]
    return {
        "input_ids": torch.tensor([f["input_ids"] + [pad_id] * gap for f, gap in zip(features, gaps)]),
        "attention_mask": torch.tensor([[1] * (width - gap) + [0] * gap for gap in gaps]),
        "labels": torch.tensor([f["labels"] + [-100] * gap for f, gap in zip(features, gaps)]),
    }


def assert_same_batch(batch, expected: dict) -> None:
    import torch

    assert list(batch.keys()) == list(expected)
    for name, tensor in expected.items():
        assert batch[name].dtype == torch.long and torch.equal(batch[name], tensor), name


def test_batches_are_right_padded_with_masked_labels_on_the_embedded_tokenizer() -> None:
    from transformers import AutoTokenizer

    from lora_core.embedded import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded())
    collate, padded = collator(tokenizer), 0
    for task in BUILTIN_TASKS:
        examples = tokenize_examples(builtin_dataset(task, 24, 4).train[:16], tokenizer, 64)
        for start in range(0, 16, 4):
            features = examples[start : start + 4]
            expected = right_padded(features, tokenizer.pad_token_id)
            assert_same_batch(collate(features), expected)
            padded += int((expected["attention_mask"] == 0).sum())
    assert padded > 0  # some batches mixed lengths, so the padding itself was compared


def test_a_left_padding_tokenizer_is_loaded_to_pad_on_the_right(tiny_model, tmp_path) -> None:
    import shutil

    from transformers import AutoTokenizer

    folder = shutil.copytree(tiny_model, tmp_path / "left")
    left = AutoTokenizer.from_pretrained(folder)
    left.padding_side = "left"
    left.save_pretrained(folder)
    _, tokenizer = load_model_and_tokenizer(str(folder), "cpu")
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    assert_same_batch(collator(tokenizer)(features), right_padded(features, tokenizer.pad_token_id))


@pytest.mark.parametrize(
    ("device", "bf16", "dtype"),
    [("cpu", True, "fp32"), ("mps", True, "fp32"), ("cuda", False, "fp32"), ("cuda:1", True, "bf16")],
)
def test_a_run_trains_in_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch, device, bf16, dtype) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert train_dtype(device) == dtype
    setup = memory_setup(TrainConfig(batch_size=2), 100, device)
    assert (setup.dtype, setup.device, setup.eval_batch_size) == (dtype, "cuda" if "cuda" in device else "cpu", 8)


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "4"])
def test_each_count_field_is_refused_unless_a_positive_integer(value) -> None:
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_examples"):
        problems = TrainConfig(**{name: value}).problems()
        assert problems == [f"`{name}` must be a positive integer, got {value!r}"]


def test_importing_the_training_package_imports_no_torch() -> None:
    """The CLI's and the pages' import of `lora_core.training` stays light; a run imports the rest."""
    code = "import sys, lora_core.training; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, env=_env(root)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_bad_config_is_refused_before_queueing(tiny_model, manager) -> None:
    before = len(manager.store.runs())
    with pytest.raises(InputError, match="`steps`") as error:
        manager.submit(tiny_config(tiny_model, steps=0, learning_rate=2.0), SETTINGS.replace(r=0))
    assert "`learning_rate`" in str(error.value) and "`r`" in str(error.value)
    assert len(manager.store.runs()) == before


def test_interrupted_run_is_marked_after_a_store_restart(tmp_path) -> None:
    store = Store.open(tmp_path / "data")
    run_id = store.create_run("left behind", "m", "d", {}, {})
    store.update_run(run_id, status="running")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_run(run_id, owner_pid=dead.pid)  # the process that owned it is gone
    reopened = Store.open(tmp_path / "data")
    run = reopened.run(run_id)
    assert run["status"] == "interrupted"
    assert "stopped" in run["error"]


def test_a_store_from_before_the_memory_columns_gains_them_and_keeps_its_runs(tmp_path) -> None:
    import sqlite3

    from lora_core.store.schema import SCHEMA

    schema = SCHEMA.replace("    memory_estimate_mb REAL,\n", "").replace("    longest_seq INTEGER,\n", "")
    assert "memory_estimate_mb" not in schema
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "runs.sqlite") as db:
        db.executescript(schema)
        db.execute(
            "INSERT INTO runs (name, status, model, dataset, settings, config, created) VALUES ('old run', 'completed', 'm', 'd', '{}', '{}', 0)"
        )
    store = Store.open(tmp_path / "data")
    old = store.runs()
    assert old["name"].tolist() == ["old run"] and {"memory_estimate_mb", "longest_seq"} <= set(old.columns)
    store.update_run(int(old["id"].iloc[0]), memory_estimate_mb=123.0, longest_seq=77)
    assert store.run(int(old["id"].iloc[0]))["longest_seq"] == 77
    Store.open(tmp_path / "data")  # a second open finds the columns there


def test_two_store_handles_see_the_same_runs(tmp_path) -> None:
    first, second = Store.open(tmp_path / "data"), Store.open(tmp_path / "data")
    run_id = first.create_run("shared", "m", "d", {"r": 4}, {"steps": 1})
    first.add_metric(run_id, "train", 1, loss=1.5, tokens=10)
    assert second.run(run_id)["settings"] == {"r": 4}
    assert second.metrics([run_id])["loss"].tolist() == [1.5]
    second.rename(run_id, "renamed")
    first.update_run(run_id, status="completed")
    first.delete(run_id)
    assert second.run(run_id) is None


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b'{"prompt": "a"}\n', "x.jsonl", "columns"),
        (b"not json\n", "x.jsonl", "line 1: not valid JSON"),
        (b"text\n" + b"hello\n" * 3, "x.csv", "at least 8"),
        (b"a,b\n1,2\n", "x.txt", ".jsonl or .csv"),
        (b"\xff\xfe\x00", "x.jsonl", "not UTF-8"),
        (b" " * 20_000_001, "x.jsonl", "capped"),
        (b'{"prompt": "a", "completion": ""}\n' * 10, "x.jsonl", "row 1: empty"),
        (b'{"text": "\\ud800 x"}\n' * 10, "x.jsonl", "row 1: text that is not valid Unicode"),
        (
            b'{"prompt": "ok", "completion": "ok"}\n' * 9 + b'{"prompt": "\\udfff", "completion": "b"}\n',
            "x.jsonl",
            "row 10",
        ),
    ],
)
def test_bad_uploads_are_refused_with_one_line(content: bytes, name: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as error:
        parse_upload(content, name)
    assert "\n" not in str(error.value)


def test_uploads_of_each_shape_parse(tmp_path) -> None:
    rows = [{"instruction": f"say {i}", "input": "politely", "output": f"hello {i}"} for i in range(20)]
    dataset = parse_upload("\n".join(json.dumps(r) for r in rows).encode(), "chat.jsonl")
    assert len(dataset.train) + len(dataset.eval) == 20
    assert "politely" in dataset.train[0].prompt
    csv_data = "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(10))
    assert len(parse_upload(csv_data.encode(), "pairs.csv").train) == 9
    text = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(10))
    assert parse_upload(text.encode(), "plain.jsonl").train[0].prompt == ""


def test_builtin_tasks_are_deterministic_with_disjoint_eval() -> None:
    first, second = (
        builtin_dataset("json_extraction", 200, 20, seed=1),
        builtin_dataset("json_extraction", 200, 20, seed=1),
    )
    assert first == second
    assert not {e.prompt for e in first.eval} & {e.prompt for e in first.train}
    assert json.loads(first.train[0].completion).keys() == {"name", "age", "city"}


def test_loss_is_on_completions_only(tiny_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset = builtin_dataset("date_format", 10, 2)
    encoded = tokenize_examples(dataset.train[:3], tokenizer, 128)
    for item, example in zip(encoded, dataset.train[:3]):
        kept = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
        assert tokenizer.decode(kept).startswith(example.completion)


def test_headless_cli_train_json(tiny_model, tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "lora_core", "train", "--model", str(tiny_model), "--dataset", "date_format"]
    command += ["--steps", "4", "--eval-every", "2", "--seq-len", "64", "--r", "4", "--targets", "q_proj,v_proj"]
    command += ["--out", str(tmp_path / "cli"), "--json"]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=_env(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed" and len(result["train_losses"]) == 4
    assert [step for step, _ in result["eval_losses"]] == [0, 2, 4]
    assert result["trainable_params"] > 0 and result["tokens_per_s"] > 0
    assert Store.open(tmp_path / "cli").run(result["run_id"])["status"] == "completed"


def _env(root: Path) -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}


@pytest.mark.slow
def test_embedded_smollm2_improves_on_a_builtin_task_in_30_steps(tmp_path) -> None:
    store = Store.open(tmp_path / "data")
    config = TrainConfig(
        dataset="json_extraction", steps=30, eval_every=10, batch_size=4, seq_len=128, learning_rate=1e-3
    )
    settings = LoraSettings(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    run_id = store.create_run("smollm2", config.model, config.dataset, settings.to_peft_dict(), {})
    result = run_training(store, run_id, config, settings)
    assert result.status == "completed", result.error
    losses = dict(result.eval_losses)
    assert losses[30] < 0.5 * losses[0]  # before training vs after 30 steps, same 32 held-out examples


def test_a_killed_worker_fails_its_run_and_a_fresh_worker_takes_over(tiny_model, manager) -> None:
    import os
    import signal

    run_id = manager.submit(tiny_config(tiny_model, steps=5000, eval_every=5000), SETTINGS)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and manager.store.metrics([run_id]).query("kind == 'train'").empty:
        time.sleep(0.05)
    worker = manager.store.run(run_id)["owner_pid"]
    os.kill(worker, signal.SIGKILL)  # what the kernel's OOM killer does
    run = manager.wait(run_id, 60)
    assert run["status"] == "failed" and "killed" in run["error"]
    assert manager.wait_ready(120)
    after = manager.wait(manager.submit(tiny_config(tiny_model, steps=3), SETTINGS), 180)
    assert after["status"] == "completed"


@pytest.mark.parametrize(
    ("content", "name"),
    [
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "deep.jsonl"),
        (b'text\n"' + b"x" * 200_000 + b'"\n', "wide.csv"),
    ],
)
def test_uploads_that_break_the_parsers_are_one_line(content: bytes, name: str) -> None:
    """A deeply nested JSON line (RecursionError) and a CSV field over csv's size limit (csv.Error)."""
    with pytest.raises(DatasetError) as error:
        parse_upload(content, name)
    assert "\n" not in str(error.value)


def test_a_later_row_missing_the_columns_is_one_line() -> None:
    rows = "".join(f'{{"prompt": "p{i}", "completion": "c{i}"}}\n' for i in range(8)) + '{"text": "x"}\n'
    with pytest.raises(DatasetError, match="row 9: empty, missing or non-text value"):
        parse_upload(rows.encode(), "mixed.jsonl")
