"""``lora audit recover``: seal the runs whose runner died, and report leftovers.

A runner announces each run in ``<state>/runs/.active/<run_id>.json`` and holds an exclusive
``flock`` on ``<run_id>.lock`` while it lives; Linux drops the lock when the process dies, however
it dies. A run whose lock can be taken is therefore stale: its children died with the runner
(``PR_SET_PDEATHSIG``), and :func:`recover` seals it as failed with whatever evidence its work
folder holds (collected as the run's user), naming who recovered it. Staging folders that no
active run owns are reported, never deleted: the evidence is the product.

Run by ``lora audit recover``, at the start of every ``lora run`` and of ``verify --all``.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_kernel.common.errors import RunFailed
from lora_kernel.common.paths import runs_dir
from lora_kernel.common.timeutil import iso_time, parse_time, utc_now
from lora_kernel.trusted.runseal import RunContext, RunRecord, seal_run, stale_runs, try_lock
from lora_kernel.trusted.supervisor import RunAs, kill_run_processes


@dataclass(frozen=True)
class Leftover:
    """A staging folder no active run owns (reported; kept for an investigator)."""

    path: Path
    what: str


def recover(*, state: str | os.PathLike[str] | None = None,
            ctx: RunContext | None = None) -> list[RunRecord]:
    """Seal every stale run as failed; return their records. ``ctx`` is the recovering
    runner's (its actor is named in each record; service mode: children run as each run's
    own user)."""
    ctx = ctx or RunContext.local()
    active = runs_dir(state) / ".active"
    if not active.is_dir():
        return []
    records = []
    for run in stale_runs(state):
        run_id = run.run_id
        lock = active / f"{run_id}.lock"
        fd = try_lock(lock)
        if fd is None:  # a live runner took it meanwhile
            continue
        try:
            # Whatever the dead runner left running (its executor, the kernel) may still write
            # into the staging folder (executor.log is their stderr): stop it before sealing.
            kill_run_processes(run_id, ctx.privileges)
            staging = Path(run.staging or active.parent / ".staging" / run_id)
            staging.mkdir(parents=True, exist_ok=True)
            # A Kubernetes run's evidence is a file on its output volume: nothing to run as
            # its user here (who may exist only in the cluster's uid mapping).
            service = ctx.privileges.active and run.run_as.name \
                and run.backend != "kubernetes"
            run_as = RunAs.for_user(run.run_as.name) if service and run.run_as.name \
                else ctx.run_as
            rctx = RunContext(actor=ctx.actor, run_as=run_as, privileges=ctx.privileges,
                              env=ctx.env)
            since = utc_now() - parse_time(run.started)
            reason = (f"the runner stopped before sealing (lora run killed, its terminal "
                      f"closed, or the machine restarted); recovered by {ctx.actor.name} at "
                      f"{iso_time()} after {since.total_seconds():.0f}s")
            try:
                rec = seal_run(run, staging, rc=None, reason=reason, ctx=rctx, state=state,
                               seconds=since.total_seconds(), log=lambda _m: None)
            except RunFailed as exc:
                rec = exc.record
            records.append(rec)
        finally:
            (active / f"{run_id}.json").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            os.close(fd)
    return records


def leftovers(state: str | os.PathLike[str] | None = None) -> list[Leftover]:
    """Staging folders that belong to no active run (a crash between sealing steps)."""
    runs = runs_dir(state)
    owned = {Path(json.loads(p.read_text(encoding="utf-8")).get("staging", ""))
             for p in (runs / ".active").glob("*.json")} if (runs / ".active").is_dir() else set()
    out = []
    staging = runs / ".staging"
    for path in sorted(staging.iterdir()) if staging.is_dir() else []:
        if path not in owned:
            out.append(Leftover(path, "staging folder of no active run (kept for inspection)"))
    return out
