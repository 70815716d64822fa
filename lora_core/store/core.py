"""The `Store`: runs, experiments and their metrics in SQLite, shared by every browser session, the
CLI and restarts.

Each call opens its own short-lived connection, so the training thread, Streamlit's script
threads and other processes can use one store at once. Metrics become visible as they are
written. Readers check the owners of active runs (owners.py) about once a second, so a run whose
processes are gone becomes `interrupted` within seconds, whoever started it and whoever polls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lora_core.errors import InputError
from lora_core.locking import file_lock
from lora_core.store.owners import HOST, OWNER_COLUMNS, owner_check_due, process_alive, process_started, stranded_reason
from lora_core.store.rows import decode, marks, no_new_metrics
from lora_core.store.schema import migrate, retry_while_locked
from lora_core.store.status import ACTIVE, CLI, FINISHED, OWNERS, RUNNERS, WORKER, experiment_status

# A scratch folder's name, as `Store.scratch_dir` writes it: run id, pid and HOST (a name without
# a host is taken for this one's).
_SCRATCH_NAME = re.compile(r"run-(\d+)-(\d+)(?:-(\w+))?")


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
        """Open (and create) the store; runs whose processes are gone become `interrupted`, and
        scratch folders of dead processes are removed."""
        store = cls(Path(data_dir) if data_dir else default_data_dir())
        store.data_dir.mkdir(parents=True, exist_ok=True)
        # Set-up must not overlap another process's: switching a new database to WAL upgrades a
        # read lock to a write lock, which SQLite refuses at once, without its busy timeout, while
        # another connection writes ("database is locked" when two processes opened a new store).
        with file_lock(store.data_dir / "runs.sqlite.lock"):
            retry_while_locked(store._set_up)
        store.mark_orphans_interrupted()
        store.clean_scratch()
        return store

    def _set_up(self) -> None:
        """WAL mode, the tables, and the columns added since older stores were written."""
        with closing(self._connect()) as db, db:
            migrate(db)

    @property
    def path(self) -> Path:
        return self.data_dir / "runs.sqlite"

    def adapter_dir(self, run_id: int) -> Path:
        return self.data_dir / "adapters" / f"run-{run_id}"

    def scratch_dir(self, run_id: int) -> Path:
        """A folder for one run's temporary files, created. It is named by run and process, so that
        `clean_scratch` can remove it once that process is gone, however it ended: a SIGKILL skips
        every cleanup of its own."""
        path = self.data_dir / "scratch" / f"run-{run_id}-{os.getpid()}-{HOST}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clean_scratch(self) -> int:
        """Remove the scratch folders of processes that are gone; returns how many."""
        try:
            entries = list((self.data_dir / "scratch").iterdir())
        except FileNotFoundError:
            return 0
        removed = 0
        for entry in entries:
            match = _SCRATCH_NAME.fullmatch(entry.name)
            if match and match[3] in (None, HOST) and entry.is_dir() and not process_alive(int(match[2])):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _write(self, sql: str, params: tuple = ()) -> int:
        """Run one statement in its own transaction; returns the new row's id for an INSERT (0 otherwise)."""
        with closing(self._connect()) as db, db:
            return db.execute(sql, params).lastrowid or 0

    def create_run(
        self,
        name: str,
        model: str,
        dataset: str,
        settings: dict,
        config: dict,
        owner: str = WORKER,
        experiment_id: int | None = None,
        trial: dict | None = None,
    ) -> int:
        """A new `queued` run owned, until someone claims it, by this process; returns its id.
        `owner` says who trains it: "worker" (a server's background worker claims it) or "cli"
        (this process trains it itself, so no worker may claim it). A trial of an experiment names
        it and its grid values (`trial`)."""
        if owner not in OWNERS:
            raise ValueError(f"owner must be one of {', '.join(OWNERS)}, not {owner!r}")
        me = os.getpid()
        return self._write(
            "INSERT INTO runs (name, status, model, dataset, settings, config, created, owner, owner_pid, owner_started,"
            " owner_host, experiment_id, trial) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                name,
                "queued",
                model,
                dataset,
                json.dumps(settings),
                json.dumps(config),
                time.time(),
                owner,
                me,
                process_started(me),
                HOST,
                experiment_id,
                json.dumps(trial) if trial is not None else None,
            ),
        )

    def create_experiment(
        self, name: str, model: str, dataset: str, spec: dict, runner: str = "local", trials: Sequence[dict] = ()
    ) -> int:
        """A new experiment record and its trials, in one transaction, so a worker polling the queue
        never sees part of an experiment; returns its id. Each trial is a dict of `create_run`'s
        arguments (name, model, dataset, settings, config, owner, trial)."""
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {runner!r}")
        me, now = os.getpid(), time.time()
        started = process_started(me)
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")
            experiment_id = db.execute(
                "INSERT INTO experiments (name, model, dataset, spec, runner, created) VALUES (?,?,?,?,?,?)",
                (name, model, dataset, json.dumps(spec), runner, now),
            ).lastrowid
            for trial in trials:
                owner = trial.get("owner", WORKER)
                if owner not in OWNERS:
                    raise ValueError(f"owner must be one of {', '.join(OWNERS)}, not {owner!r}")
                db.execute(
                    "INSERT INTO runs (name, status, model, dataset, settings, config, created, owner, owner_pid,"
                    " owner_started, owner_host, experiment_id, trial) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        trial["name"],
                        "queued",
                        trial["model"],
                        trial["dataset"],
                        json.dumps(trial["settings"]),
                        json.dumps(trial["config"]),
                        now,
                        owner,
                        me,
                        started,
                        HOST,
                        experiment_id,
                        json.dumps(trial.get("trial")),
                    ),
                )
        return int(experiment_id or 0)

    def experiment(self, experiment_id: int) -> dict | None:
        """One experiment with its spec decoded, its trials' counts by status and its derived status."""
        frame = self.experiments([experiment_id])
        if frame.empty:
            return None
        data = frame.iloc[0].to_dict()
        data["spec"] = json.loads(data["spec"]) if data.get("spec") else {}
        return data

    def experiments(self, experiment_ids: Iterable[int] | None = None) -> pd.DataFrame:
        """Every experiment (or those of `experiment_ids`), newest first, with columns `trials`,
        one count per run status, `status` (queued, running, cancelling, completed, failed,
        cancelled, interrupted) and `finished` (when its last trial ended)."""
        self._check_owners_if_due()
        counts = ", ".join(f"SUM(r.status = '{status}') AS {status}" for status in (*ACTIVE, *FINISHED))
        where = ""
        params: tuple = ()
        if experiment_ids is not None:
            params = tuple(int(i) for i in experiment_ids)
            where = f"WHERE e.id IN ({marks(len(params))})"
        query = (
            f"SELECT e.*, COUNT(r.id) AS trials, {counts}, MAX(r.finished) AS finished FROM experiments e"
            f" LEFT JOIN runs r ON r.experiment_id = e.id {where} GROUP BY e.id ORDER BY e.id DESC"
        )
        with closing(self._connect()) as db:
            frame = pd.read_sql_query(query, db, params=params)
        for status in (*ACTIVE, *FINISHED):
            frame[status] = frame[status].fillna(0).astype(int)
        frame["status"] = [experiment_status(row) for row in frame.to_dict("records")]
        return frame

    def experiment_runs(self, experiment_id: int) -> pd.DataFrame:
        """The trials of one experiment, in the order they were queued."""
        self._check_owners_if_due()
        with closing(self._connect()) as db:
            return pd.read_sql_query(
                "SELECT * FROM runs WHERE experiment_id = ? ORDER BY id", db, params=(int(experiment_id),)
            )

    def cancel_experiment(self, experiment_id: int) -> None:
        """Stop an experiment: its queued trials are cancelled at once, the one training stops after
        its current step."""
        self._write("UPDATE experiments SET cancel_requested = 1 WHERE id = ?", (experiment_id,))
        with closing(self._connect()) as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM runs WHERE experiment_id = ? AND status IN ('queued', 'running')", (experiment_id,)
                )
            ]
        for run_id in ids:
            self.request_cancel(run_id)

    def experiment_cancel_requested(self, experiment_id: int) -> bool:
        with closing(self._connect()) as db:
            row = db.execute("SELECT cancel_requested FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        return bool(row and row[0])

    def delete_experiment(self, experiment_id: int) -> None:
        """Remove a finished experiment with its trials, their metrics and adapter files."""
        runs = self.experiment_runs(experiment_id)
        if runs["status"].isin(ACTIVE).any():
            raise InputError(f"experiment {experiment_id} is still running: cancel it before deleting")
        for run_id in runs["id"]:
            self.delete(int(run_id))
        self._write("DELETE FROM experiments WHERE id = ?", (experiment_id,))

    def take_experiment_runs(self, experiment_id: int) -> list[int]:
        """Make this process the owner of every queued trial of an experiment, as the CLI owns its
        runs (no worker claims them; they are interrupted if this process dies): what a driver
        that runs the trials elsewhere (Ray Tune) calls first. Returns their ids, oldest first."""
        me = os.getpid()
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM runs WHERE experiment_id = ? AND status IN ('queued', 'running') ORDER BY id",
                    (experiment_id,),
                )
            ]
            db.execute(
                f"UPDATE runs SET owner = ?, owner_pid = ?, owner_started = ?, owner_host = ? WHERE id IN ({marks(len(ids))})",
                (CLI, me, process_started(me), HOST, *ids),
            )
        return ids

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set columns of one run (`status`, `error`, `final_eval_loss`, ...). Setting `owner_pid` or
        `watcher_pid` also records that process's start time unless given, so that whoever sets the
        pid (training.run_training sets `owner_pid`) gets protection against pid reuse for free."""
        if not fields:
            return
        for role in ("owner", "watcher"):
            if f"{role}_pid" in fields and f"{role}_started" not in fields:
                fields[f"{role}_started"] = process_started(fields[f"{role}_pid"])
        if "owner_pid" in fields:
            fields.setdefault("owner_host", HOST)
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
        self._check_owners_if_due()
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return decode(row) if row else None

    def runs(self, run_ids: Iterable[int] | None = None) -> pd.DataFrame:
        """Every run, or those of `run_ids` that exist, newest first."""
        self._check_owners_if_due()
        with closing(self._connect()) as db:
            if run_ids is None:
                return pd.read_sql_query("SELECT * FROM runs ORDER BY id DESC", db)
            ids = tuple(run_ids)
            query = f"SELECT * FROM runs WHERE id IN ({marks(len(ids))}) ORDER BY id DESC"
            return pd.read_sql_query(query, db, params=ids)

    def metrics(self, run_ids: list[int] | None = None) -> pd.DataFrame:
        """Metric rows of the given runs (all when None), ordered by run, kind, step."""
        with closing(self._connect()) as db:
            if run_ids is None:
                return pd.read_sql_query("SELECT * FROM metrics ORDER BY run_id, kind, step", db)
            query = f"SELECT * FROM metrics WHERE run_id IN ({marks(len(run_ids))}) ORDER BY run_id, kind, step"
            return pd.read_sql_query(query, db, params=tuple(run_ids))

    def metrics_since(self, after: Mapping[int, int]) -> pd.DataFrame:
        """The metric rows written since a reader last looked: for each run id in `after`, the rows
        whose `seq` is above after[run_id] (0 for all of that run's rows), ordered by `seq`.

        `seq` (the row's SQLite rowid) grows with every write, and a point written again (same run,
        kind and step) comes back with a new one, so a reader that keeps each run's largest `seq`
        sees every change once. Each run costs one index range, whatever the store's size."""
        if not after:
            return no_new_metrics()
        wanted = ", ".join("(?, ?)" for _ in after)
        query = (
            f"WITH wanted(run_id, after) AS (VALUES {wanted}) SELECT metrics.rowid AS seq, metrics.* FROM wanted"
            " JOIN metrics ON metrics.run_id = wanted.run_id AND metrics.rowid > wanted.after ORDER BY seq"
        )
        params = tuple(value for run_id, seq in after.items() for value in (int(run_id), int(seq)))
        with closing(self._connect()) as db:
            return pd.read_sql_query(query, db, params=params)

    def rename(self, run_id: int, name: str) -> None:
        name = name.strip()
        if not name:
            raise InputError("a run name cannot be empty")
        self.update_run(run_id, name=name)

    def delete(self, run_id: int) -> None:
        """Remove a finished run, its metrics and its adapter files."""
        run = self.run(run_id)
        if run is None:
            return
        if run["status"] in ACTIVE:
            raise InputError(f"run {run_id} is {run['status']}: cancel it before deleting")
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        if run.get("adapter_dir"):
            shutil.rmtree(run["adapter_dir"], ignore_errors=True)

    def claim_next(self, watcher_pid: int | None = None) -> dict | None:
        """Atomically take the oldest queued worker run for this process (status -> running); None
        if none. `watcher_pid` is the server that started this worker: while it lives, readers leave
        a run whose worker died for that server to report (it knows the exit code)."""
        me = os.getpid()
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id FROM runs WHERE status = 'queued' AND COALESCE(owner, ?) = ? ORDER BY id LIMIT 1",
                (WORKER, WORKER),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE runs SET status = 'running', started = ?, owner_pid = ?, owner_started = ?, owner_host = ?,"
                " watcher_pid = ?, watcher_started = ? WHERE id = ?",
                (
                    time.time(),
                    me,
                    process_started(me),
                    HOST,
                    watcher_pid,
                    process_started(watcher_pid) if watcher_pid else None,
                    row[0],
                ),
            )
        return self.run(row[0])

    def next_queued(self) -> dict | None:
        """The run a worker would claim next (without claiming it), or None."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT * FROM runs WHERE status = 'queued' AND COALESCE(owner, ?) = ? ORDER BY id LIMIT 1",
                (WORKER, WORKER),
            ).fetchone()
        return decode(row) if row else None

    def request_cancel(self, run_id: int) -> None:
        """Ask the owner to stop `run_id` after its current step; a queued run is cancelled at once,
        and a run whose processes are gone (nobody is left to read the flag) is interrupted at once."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))
            db.execute(
                "UPDATE runs SET status = 'cancelled', finished = ?, error = 'cancelled before it started' "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), run_id),
            )
            row = db.execute(f"SELECT {OWNER_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is not None and row["status"] in ACTIVE:
            self._interrupt_if_stranded(row)

    def cancel_requested(self, run_id: int) -> bool:
        with closing(self._connect()) as db:
            row = db.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def active_run_ids(self) -> list[int]:
        self._check_owners_if_due()
        with closing(self._connect()) as db:
            return [r[0] for r in db.execute("SELECT id FROM runs WHERE status IN ('queued', 'running') ORDER BY id")]

    def mark_orphans_interrupted(self) -> int:
        """Active runs that nobody can finish any more become `interrupted`, with what happened;
        returns how many. Their processes' scratch folders go too."""
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {OWNER_COLUMNS} FROM runs WHERE status IN ('queued', 'running')").fetchall()
        marked = sum(self._interrupt_if_stranded(row) for row in rows)
        if marked:
            self.clean_scratch()
        return marked

    def _check_owners_if_due(self) -> None:
        """What readers call, so that a stranded run is marked within about a second of the next
        poll, without a check on every read of a page that polls several times a second."""
        if owner_check_due(self.data_dir):
            self.mark_orphans_interrupted()

    def _interrupt_if_stranded(self, row: sqlite3.Row) -> bool:
        """Mark one active run `interrupted` if nobody can finish it; True if this call did. The
        update only applies to the row as read, so a run claimed or finished meanwhile is kept."""
        reason = stranded_reason(row)
        if reason is None:
            return False
        with closing(self._connect()) as db, db:
            changed = db.execute(
                "UPDATE runs SET status = 'interrupted', finished = ?, error = ? "
                "WHERE id = ? AND status = ? AND owner_pid IS ?",
                (time.time(), reason, row["id"], row["status"], row["owner_pid"]),
            ).rowcount
        return changed > 0
