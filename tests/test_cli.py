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
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: `r` must be a positive integer")
