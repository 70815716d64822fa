"""The run store: SQLite in WAL mode, shared by every browser session, the CLI and restarts.

Each call opens its own short-lived connection, so the training thread, Streamlit's script
threads and other processes can use one store at once. Metrics become visible as they are
written; on open, a run left `running` or `queued` by a dead process is marked `interrupted`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    settings TEXT NOT NULL,
    config TEXT NOT NULL,
    trainable_params INTEGER,
    all_params INTEGER,
    device TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    initial_eval_loss REAL,
    final_train_loss REAL,
    final_eval_loss REAL,
    peak_memory_mb REAL,
    memory_estimate_mb REAL,
    longest_seq INTEGER,
    adapter_dir TEXT,
    owner_pid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens INTEGER,
    tokens_per_s REAL,
    elapsed REAL,
    PRIMARY KEY (run_id, kind, step)
);
"""

_ADDED_COLUMNS = {"memory_estimate_mb": "REAL", "longest_seq": "INTEGER"}


def default_data_dir() -> Path:
    """$LORA_EXPLORER_DATA, else ~/.local/share/lora-explorer (XDG data home)."""
    env = os.environ.get("LORA_EXPLORER_DATA")
    base = (
        Path(env) if env else Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "lora-explorer"
    )
    return base.expanduser()


@dataclass(frozen=True)
class Store:
    """A handle on `runs.sqlite` in `data_dir` (created on first use)."""

    data_dir: Path

    @classmethod
    def open(cls, data_dir: str | Path | None = None) -> Store:
        """Open (and create) the store; runs left active by a process that is gone become `interrupted`."""
        store = cls(Path(data_dir) if data_dir else default_data_dir())
        store.data_dir.mkdir(parents=True, exist_ok=True)
        with closing(store._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
            for column, kind in _ADDED_COLUMNS.items():  # stores written before these columns existed
                if column not in have:
                    try:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError as error:  # another process added it first
                        if "duplicate column" not in str(error):
                            raise
        store.mark_orphans_interrupted()
        return store

    @property
    def path(self) -> Path:
        return self.data_dir / "runs.sqlite"

    def adapter_dir(self, run_id: int) -> Path:
        return self.data_dir / "adapters" / f"run-{run_id}"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _write(self, sql: str, params: tuple = ()) -> int:
        with closing(self._connect()) as db, db:
            return db.execute(sql, params).lastrowid

    def create_run(self, name: str, model: str, dataset: str, settings: dict, config: dict) -> int:
        """A new `queued` run; returns its id."""
        return self._write(
            "INSERT INTO runs (name, status, model, dataset, settings, config, created, owner_pid) VALUES (?,?,?,?,?,?,?,?)",
            (name, "queued", model, dataset, json.dumps(settings), json.dumps(config), time.time(), os.getpid()),
        )

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set columns of one run (`status`, `error`, `final_eval_loss`, ...)."""
        if not fields:
            return
        columns = ", ".join(f"{name} = ?" for name in fields)
        self._write(f"UPDATE runs SET {columns} WHERE id = ?", (*fields.values(), run_id))

    def add_metric(self, run_id: int, kind: str, step: int, **values: float | int | None) -> None:
        """One train or eval point; written at once so readers see it while the run goes on."""
        names = ["run_id", "kind", "step", *values]
        placeholders = ", ".join("?" * len(names))
        self._write(
            f"INSERT OR REPLACE INTO metrics ({', '.join(names)}) VALUES ({placeholders})",
            (run_id, kind, step, *values.values()),
        )

    def run(self, run_id: int) -> dict | None:
        """One run as a dict (settings and config decoded), or None."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _decode(row) if row else None

    def runs(self) -> pd.DataFrame:
        """Every run, newest first."""
        with closing(self._connect()) as db:
            frame = pd.read_sql_query("SELECT * FROM runs ORDER BY id DESC", db)
        return frame

    def metrics(self, run_ids: list[int] | None = None) -> pd.DataFrame:
        """Metric rows of the given runs (all when None), ordered by run, kind, step."""
        with closing(self._connect()) as db:
            if run_ids is None:
                return pd.read_sql_query("SELECT * FROM metrics ORDER BY run_id, kind, step", db)
            marks = ",".join("?" * len(run_ids)) or "NULL"
            query = f"SELECT * FROM metrics WHERE run_id IN ({marks}) ORDER BY run_id, kind, step"
            return pd.read_sql_query(query, db, params=tuple(run_ids))

    def rename(self, run_id: int, name: str) -> None:
        name = name.strip()
        if not name:
            raise ValueError("a run name cannot be empty")
        self.update_run(run_id, name=name)

    def delete(self, run_id: int) -> None:
        """Remove a finished run, its metrics and its adapter files."""
        run = self.run(run_id)
        if run is None:
            return
        if run["status"] in ACTIVE:
            raise ValueError(f"run {run_id} is {run['status']}: cancel it before deleting")
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        if run.get("adapter_dir"):
            import shutil

            shutil.rmtree(run["adapter_dir"], ignore_errors=True)

    def claim_next(self) -> dict | None:
        """Atomically take the oldest queued run for this process (status -> running); None if none."""
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE runs SET status = 'running', started = ?, owner_pid = ? WHERE id = ?",
                (time.time(), os.getpid(), row[0]),
            )
        return self.run(row[0])

    def request_cancel(self, run_id: int) -> None:
        """Ask the worker to stop `run_id` after its current step; a queued run is cancelled at once."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))
            db.execute(
                "UPDATE runs SET status = 'cancelled', finished = ?, error = 'cancelled before it started' "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), run_id),
            )

    def cancel_requested(self, run_id: int) -> bool:
        with closing(self._connect()) as db:
            row = db.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def active_run_ids(self) -> list[int]:
        with closing(self._connect()) as db:
            return [r[0] for r in db.execute("SELECT id FROM runs WHERE status IN ('queued', 'running') ORDER BY id")]

    def mark_orphans_interrupted(self) -> int:
        """Active runs whose owning process is gone become `interrupted`; returns how many."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT id, owner_pid FROM runs WHERE status IN ('queued', 'running')").fetchall()
        orphans = [row["id"] for row in rows if not _alive(row["owner_pid"])]
        for run_id in orphans:
            self.update_run(
                run_id, status="interrupted", finished=time.time(), error="the server stopped during the run"
            )
        return len(orphans)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _decode(row: sqlite3.Row) -> dict:
    data = dict(row)
    for key in ("settings", "config"):
        data[key] = json.loads(data[key]) if data.get(key) else {}
    return data


class NullStore:
    """A store that records nothing: what non-zero ranks of a multi-GPU `accelerate launch` get,
    so only rank 0 writes the run."""

    data_dir = Path("/nonexistent")

    def __getattr__(self, name: str):
        def ignore(*args, **kwargs):
            return None

        return ignore

    def cancel_requested(self, run_id: int) -> bool:
        return False

    def adapter_dir(self, run_id: int) -> Path:
        return self.data_dir
