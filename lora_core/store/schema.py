"""The store's tables, and how a store written by an older version is brought up to them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

SCHEMA = """
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
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    owner_started INTEGER,
    owner_host TEXT,
    watcher_pid INTEGER,
    watcher_started INTEGER,
    experiment_id INTEGER,
    trial TEXT,
    trained_by TEXT
);
-- An experiment groups its trials, which are ordinary runs (runs.experiment_id); its status is
-- derived from theirs, so it can never disagree with them.
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    spec TEXT NOT NULL,
    runner TEXT NOT NULL DEFAULT 'local',
    created REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT
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
-- Every index entry ends with the row's rowid, which grows with each write: one run's rows written
-- since a poll are one range of this index, however many runs and rows the store holds.
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics(run_id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
"""
# Made after the added columns exist: an older store's runs table gains experiment_id first.
LATE_INDEXES = "CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs(experiment_id);"

ADDED_COLUMNS = {
    "memory_estimate_mb": "REAL",
    "longest_seq": "INTEGER",
    "owner": "TEXT",
    "owner_started": "INTEGER",
    "owner_host": "TEXT",
    "watcher_pid": "INTEGER",
    "watcher_started": "INTEGER",
    "experiment_id": "INTEGER",
    "trial": "TEXT",
    "trained_by": "TEXT",
}

_T = TypeVar("_T")


def migrate(db: sqlite3.Connection) -> None:
    """Bring the database of `db` to the current schema: WAL mode, the tables, and the columns added
    since older stores were written. Raises sqlite3.OperationalError as SQLite does, except for a
    column another process added first."""
    db.execute("PRAGMA journal_mode=WAL")  # persistent: once set, later opens write nothing here
    db.executescript(SCHEMA)
    # Indexed, not by key: a row is (cid, name, type, ...) whatever the connection's row_factory.
    have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    for column, kind in ADDED_COLUMNS.items():
        if column not in have:
            try:
                db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as error:  # without a file lock, another process may add it first
                if "duplicate column" not in str(error):
                    raise
    db.executescript(LATE_INDEXES)


def retry_while_locked(action: Callable[[], _T], patience: float = 30.0) -> _T:
    """Run `action`, retrying with backoff while SQLite answers "locked" at once: the guard where
    no file lock serialises set-up (no fcntl), or a connection that does not take it holds the file.
    Returns what `action` returns; raises its error once `patience` seconds have passed, or at once
    for any other error."""
    delay, deadline = 0.01, time.monotonic() + patience
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.5)
