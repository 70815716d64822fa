"""Engine and UI stay two worlds: lora_core never imports streamlit, pages never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "lora_core").rglob("*.py")), ids=lambda p: p.name)
def test_engine_does_not_import_streamlit(path: Path) -> None:
    assert "streamlit" not in imported_modules(path)


@pytest.mark.parametrize("path", [ROOT / "app.py", *sorted((ROOT / "pages").rglob("*.py"))], ids=lambda p: p.name)
def test_ui_does_not_import_torch(path: Path) -> None:
    assert not {"torch", "transformers", "peft"} & imported_modules(path)
