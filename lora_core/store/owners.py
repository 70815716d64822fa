"""Who is responsible for an active run, and when nobody is left who can finish it.

An active run names the process responsible for it (`owner_pid`, with the process's start time so
that a later process given the same pid cannot pass for it) and, when a server's worker trains it,
the server watching that worker (`watcher_pid`). Pids mean something only on the machine and in the
pid namespace that recorded them (`owner_host`), so runs recorded elsewhere are left to their own
readers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from lora_core.store.status import CLI

# The columns `stranded_reason` reads: what a query for the runs to check selects.
OWNER_COLUMNS = "id, status, owner, owner_pid, owner_started, owner_host, watcher_pid, watcher_started"

# Readers check the owners of active runs at most this often per store and process: the Fine-tune
# page polls every second, and a check costs a query plus a /proc read per active run.
OWNER_CHECK_EVERY = 1.0
_last_owner_check: dict[Path, float] = {}
_last_owner_check_lock = threading.Lock()

_HAVE_PROC = Path("/proc/self/stat").exists()


def _host_id() -> str:
    """This boot of this machine and this pid namespace, hashed: pids mean something only there.
    Two containers sharing a data volume, or a host CLI writing to a container's volume, each see
    the other's pids as dead; owners recorded elsewhere are left to their own readers."""
    import hashlib
    import socket

    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


HOST = _host_id()


def owner_check_due(data_dir: Path) -> bool:
    """Whether a reader of the store in `data_dir` should check its active runs' owners now: True at
    most once per OWNER_CHECK_EVERY seconds per store in this process, and a True is counted as
    the check done, so threads polling one store at once do not all check."""
    now = time.monotonic()
    with _last_owner_check_lock:
        if now - _last_owner_check.get(data_dir, float("-inf")) < OWNER_CHECK_EVERY:
            return False
        _last_owner_check[data_dir] = now
    return True


def stranded_reason(row: sqlite3.Row) -> str | None:
    """Why an active run can no longer finish, or None while a process lives that can finish it or
    report why not. A queued run's owner is the process that queued it: a server's worker stops
    claiming when its server is gone, and a CLI run is only ever trained by its own process.
    `row` holds at least the OWNER_COLUMNS."""
    if row["owner_host"] not in (None, HOST):
        return None  # recorded in another machine or pid namespace: its pids mean nothing here
    if process_alive(row["owner_pid"], row["owner_started"]):
        return None
    if process_alive(row["watcher_pid"], row["watcher_started"]):
        return None  # the server of the dead worker records the cause itself (RunManager._watch)
    pid, by_cli = row["owner_pid"], row["owner"] == CLI
    if row["status"] == "queued":
        if by_cli:
            return f"the process that queued it (pid {pid}) ended before the run started"
        return "the server stopped before the run started"
    if by_cli:
        return f"the training process (pid {pid}) ended without finishing the run (killed or crashed)"
    return "the server stopped during the run"


def process_started(pid: int | None) -> int | None:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat), or None where
    /proc does not say (another platform, or the process is gone)."""
    stat = _proc_stat(pid) if pid else None
    return stat[1] if stat else None


def process_alive(pid: int | None, started: int | None = None) -> bool:
    """Whether `pid` is still the process recorded with start time `started`. A zombie (killed but
    not yet reaped) is not, nor is a newer process given the same pid. Without /proc only the pid
    is checked, so there a reused pid keeps a dead owner alive."""
    if not pid:
        return False
    if _HAVE_PROC:
        stat = _proc_stat(pid)
        if stat is None:
            return False
        state, start = stat
        return state not in ("Z", "X", "x") and (started is None or start == started)
    if os.name == "nt":
        return True  # os.kill would terminate the process there: with no safe probe, never call it dead
    try:
        os.kill(pid, 0)
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of `pid` from /proc, or None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # Field 2, the command name, is in parentheses and may itself hold spaces or ')'; so fields are
    # counted from the last ')': field 3 (state) comes first and field 22 (start time) 19 later.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])
