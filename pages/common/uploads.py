"""Uploads: every uploader goes through `file_upload`, and what it returns through `read_upload`.

Each uploader's rule (what it takes, its size cap, its suffixes) is checked on the server: the
browser's cap can be bypassed, and a client's file name is only ever shown, never used as a path.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

import streamlit as st

from lora_core.datasets import MAX_UPLOAD_BYTES, UPLOAD_SUFFIXES
from lora_core.errors import InputError
from lora_core.models import MAX_CONFIG_BYTES
from pages.common.text import printable

IMPORT_MAX_BYTES = 1_000_000  # an adapter_config.json or a full JSON export


@dataclass(frozen=True)
class UploadRule:
    """What one uploader takes, checked on the server: the browser's cap can be bypassed."""

    what: str
    max_bytes: int
    suffixes: tuple[str, ...]

    @property
    def max_mb(self) -> int:
        """The cap in Streamlit's upload unit (MiB), rounded up."""
        return math.ceil(self.max_bytes / 2**20)


DATASET_UPLOAD = UploadRule("a JSONL or CSV dataset", MAX_UPLOAD_BYTES, UPLOAD_SUFFIXES)
# Every uploader in the app, by widget key (`file_upload` refuses a key missing here). The largest
# cap is also the server's (.streamlit/config.toml `server.maxUploadSize`, checked by a test).
UPLOADS = {
    "lx_upload": UploadRule("a config.json", MAX_CONFIG_BYTES, (".json",)),
    "lx_import_upload": UploadRule("an adapter_config.json", IMPORT_MAX_BYTES, (".json",)),
    "lx_train_upload": DATASET_UPLOAD,
    "lx_exp_upload": DATASET_UPLOAD,
    "lx_adv_upload": DATASET_UPLOAD,
    "lx_advv_upload": DATASET_UPLOAD,
    "lx_inspect_upload": UploadRule("an adapter zip", MAX_UPLOAD_BYTES, (".zip",)),
}


class UploadError(InputError):
    """An upload refused before it is parsed: too big, empty, or not one of the uploader's types."""


@dataclass(frozen=True)
class Upload:
    """An upload that passed its uploader's rule. `name` is for display only, never a path."""

    data: bytes
    name: str
    suffix: str
    digest: str

    @property
    def stored_name(self) -> str:
        """The name to store it under: its content hash and its checked suffix."""
        return f"{self.digest[:16]}{self.suffix}"


def file_upload(label: str, key: str, where=None):
    """`st.file_uploader` for uploader `key` of `UPLOADS`; read what it returns with `read_upload`.

    No `type=`: Streamlit checks a file's suffix when it reads the widget's state, before the
    script runs, and a crafted name (a NUL byte, another suffix) becomes a traceback there.
    `read_upload` checks the suffix instead, with a message."""
    rule = UPLOADS[key]
    kinds = ", ".join(rule.suffixes)
    return (where or st).file_uploader(
        label, key=key, max_upload_size=rule.max_mb, help=f"{kinds}, at most {rule.max_bytes / 1e6:g} MB"
    )


def read_upload(key: str, upload) -> Upload:
    """The checked content of `upload` (a Streamlit UploadedFile) from uploader `key`."""
    rule = UPLOADS[key]
    size = getattr(upload, "size", None)
    if isinstance(size, int) and size > rule.max_bytes:  # before the bytes are copied
        raise UploadError(_too_big(display_name(upload.name), size, rule))
    return check_upload(key, upload.name, upload.getvalue())


def check_upload(key: str, name: str, data: bytes) -> Upload:
    """`data` uploaded as `name` to uploader `key`, checked against its rule before any parsing:
    size, then suffix (of the sanitised name), then content. Raises `UploadError` in one line."""
    rule = UPLOADS[key]
    shown = display_name(name)
    if len(data) > rule.max_bytes:
        raise UploadError(_too_big(shown, len(data), rule))
    suffix = _suffix(name)
    if suffix not in rule.suffixes:
        kinds = (
            ", ".join(rule.suffixes[:-1]) + " or " + rule.suffixes[-1] if len(rule.suffixes) > 1 else rule.suffixes[0]
        )
        raise UploadError(f"{shown}: use a {kinds} file ({rule.what})")
    if not data.strip():
        raise UploadError(f"{shown} is empty: choose {rule.what}")
    return Upload(data, shown, suffix, hashlib.sha256(data).hexdigest())


def _too_big(shown: str, size: int, rule: UploadRule) -> str:
    return f"{shown} is {size / 1e6:,.1f} MB; {rule.what} may be at most {rule.max_bytes / 1e6:g} MB"


def _base_name(name: str) -> str:
    """The last path part of a client-supplied name, cleaned (either slash counts)."""
    return printable(str(name)).replace("\\", "/").rsplit("/", 1)[-1].strip()


def _suffix(name: str) -> str:
    base = _base_name(name)
    return PurePosixPath(base).suffix.lower() if base not in ("", ".", "..") else ""


def display_name(name: str, limit: int = 80) -> str:
    """A client-supplied file name made safe to show: its last path part, without control or
    direction-override characters, at most `limit` characters (the suffix kept)."""
    base = _base_name(name) or "(unnamed file)"
    if len(base) > limit:
        suffix = PurePosixPath(base).suffix[:16]
        base = base[: limit - len(suffix) - 1] + "…" + suffix
    return base
