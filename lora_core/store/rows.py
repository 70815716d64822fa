"""What the store's reads give back: a run row as a dict, and the frames of a read that found nothing."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pandas as pd

from lora_core.store.schema import SCHEMA


def decode(row: sqlite3.Row) -> dict:
    """`row` as a dict, its JSON columns (settings, config, trial) decoded; {} where one is empty."""
    data = dict(row)
    for key in ("settings", "config", "trial"):
        data[key] = json.loads(data[key]) if data.get(key) else {}
    return data


def marks(count: int) -> str:
    """`count` SQL placeholders for an IN list; NULL (matching nothing) for none."""
    return ",".join("?" * count) or "NULL"


def empty_frame(table: str) -> pd.DataFrame:
    """`table` with no rows, with the columns a real store's read returns."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(SCHEMA)
        return pd.read_sql_query(f"SELECT * FROM {table}", db)


def no_new_metrics() -> pd.DataFrame:
    """What `metrics_since` returns when nothing is new: its columns, no rows."""
    frame = empty_frame("metrics")
    frame.insert(0, "seq", pd.Series(dtype="int64"))
    return frame
