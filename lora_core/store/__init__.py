"""The run store: SQLite in WAL mode, shared by every browser session, the CLI and restarts.

Each call opens its own short-lived connection, so the training thread, Streamlit's script
threads and other processes can use one store at once. Metrics become visible as they are
written.

An active run names the process responsible for it (`owner_pid`, with the process's start time so
that a later process given the same pid cannot pass for it) and, when a server's worker trains it,
the server watching that worker (`watcher_pid`). Readers check these about once a second, so a run
whose processes are gone becomes `interrupted` within seconds, whoever started it and whoever polls.

One concept per module: `core` (the `Store`), `schema` (its tables and their migration), `owners`
(process liveness and when a run is stranded), `status` (the closed lists of statuses, owners and
runners), `rows` (the shapes reads give back), `null` (`RunWriter` and `NullStore`).
"""

from lora_core.store.core import Store, default_data_dir
from lora_core.store.null import NullStore, RunWriter
from lora_core.store.owners import HOST, OWNER_CHECK_EVERY, process_alive, process_started
from lora_core.store.status import ACTIVE, CLI, FINISHED, OWNERS, RUNNERS, WORKER

__all__ = [
    "ACTIVE",
    "CLI",
    "FINISHED",
    "HOST",
    "OWNERS",
    "OWNER_CHECK_EVERY",
    "RUNNERS",
    "WORKER",
    "NullStore",
    "RunWriter",
    "Store",
    "default_data_dir",
    "process_alive",
    "process_started",
]
