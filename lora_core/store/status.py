"""The closed lists a run or an experiment is described by: its status, who trains it, and where."""

from __future__ import annotations

ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled", "interrupted")

# Who trains a run: a server's background worker, which claims queued runs, or the process that
# created the run (the CLI), which no worker may claim.
WORKER, CLI = "worker", "cli"
OWNERS = (WORKER, CLI)
# Where an experiment's trials train: the server's worker / the CLI process, or Ray Tune.
RUNNERS = ("local", "ray")


def experiment_status(row: dict) -> str:
    """An experiment's status from its trials' counts and its cancel flag: cancelled when it was
    cancelled and a trial with it (a cancel that came as the last trial ended changes nothing), or
    when every trial was cancelled one by one; a few trials stopped early (ASHA) or cancelled alone
    leave it completed; failed when none completed and one failed."""
    if row["running"] or row["queued"]:
        if row["cancel_requested"]:
            return "cancelling"
        return "running" if row["running"] else "queued"
    if row["interrupted"]:
        return "interrupted"
    if row["cancelled"] and (row["cancel_requested"] or row["cancelled"] == row["trials"]):
        return "cancelled"
    if row["failed"] and not row["completed"]:
        return "failed"
    return "completed"
