"""Finding and checking an adapter: a folder, a zip, a run of the store, or a Hub id.

Whatever the source, what comes back is a folder holding `adapter_config.json` and
`adapter_model.safetensors` that passed the checks a hostile or broken file would fail (size caps,
a JSON object with a LoRA config, a safetensors header whose tensors lie inside the file, LoRA
weights present), so the spectra code can memory-map it without surprises. Pickled
`adapter_model.bin` files are refused, never unpickled. Every refusal is one `AdapterError` line.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lora_core.errors import InputError, is_int, one_line, short_repr

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1_000_000
# safetensors' own cap on its JSON header; a larger length field is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
# What a zip may unpack to: a 70B all-linear r=256 adapter is ~10 GB in bf16.
MAX_UNPACKED_BYTES = 64 * 2**30
# Trained float weights hardly compress (deflate saves ~10% on fp32 noise, ~2x on an untrained
# adapter whose B is all zeros), so an entry declaring more than MAX_RATIO times its compressed
# size is a bomb, not an adapter. Below RATIO_FREE_BYTES the ratio is not checked: a tiny test
# adapter of zeros may compress 1000:1 and is harmless. Together they cap what a zip unpacks to at
# max(RATIO_FREE_BYTES, MAX_RATIO x the zip's size) per entry.
MAX_RATIO = 100
RATIO_FREE_BYTES = 64 * 2**20
MAX_RANK = 65_536
# safetensors dtype names and their sizes in bytes; LoRA weights are floating point.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# A PEFT-saved LoRA weight: `<prefix>.<module>.lora_A.weight`, `...lora_embedding_B`, maybe with an
# adapter name before `.weight` (files saved by older PEFT versions).
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<which>A|B)(?:\.[^.]+)?\.weight|lora_embedding_(?P<emb>A|B)(?:\.[^.]+)?)$"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class AdapterError(InputError):
    """An adapter that cannot be read: the message names the source and what to fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the safetensors header: its dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Adapter:
    """A checked adapter folder. `config` is its adapter_config.json, `tensors` its safetensors
    header (name -> dtype and shape, nothing read), `label` how the user named it."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    label: str

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def open_adapter(
    source: str | Path,
    *,
    unpack_dir: Path | None = None,
    store_dir: Path | None = None,
    local_roots: tuple[Path, ...] | None = None,
) -> Adapter:
    """The adapter `source` names: a folder, a `.zip` (unpacked into `unpack_dir`), `run:<id>` (a
    run of the store in `store_dir`, default the app's data folder) or a Hub id `owner/name`.

    `local_roots` limits which local paths may be read (None: any, as the CLI; the app passes
    `lora_core.models.local_model_roots()`). Raises `AdapterError` in one line.
    """
    text = str(source).strip()
    if not text:
        raise AdapterError("no adapter given: a folder or .zip with adapter_config.json, run:<id> or a Hub id")
    if "\x00" in text or len(text) > 4096:
        raise AdapterError(f"{short_repr(text)}: not a path, run:<id> or Hub id")
    run = re.fullmatch(r"run:(\S+)", text)
    if run:
        return check_adapter(run_folder(run.group(1), store_dir), f"run {run.group(1)}")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~someone` for a user this machine does not have
        raise AdapterError(f"no such folder or zip: {short_repr(text)} (no such user's home)") from None
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or text.lower().endswith(".zip")
    if local_roots is not None and (looks_local or _exists(path)) and not _inside(path, local_roots):
        where = ", ".join(str(root) for root in local_roots) or "nowhere"
        raise AdapterError(f"{short_repr(text)}: local paths are limited to {where} on this server")
    if _exists(path):
        if path.is_dir():
            return check_adapter(path, text)
        if zipfile.is_zipfile(path):
            if unpack_dir is None:
                raise AdapterError(f"{short_repr(text)}: a zip needs a folder to unpack into")
            return open_zip(path, unpack_dir, text)
        raise AdapterError(f"{short_repr(text)} is a file but not a zip: give the adapter's folder or a .zip of it")
    if looks_local or not HUB_ID.match(text):
        raise AdapterError(f"no such folder or zip: {short_repr(text)}")
    return check_adapter(hub_folder(text), text)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    from lora_core.models import _inside as inside_roots

    return inside_roots(path, roots)


def run_folder(run_id: str, store_dir: Path | None) -> Path:
    """The adapter folder of run `run_id` of the store in `store_dir` (default: the app's data dir)."""
    from lora_core.store import Store, default_data_dir

    if not re.fullmatch(r"[0-9]{1,12}", run_id):  # ASCII only: str.isdigit also takes '１' and '²'
        raise AdapterError(f"run:{short_repr(run_id)}: a run id is a whole number, as the Fine-tune page lists them")
    data_dir = Path(store_dir) if store_dir is not None else default_data_dir()
    if not (data_dir / "runs.sqlite").is_file():
        raise AdapterError(f"run:{run_id}: there is no run store in {data_dir}")
    run = Store.open(data_dir).run(int(run_id))
    if run is None:
        raise AdapterError(f"run:{run_id}: no such run in {data_dir}")
    if not run.get("adapter_dir"):
        raise AdapterError(f"run:{run_id} is {run.get('status')} and left no adapter")
    return Path(run["adapter_dir"])


def hub_folder(repo_id: str) -> Path:
    """A local snapshot of the adapter files of Hub repo `repo_id` (from the HF cache when there).
    Offline (HF_HUB_OFFLINE, or no answer from the Hub) and not cached: one line saying so."""
    from huggingface_hub import snapshot_download

    from lora_core.models import hub_reachable

    patterns = [CONFIG_NAME, WEIGHTS_NAME]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache (huggingface_hub raises several types for that)
        pass
    if not hub_reachable():
        raise AdapterError(
            f"{repo_id} is not a local folder and the Hub is unreachable (offline): give a folder or zip"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # not found, gated, network: each a one-line reason from huggingface_hub
        raise AdapterError(f"{repo_id} could not be fetched from the Hub: {one_line(error)}") from None


def open_zip(archive: Path | Any, dest: Path, label: str) -> Adapter:
    """The adapter in zip `archive` (a path or a binary file object), unpacked into `dest` and
    checked; `dest` is removed again when the zip or the adapter in it is refused."""
    folder = unpack_zip(archive, dest, label)
    try:
        return check_adapter(folder, label)
    except AdapterError:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def unpack_zip(archive: Path | Any, dest: Path, label: str) -> Path:
    """Unpack the adapter files of zip `archive` (a path or a binary file object) into `dest`.

    `dest` belongs to the unpacker: what it held is replaced, and on any refusal it is removed, so
    a refused zip leaves nothing behind. Only `adapter_config.json` and `adapter_model.safetensors`
    are taken, both from the zip's top level or both from one folder below it; a name with `..`,
    an absolute name, a link, an encrypted entry, a declared size past the caps or a compression
    ratio past MAX_RATIO is refused before anything is written, and the bytes are counted while
    writing too (the directory could lie). Returns `dest`."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = _adapter_members(zipped, label)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for name, info in members.items():
                _copy_capped(zipped, info, dest / name, _size_cap(name, info, label), label)
    except AdapterError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as error:
        shutil.rmtree(dest, ignore_errors=True)
        raise AdapterError(f"{label}: not a readable zip ({one_line(error)})") from None
    except OSError as error:  # the disk is full, the folder cannot be made
        shutil.rmtree(dest, ignore_errors=True)
        raise AdapterError(f"{label}: the zip cannot be unpacked here ({error.strerror or one_line(error)})") from None
    return dest


def prune_unpacked(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently changed folders under `root`, so the zips a server
    unpacks do not pile up without bound."""
    try:
        folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:  # no such folder yet
        return
    for folder in folders[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def _adapter_members(zipped: zipfile.ZipFile, label: str) -> dict[str, zipfile.ZipInfo]:
    found: dict[str, zipfile.ZipInfo] = {}
    for info in zipped.infolist():
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.is_dir() or not parts or parts[-1] not in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if info.filename.startswith(("/", "\\")) or ".." in parts or len(parts) > 2 or ":" in parts[0]:
            raise AdapterError(f"{label}: the zip names {short_repr(info.filename)}, outside the adapter's folder")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise AdapterError(f"{label}: {short_repr(info.filename)} in the zip is a link; zip the files themselves")
        if info.flag_bits & 0x1:
            raise AdapterError(f"encrypted zip: {label} protects {parts[-1]} with a password; zip it without one")
        if parts[-1] in found:
            raise AdapterError(f"{label}: the zip holds more than one {parts[-1]}; zip one adapter")
        found[parts[-1]] = info
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in found]
    if missing:
        raise AdapterError(f"{label}: the zip holds no {' or '.join(missing)}; zip the adapter's folder")
    folders = {PurePosixPath(info.filename.replace("\\", "/")).parent for info in found.values()}
    if len(folders) > 1:
        raise AdapterError(
            f"{label}: the zip has {CONFIG_NAME} and {WEIGHTS_NAME} in different folders; zip one adapter's folder"
        )
    return found


def _size_cap(name: str, info: zipfile.ZipInfo, label: str) -> int:
    """The most bytes `info` may unpack to, after refusing what its declared size already gives away."""
    cap = MAX_CONFIG_BYTES if name == CONFIG_NAME else MAX_UNPACKED_BYTES
    size = info.file_size
    if size > cap:
        raise AdapterError(
            f"{label}: {name} in the zip declares {size / 1e6:,.0f} MB, over the {cap / 1e6:,.0f} MB cap"
        )
    if size > RATIO_FREE_BYTES and size > MAX_RATIO * max(info.compress_size, 1):
        raise AdapterError(
            f"{label}: {name} in the zip would unpack {size // max(info.compress_size, 1):,} times larger "
            f"than it is packed (more than {MAX_RATIO}:1): a zip bomb, not adapter weights"
        )
    return min(cap, size)


def _copy_capped(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, cap: int, label: str) -> int:
    written = 0
    with zipped.open(info) as source, target.open("wb") as out:
        while chunk := source.read(2**20):
            written += len(chunk)
            if written > cap:
                raise AdapterError(
                    f"{label}: {PurePosixPath(info.filename).name} unpacks to more than {cap / 1e6:,.2f} MB"
                )
            out.write(chunk)
    return written


def check_adapter(folder: Path, label: str) -> Adapter:
    """`folder` as an `Adapter`, after checking its config and the safetensors header."""
    if not folder.is_dir():
        raise AdapterError(f"{label}: the adapter folder {folder} is missing")
    if not (folder / WEIGHTS_NAME).is_file() and (folder / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{label}: adapter_model.bin is a pickle, which is never loaded here; save it as safetensors "
            "(PeftModel.save_pretrained does by default)"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise AdapterError(f"{label}: no {name} in it; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_config(folder / CONFIG_NAME, label)
    tensors = read_header(folder / WEIGHTS_NAME, label)
    if not any(LORA_KEY.match(name) for name in tensors):
        raise AdapterError(f"{label}: {WEIGHTS_NAME} holds no LoRA weights (lora_A / lora_B): not a LoRA adapter")
    return Adapter(folder, config, tensors, label)


def read_config(path: Path, label: str) -> dict[str, Any]:
    """The adapter_config.json at `path` as a dict, checked to be a LoRA config."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{label}: {CONFIG_NAME} is over {MAX_CONFIG_BYTES / 1e6:g} MB; not an adapter config")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8, bad JSON, an integer of thousands of digits
        raise AdapterError(f"{label}: {CONFIG_NAME} is not valid JSON ({one_line(error)})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{label}: {CONFIG_NAME} must hold a JSON object")
    problems = config_problems(config)
    if problems:
        raise AdapterError(f"{label}: {CONFIG_NAME}: " + "; ".join(problems))
    return config


def config_problems(config: dict[str, Any]) -> list[str]:
    """What makes `config` unusable as a LoRA adapter config, each naming the field."""
    problems = []
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        problems.append(f"`peft_type` is {short_repr(kind)}; only LoRA adapters (LORA) can be inspected")
    r = config.get("r", 8)
    if not (is_int(r) and 1 <= r <= MAX_RANK):
        problems.append(f"`r` must be an integer in 1..{MAX_RANK:,}, got {short_repr(r)}")
    if not _finite_number(config.get("lora_alpha", 8)):
        problems.append(f"`lora_alpha` must be a finite number, got {short_repr(config.get('lora_alpha'))}")
    for field, check in (
        ("rank_pattern", lambda v: is_int(v) and 1 <= v <= MAX_RANK),
        ("alpha_pattern", _finite_number),
    ):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            problems.append(f"`{field}` must map module names to {'ranks' if field == 'rank_pattern' else 'numbers'}")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(field, False), bool):
            problems.append(f"`{field}` must be true or false, got {short_repr(config.get(field))}")
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        problems.append("`target_parameters` must be a list of parameter names")
    return problems


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_header(path: Path, label: str) -> dict[str, TensorInfo]:
    """The tensors of the safetensors file at `path` (name -> dtype, shape), after checking that
    the header parses and every tensor's bytes lie inside the file: a truncated or foreign file
    fails here in one line, not in the reader."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise AdapterError(f"{label}: {WEIGHTS_NAME} is not a safetensors file (bad header length)")
        try:
            header = json.loads(file.read(length).decode("utf-8"))
        except (ValueError, RecursionError):
            raise AdapterError(f"{label}: {WEIGHTS_NAME} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{label}: {WEIGHTS_NAME} is not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        info = _tensor_info(entry, data_bytes)
        if info is None:
            raise AdapterError(f"{label}: {WEIGHTS_NAME} is corrupt or truncated (tensor {short_repr(name)})")
        tensors[name] = info
    return tensors


def _tensor_info(entry: object, data_bytes: int) -> TensorInfo | None:
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    itemsize = (FLOAT_DTYPES.get(dtype) or OTHER_DTYPES.get(dtype)) if isinstance(dtype, str) else None
    if (
        not isinstance(dtype, str)
        or itemsize is None
        or not isinstance(shape, list)
        or not all(is_int(n) and n >= 0 for n in shape)
    ):
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(n) for n in offsets)):
        return None
    start, end = offsets
    if not 0 <= start <= end <= data_bytes or end - start != math.prod(shape) * itemsize:
        return None
    return TensorInfo(dtype, tuple(shape))
