"""The runs service's queue: submissions waiting for, holding, or done with a worker.

A plain module (no tornado, no jupyterhub): one SQLite file ``<state>/hub/runs.sqlite`` (WAL,
busy timeout) that the service (submit, list, cancel, claim) and its workers (the outcome)
share. A row is one submission::

    queued ──claim_next──► running ──finish──► succeeded | failed | interrupted
      └──cancel──► cancelled (nothing ran)

``claim_next`` starts at most ``max_concurrent`` runs and gives each the GPUs it asked for from
the shared pool (owner ``run:<id>``) first; when the pool has too few free, the row stays
queued and a later one that fits may go first. ``restore`` is for start-up (and after a worker
died): a ``running`` row whose worker is gone becomes ``interrupted``, the trusted
:func:`lora_kernel.trusted.recovery.recover` seals its record as failed, and the GPUs of runs
that no longer run are released; queued rows stay queued.

Identity in a row (``user``, ``actor``) is what the service learnt from the hub's token; a
request never names it.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, NoMatch
from lora_kernel.common.runspec import FINAL_STATUSES, RUN_STATUSES

from .gpus import GpuUnavailable, Pool
from .settings import gpu_pool_path, hub_state_dir

KINDS = ("notebook", "config")
STATUSES = RUN_STATUSES
FINAL = FINAL_STATUSES
OWNER_PREFIX = "run:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    actor TEXT NOT NULL DEFAULT '{}',
    kind TEXT NOT NULL CHECK (kind IN ('notebook', 'config')),
    path TEXT NOT NULL,
    parameters TEXT NOT NULL DEFAULT '{}',
    home TEXT NOT NULL,
    gpus INTEGER NOT NULL DEFAULT 0,
    timeout REAL,
    status TEXT NOT NULL DEFAULT 'queued',
    run_id TEXT,
    record TEXT,
    error TEXT,
    exit_code INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    worker_pid INTEGER,
    worker_started REAL,
    gpus_held TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS submissions_status ON submissions (status, id);
CREATE INDEX IF NOT EXISTS submissions_user ON submissions (user, id);
"""


def queue_path(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/hub/runs.sqlite``."""
    return hub_state_dir(state) / "runs.sqlite"


@dataclass
class Submission:
    """One row of the queue."""

    id: int
    user: str
    kind: str
    path: str
    parameters: dict[str, Any]
    home: str
    gpus: int
    status: str
    submitted: float
    actor: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    run_id: str | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int | None = None
    cancel_requested: bool = False
    started: float | None = None
    finished: float | None = None
    worker_pid: int | None = None
    worker_started: float | None = None
    gpus_held: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the API (the worker's pid and start time stay inside)."""
        out = asdict(self)
        for key in ("worker_pid", "worker_started", "actor"):
            out.pop(key)
        return out

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Submission:
        data = dict(row)
        for key, empty in (("parameters", {}), ("actor", {}), ("gpus_held", [])):
            data[key] = json.loads(data[key]) if data[key] else empty
        data["record"] = json.loads(data["record"]) if data["record"] else None
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)


def worker_alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` lives and is the one that started at ``started`` (pids are
    reused); a zombie counts as gone."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class RunQueue:
    """The queue in ``<state>/hub/runs.sqlite`` and the GPU pool it allocates from.

    ``devices``/``exclusive``: the pool's GPUs (the service: NVML's or ``policies/hub.yaml``'s);
    ``max_concurrent``: runs executing at once.
    """

    def __init__(self, state: str | os.PathLike[str] | None = None, *,
                 devices: Iterable[str] = (), exclusive: bool = True,
                 max_concurrent: int = 2, local_gpus: bool = True) -> None:
        self.state = state
        # False (the Kubernetes backend): GPUs are the cluster's (the Job's nvidia.com/gpu
        # limit), not this machine's pool; quotas still apply at submission.
        self.local_gpus = local_gpus
        self.path = queue_path(state)
        self.pool = Pool(gpu_pool_path(state), devices, exclusive)
        self.max_concurrent = max(1, int(max_concurrent))
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection; ``write``: inside ``BEGIN IMMEDIATE`` (committed on success)."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            if write:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            else:
                yield db
        finally:
            db.close()

    # -- the service's side -------------------------------------------------------------------
    def submit(self, user: str, kind: str, path: str | os.PathLike[str], *,
               parameters: dict[str, Any] | None = None, home: str | os.PathLike[str],
               gpus: int = 0, timeout: float | None = None,
               actor: dict[str, Any] | None = None) -> Submission:
        """Queue a run of ``path`` (a notebook, or a config whose task picks the notebook)
        for ``user`` (already authenticated) in working home ``home``."""
        if kind not in KINDS:
            raise ConfigError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ConfigError(f"must be a whole number >= 0, got {gpus!r}", key="gpus")
        if self.local_gpus and gpus > len(self.pool.devices):
            raise GpuUnavailable(f"{gpus} GPU(s) asked for, the pool has "
                                 f"{len(self.pool.devices)}; fix: ask for fewer")
        try:
            params = json.dumps(dict(parameters or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"parameters must be plain JSON values: {exc}") from None
        with self._db(write=True) as db:
            cur = db.execute(
                "INSERT INTO submissions (user, actor, kind, path, parameters, home, gpus, "
                "timeout, submitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (user, json.dumps(actor or {}), kind, str(path), params, str(home), gpus,
                 timeout, time.time()))
            new_id = int(cur.lastrowid or 0)
        return self.get(new_id)

    def get(self, sub_id: int) -> Submission:
        """The submission ``sub_id``; :class:`NoMatch` when there is none."""
        with self._db() as db:
            row = db.execute("SELECT * FROM submissions WHERE id = ?", (int(sub_id),)).fetchone()
        if row is None:
            raise NoMatch(f"no submission {sub_id}")
        return Submission.from_row(row)

    def list_runs(self, user: str | None = None, *, status: Iterable[str] | None = None
             ) -> list[Submission]:
        """Submissions of ``user`` (None: everyone's), newest first."""
        sql, args = "SELECT * FROM submissions WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        wanted = list(status or ())
        if wanted:
            sql += f" AND status IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY id DESC", args).fetchall()
        return [Submission.from_row(r) for r in rows]

    def cancel(self, sub_id: int) -> Submission:
        """Cancel ``sub_id``: a queued one becomes ``cancelled`` (nothing ran); a running one
        is marked ``cancel_requested`` (the caller stops its worker, which seals the run as
        failed); a finished one is left as it is. Returns the row after the change."""
        with self._db(write=True) as db:
            row = db.execute("SELECT status FROM submissions WHERE id = ?",
                             (int(sub_id),)).fetchone()
            if row is None:
                raise NoMatch(f"no submission {sub_id}")
            if row["status"] == "queued":
                db.execute("UPDATE submissions SET status = 'cancelled', finished = ?, "
                           "cancel_requested = 1, error = 'cancelled before it started' "
                           "WHERE id = ?", (time.time(), int(sub_id)))
            elif row["status"] == "running":
                db.execute("UPDATE submissions SET cancel_requested = 1 WHERE id = ?",
                           (int(sub_id),))
        return self.get(sub_id)

    def claim_next(self) -> Submission | None:
        """The oldest queued submission that can start now, marked ``running`` with its GPUs
        allocated (owner ``run:<id>``); None when ``max_concurrent`` runs are running or
        no queued one gets its GPUs (those stay queued)."""
        with self._db(write=True) as db:
            running = db.execute("SELECT COUNT(*) FROM submissions WHERE status = 'running'"
                                 ).fetchone()[0]
            if running >= self.max_concurrent:
                return None
            for row in db.execute("SELECT id, gpus FROM submissions WHERE status = 'queued' "
                                  "ORDER BY id").fetchall():
                owner = f"{OWNER_PREFIX}{row['id']}"
                try:
                    held = (self.pool.allocate(owner, int(row["gpus"])) if self.local_gpus
                            else [])
                except GpuUnavailable:
                    continue
                db.execute("UPDATE submissions SET status = 'running', started = ?, "
                           "gpus_held = ? WHERE id = ?",
                           (time.time(), json.dumps(held), row["id"]))
                sub_id = int(row["id"])
                break
            else:
                return None
        return self.get(sub_id)

    def set_worker(self, sub_id: int, pid: int, started: float | None) -> None:
        """Record the worker process of a running submission (pid and its start time)."""
        with self._db(write=True) as db:
            db.execute("UPDATE submissions SET worker_pid = ?, worker_started = ? WHERE id = ?",
                       (pid, started, int(sub_id)))

    # -- the worker's side --------------------------------------------------------------------
    def set_run_id(self, sub_id: int, run_id: str) -> None:
        """The runner's run id, as soon as the run is announced (before it is sealed)."""
        with self._db(write=True) as db:
            db.execute("UPDATE submissions SET run_id = ? WHERE id = ?", (run_id, int(sub_id)))

    def finish(self, sub_id: int, status: str, *, run_id: str | None = None,
               record: dict[str, Any] | None = None, error: str | None = None,
               exit_code: int | None = None) -> Submission:
        """Write a running submission's outcome and release its GPUs."""
        if status not in FINAL:
            raise ConfigError(f"not a final status: {status!r}")
        with self._db(write=True) as db:
            db.execute("UPDATE submissions SET status = ?, run_id = COALESCE(?, run_id), "
                       "record = COALESCE(?, record), error = ?, exit_code = ?, finished = ? "
                       "WHERE id = ?",
                       (status, run_id, json.dumps(record) if record is not None else None,
                        error, exit_code, time.time(), int(sub_id)))
        self.pool.release(f"{OWNER_PREFIX}{sub_id}")
        return self.get(sub_id)

    # -- start-up -----------------------------------------------------------------------------
    def restore(self, *, exclude: Iterable[int] = (),
                recover: Callable[[], list[dict[str, Any]]] | None = None,
                ) -> list[Submission]:
        """Rows ``running`` whose worker is gone (not in ``exclude``, the workers the caller
        supervises itself) become ``interrupted``; ``recover`` (default: the trusted
        :func:`~lora_kernel.trusted.recovery.recover` as this process's user) seals their
        records as failed, and each record is attached to its row by run id; the GPUs of every
        ``run:`` owner that no longer runs are released. Queued rows stay queued. Returns the
        interrupted rows."""
        skip = {int(i) for i in exclude}
        gone: list[int] = []
        with self._db(write=True) as db:
            for row in db.execute("SELECT id, worker_pid, worker_started FROM submissions "
                                  "WHERE status = 'running'").fetchall():
                if row["id"] in skip or worker_alive(row["worker_pid"], row["worker_started"]):
                    continue
                gone.append(int(row["id"]))
                db.execute("UPDATE submissions SET status = 'interrupted', finished = ?, "
                           "error = COALESCE(error, ?), exit_code = 7 WHERE id = ?",
                           (time.time(), "the run's worker stopped before it finished (the "
                            "runs service or the machine restarted, or the worker was "
                            "killed); its record is sealed as failed", row["id"]))
            live = [f"{OWNER_PREFIX}{r['id']}" for r in db.execute(
                "SELECT id FROM submissions WHERE status = 'running'").fetchall()]
        self.pool.reconcile(OWNER_PREFIX, live)
        if not gone:
            return []
        records = (recover or self._recover_local)()
        by_run = {str(r.get("run_id")): r for r in records}
        with self._db(write=True) as db:
            for sub_id in gone:
                row = db.execute("SELECT run_id FROM submissions WHERE id = ?",
                                 (sub_id,)).fetchone()
                rec = by_run.get(str(row["run_id"])) if row["run_id"] else None
                if rec is not None:
                    db.execute("UPDATE submissions SET record = ? WHERE id = ?",
                               (json.dumps(rec), sub_id))
        return [self.get(i) for i in gone]

    def _recover_local(self) -> list[dict[str, Any]]:
        from lora_kernel.trusted.recovery import recover

        return [r.to_dict() for r in recover(state=self.state)]
