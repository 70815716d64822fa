"""`python -m lora_core`: tables, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_count_table(capsys) -> None:
    code, out, _ = run(capsys, "count", "--model", "facebook/opt-125m", "--r", "16", "--targets", "q_proj,v_proj")
    assert code == 0
    assert "589,824" in out and "attn_q" in out


def test_count_json_keys(capsys) -> None:
    code, out, _ = run(
        capsys, "count", "--model", "facebook/opt-125m", "--r", "16", "--targets", "q_proj,v_proj", "--json"
    )
    data = json.loads(out)
    assert code == 0
    assert data["trainable_params"] == 589_824
    assert {"model", "trainable_params", "all_params", "base_params", "percent_trainable", "modules"} <= set(data)


def test_rank_pattern_flag(capsys) -> None:
    argv = ["count", "--model", "facebook/opt-125m", "--r", "8", "--alpha", "16", "--targets", "q_proj,v_proj,fc1,fc2"]
    code, out, _ = run(capsys, *argv, "--rank-pattern", "fc1=32", "--rank-pattern", "fc2=32", "--json")
    assert code == 0 and json.loads(out)["trainable_params"] == 3_244_032


def test_several_lora_files_give_a_list(capsys, tmp_path) -> None:
    from lora_core import LoraSettings

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(LoraSettings(r=16, lora_alpha=16, target_modules=("q_proj", "v_proj")).to_json())
    second.write_text(LoraSettings(r=16, lora_alpha=16, target_modules="all-linear").to_json())
    code, out, _ = run(
        capsys, "count", "--model", "facebook/opt-125m", "--lora", str(first), "--lora", str(second), "--json"
    )
    data = json.loads(out)
    assert code == 0 and [d["trainable_params"] for d in data] == [589_824, 1_327_104 * 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["count", "--model", "facebook/opt-125m", "--r", "0"], "`r` must be a positive integer"),
        (["count", "--model", "facebook/opt-125m", "--targets", "nothing"], "matches no module"),
        (["count", "--model", "nobody/no-such-model"], "catalogue"),
        (["count", "--model", "facebook/opt-125m", "--lora", "/no/such.json"], "no such file"),
        (["count", "--model", "facebook/opt-125m", "--rank-pattern", "fc1"], "KEY=VALUE"),
        (["count", "--model", "facebook/opt-125m", "--layers", "a-b"], "--layers"),
        (["count", "--model", "facebook/opt-125m", "--r", "x"], "invalid int"),
        (["count"], "--model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_malformed_lora_file(capsys, tmp_path) -> None:
    bad = tmp_path / "adapter_config.json"
    bad.write_text("{broken")
    code, _, err = run(capsys, "count", "--model", "facebook/opt-125m", "--lora", str(tmp_path))
    assert code == 2 and "not valid JSON" in err


def test_strategies_and_search_commands(capsys) -> None:
    code, out, _ = run(capsys, "strategies", "--model", "openai-community/gpt2", "--json")
    assert code == 0 and [row["strategy"] for row in json.loads(out)] == [
        "Q,V",
        "All attention",
        "FFN only",
        "All linear",
    ]
    code, out, _ = run(capsys, "search", "--model", "facebook/opt-125m", "--space", "balanced", "--json")
    assert code == 0 and len(json.loads(out)) == 36


def test_module_entry_point_runs_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_core", "count", "--model", "facebook/opt-125m", "--r", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: `r` must be a positive integer")


# --- the contract under hostile input: exit 2, one line on stderr, nothing created -------------------


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "binary": tmp_path / "binary.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "folder": tmp_path / "folder.jsonl",
        "modules_to_save": tmp_path / "mts.json",
        "wrong_types": tmp_path / "types.json",
    }
    files["binary"].write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 100)
    files["empty"].write_bytes(b"")
    files["folder"].mkdir()
    files["modules_to_save"].write_text('{"r": 8, "target_modules": ["q_proj"], "modules_to_save": 5}')
    files["wrong_types"].write_text('{"r": "8", "lora_alpha": [16], "lora_dropout": "x", "target_modules": ["q_proj"]}')
    return files


HOSTILE_ARGV = [
    (["count", "--model", "facebook/opt-125m", "--targets", "re:["], "`target_modules` '[' is not a valid regex"),
    (["count", "--model", "facebook/opt-125m", "--targets", "q_proj", "--rank-pattern", "[=4"], "`rank_pattern key`"),
    (["count", "--model", "facebook/opt-125m", "--targets", "q_proj", "--layers", "0-99999999"], "from 0 to 1023"),
    (["count", "--model", "/bin/ls"], "not UTF-8 text"),
    (["count", "--model", "facebook/opt-125m", "--lora", "{modules_to_save}"], "`modules_to_save` must be a list"),
    (["count", "--model", "facebook/opt-125m", "--lora", "{wrong_types}"], "`r` must be a positive integer"),
    (["export", "--model", "facebook/opt-125m", "--lora", "{modules_to_save}"], "`modules_to_save`"),
    (["strategies", "--model", "facebook/opt-125m", "--r", "0"], "`r` must be a positive integer"),
    (
        ["count", "--model", "facebook/opt-125m", "--targets", "q_proj", "--use-dora", "--lora-bias"],
        "LoraConfig refuses",
    ),
    (
        ["count", "--model", "facebook/opt-125m", "--targets", "q_proj", "--rank-pattern", "(?i)q=4"],
        "`rank_pattern key`",
    ),
    (["count", "--model", "a" * 300], "not a usable path"),
    (["memory", "--model", "facebook/opt-125m", "--batch", "1000000000000"], "`batch_size` must be a positive"),
    (["train", "--dataset", "upload:/no/such/file.jsonl"], "does not exist"),
    (["train", "--dataset", "upload:{empty}"], "has no rows"),
    (["train", "--dataset", "upload:{binary}"], "not UTF-8 text"),
    (["train", "--dataset", "upload:{folder}"], "is not a file"),
    (["train", "--dataset", "no_such_task"], "unknown dataset"),
    (["train", "--device", "banana"], "`device` must be cpu, cuda, cuda:N or mps"),
    (["train", "--steps", "0"], "`steps`"),
    (["train", "--targets", "re:("], "not a valid regex"),
    (["train", "--model", "/no/such/folder"], "give a model folder"),
    (["train", "--out", "/proc/x"], "--out /proc/x: cannot keep the run store there"),
]


@pytest.mark.parametrize(("argv", "message"), HOSTILE_ARGV)
def test_hostile_input_exits_2_with_one_line_and_creates_no_run(capsys, tmp_path, monkeypatch, argv, message) -> None:
    """Before: tracebacks (re.error, UnicodeDecodeError, TypeError), 6.9 GB for a layer range, and
    `train` exiting 1 or 0 with the reason only in its JSON and a failed run stored each time."""
    files = _hostile_files(tmp_path)
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    argv = [part.format(**files) for part in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert message in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert out == ""
    assert not (tmp_path / "data").exists(), "bad input must not create a store or a run"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_a_missing_cuda_device_is_bad_input(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "train", "--device", "cuda", "--out", str(tmp_path / "s"))
    assert code == 2 and "CUDA is not available" in err and not (tmp_path / "s").exists()


def test_unknown_keys_in_a_lora_file_are_warned_about(capsys, tmp_path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text('{"r": 8, "target_modules": ["q_proj"], "favourite_colour": "blue"}')
    code, out, err = run(capsys, "count", "--model", "facebook/opt-125m", "--lora", str(config))
    assert code == 0 and "trainable params" in out
    assert err.strip() == f"warning: --lora {config}: ignored keys PEFT's LoraConfig does not know: favourite_colour"


def test_an_internal_bug_is_not_reported_as_bad_input(capsys, monkeypatch) -> None:
    """Only the engine's own error type means bad input: a ValueError from a bug keeps its traceback."""
    import lora_core.strategies

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(lora_core.strategies, "compare_strategies", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["strategies", "--model", "facebook/opt-125m"])


def test_json_output_is_strict_json_whatever_the_numbers() -> None:
    """json.dumps writes a plain NaN float as `NaN` without asking `default`; every --json goes
    through json_text, which writes null for NaN, infinity and pandas' NA."""
    import numpy as np
    import pandas as pd

    from lora_core.cli import json_text

    data = {"a": float("nan"), "b": [np.float64("inf"), np.int64(3), pd.NA], "c": (1.5, -np.inf), "d": "x"}
    text = json_text(data)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}")) == {
        "a": None,
        "b": [None, 3, None],
        "c": [1.5, None],
        "d": "x",
    }
