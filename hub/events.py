"""Kernel execution-log events received by the audit service: checked, stored once, ledgered.

Plain module (no tornado, no jupyterhub): the audit service's ``api/events`` handler, tests and
benchmarks use it directly.

A kernel's :class:`~lora_kernel.kernel.execlog.HttpSink` posts batches
``{"kernel_id", "user", "events": [...]}``; every event has a ``seq`` (1, 2, ... per kernel,
never reused). :meth:`EventStore.add_batch`:

* stores each event (its canonical JSON, plus user, kernel id, seq, time, type, run id) in
  ``<state>/hub/events.sqlite`` (WAL; ``UNIQUE(user, kernel_id, seq)``), so a batch the sink
  sends again after a lost answer stores nothing twice: such events count as ``duplicates``
  (or ``conflicts`` when the resent event differs from the stored one; the first stays);
* appends ONE ``kernel_events`` ledger entry per batch that stored something: subject the
  kernel id, payload ``user``, ``kernel_id``, ``first_seq``/``last_seq``/``count`` of the newly
  stored events and ``sha256`` of the canonical JSON of their list (in seq order), and the
  ``run_ids`` they mention. Each stored row keeps that entry's ``ledger_seq``, so
  :meth:`EventStore.verify` can re-hash every batch against the ledger.

The rows are written in the same SQLite transaction that is open while the ledger entry is
appended: if the append fails, nothing is stored and the sink retries.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import canonical_json, sha256_bytes
from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.common.paths import state_dir
from lora_kernel.common.timeutil import iso_time
from lora_kernel.provenance.ledger import LedgerReader
from lora_kernel.provenance.records import Problem
from lora_kernel.trusted.ledger import Ledger

LEDGER_KIND = "kernel_events"
EVENTS_FILE = "events.sqlite"
MAX_EVENTS = 1000           # per batch (the kernel's sink sends at most 200)
MAX_EVENT_BYTES = 1 << 20   # one event's canonical JSON (a cell's code included)
MAX_NAME = 200              # user and kernel id length

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, kernel_id TEXT NOT NULL, seq INTEGER NOT NULL,
    time TEXT, type TEXT, run_id TEXT, event TEXT NOT NULL, received TEXT NOT NULL,
    ledger_seq INTEGER NOT NULL,
    UNIQUE (user, kernel_id, seq));
CREATE INDEX IF NOT EXISTS events_run ON events (run_id);
CREATE INDEX IF NOT EXISTS events_ledger ON events (ledger_seq);
"""


@dataclass
class BatchResult:
    """What :meth:`EventStore.add_batch` did (``first_seq``/``last_seq``: of the batch)."""

    stored: int
    duplicates: int
    first_seq: int | None
    last_seq: int | None
    ledger_seq: int | None
    conflicts: int = 0
    run_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def events_path(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/hub/events.sqlite``."""
    return state_dir(state) / "hub" / EVENTS_FILE


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME \
            or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{what} must be a non-empty string of at most {MAX_NAME} printable "
                          f"characters, got {str(value)[:60]!r}", key=what)
    return value


def check_batch(body: Any, user: str) -> tuple[str, list[dict[str, Any]]]:
    """``(kernel_id, events)`` of a posted batch from the authenticated ``user``.

    :class:`PolicyRefusal` when the batch (or one of its events) names another user;
    :class:`ConfigError` for anything malformed: not an object, no kernel id, events not a
    list of objects, a ``seq`` that is not a whole number >= 1 or appears twice, an event of
    another kernel, non-finite numbers, too many or too large events.
    """
    if not isinstance(body, dict):
        raise ConfigError("the batch must be a JSON object {kernel_id, user, events}")
    claimed = _name(body.get("user"), "user")
    if claimed != user:
        raise PolicyRefusal(f"the batch names user {claimed!r} but the token belongs to "
                            f"{user!r}; a kernel reports only its own user's events")
    kernel_id = _name(body.get("kernel_id"), "kernel_id")
    events = body.get("events")
    if not isinstance(events, list):
        raise ConfigError("events must be a list of event objects", key="events")
    if len(events) > MAX_EVENTS:
        raise ConfigError(f"{len(events)} events in one batch; at most {MAX_EVENTS}",
                          key="events")
    seen: set[int] = set()
    for i, ev in enumerate(events):
        where = f"events[{i}]"
        if not isinstance(ev, dict):
            raise ConfigError("an event must be a JSON object", key=where)
        seq = ev.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or seq >= 2 ** 63:
            raise ConfigError(f"seq must be a whole number >= 1, got {seq!r}", key=where)
        if seq in seen:
            raise ConfigError(f"seq {seq} appears twice in the batch", key=where)
        seen.add(seq)
        if ev.get("user") not in (None, user):
            raise PolicyRefusal(f"{where} names user {ev.get('user')!r} but the token belongs "
                                f"to {user!r}")
        if ev.get("kernel_id") not in (None, kernel_id):
            raise ConfigError(f"event of kernel {ev.get('kernel_id')!r} in a batch of kernel "
                              f"{kernel_id!r}", key=where)
        for key in ("type", "time", "run_id"):
            if ev.get(key) is not None and not isinstance(ev.get(key), str):
                raise ConfigError(f"{key} must be a string or null", key=f"{where}.{key}")
        try:
            size = len(canonical_json(ev))
        except ValueError as exc:  # NaN / Infinity: not JSON, not hashable canonically
            raise ConfigError(f"not canonical JSON: {exc}", key=where) from None
        if size > MAX_EVENT_BYTES:
            raise ConfigError(f"event of {size} bytes; at most {MAX_EVENT_BYTES}", key=where)
    return kernel_id, sorted(events, key=lambda e: e["seq"])


def batch_digest(events: Iterable[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of the list of ``events`` (the ledger's ``sha256``)."""
    return sha256_bytes(canonical_json(list(events)))


class EventStore:
    """The events database at ``path`` (default :func:`events_path`), opened for writing.

    ``durable=False`` skips fsync per batch (benchmarks, tests).
    """

    def __init__(self, state: str | os.PathLike[str] | None = None, *,
                 path: str | os.PathLike[str] | None = None, durable: bool = True) -> None:
        self.state = state_dir(state)
        self.path = Path(path) if path else events_path(state)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not self.path.exists()
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        if new:
            os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
        self._db.executescript(_SCHEMA)
        self._durable = durable

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def add_batch(self, user: str, kernel_id: str, events: list[dict[str, Any]], *,
                  ledger: Ledger | None = None) -> BatchResult:
        """Store the events of a batch checked by :func:`check_batch` that are not stored yet
        and append one ``kernel_events`` ledger entry for them (none when all were stored
        before). ``ledger``: an open writer (default: the state's ledger, opened for this
        call)."""
        events = sorted(events, key=lambda e: e["seq"])
        seqs = [e["seq"] for e in events]
        first, last = (seqs[0], seqs[-1]) if seqs else (None, None)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stored = self._stored(user, kernel_id, seqs)
            new, dup, conflicts = [], 0, 0
            for ev in events:
                old = stored.get(ev["seq"])
                if old is None:
                    new.append(ev)
                elif old == canonical_json(ev).decode():
                    dup += 1
                else:
                    conflicts += 1
            run_ids = sorted({str(e["run_id"]) for e in new if e.get("run_id")})
            if not new:
                self._db.execute("COMMIT")
                return BatchResult(0, dup, first, last, None, conflicts, run_ids)
            payload = {"user": user, "kernel_id": kernel_id, "first_seq": new[0]["seq"],
                       "last_seq": new[-1]["seq"], "count": len(new),
                       "sha256": batch_digest(new), "run_ids": run_ids}
            if ledger is None:
                with Ledger(state=self.state, durable=self._durable) as led:
                    entry = led.append(LEDGER_KIND, kernel_id, payload)
            else:
                entry = ledger.append(LEDGER_KIND, kernel_id, payload)
            received = iso_time()
            self._db.executemany(
                "INSERT INTO events (user, kernel_id, seq, time, type, run_id, event, received,"
                " ledger_seq) VALUES (?,?,?,?,?,?,?,?,?)",
                [(user, kernel_id, e["seq"], e.get("time"), e.get("type"), e.get("run_id"),
                  canonical_json(e).decode(), received, entry.seq) for e in new])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return BatchResult(len(new), dup, first, last, entry.seq, conflicts, run_ids)

    def _stored(self, user: str, kernel_id: str, seqs: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self._db.execute(
                f"SELECT seq, event FROM events WHERE user=? AND kernel_id=? AND seq IN ({marks})",
                (user, kernel_id, *chunk)).fetchall())
        return out

    # -- reading ----------------------------------------------------------------------------
    def list_events(self, *, user: str | None = None, kernel_id: str | None = None,
                    run_id: str | None = None, after_id: int = 0, limit: int = 1000
                    ) -> list[dict[str, Any]]:
        """Stored events matching every filter given, oldest first: ``{"id", "user",
        "kernel_id", "seq", "received", "ledger_seq", "event"}`` (``event`` parsed).
        ``after_id``/``limit`` page through them."""
        where, params = ["id > ?"], [int(after_id)]
        for col, value in (("user", user), ("kernel_id", kernel_id), ("run_id", run_id)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        rows = self._db.execute(
            "SELECT id, user, kernel_id, seq, received, ledger_seq, event FROM events WHERE "
            + " AND ".join(where) + " ORDER BY id LIMIT ?", (*params, max(0, int(limit))))
        return [{"id": r[0], "user": r[1], "kernel_id": r[2], "seq": r[3], "received": r[4],
                 "ledger_seq": r[5], "event": json.loads(r[6])} for r in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def verify(self, ledger: LedgerReader) -> list[Problem]:
        """Re-hash the stored events of every ``kernel_events`` ledger entry; problems: a batch
        whose events are missing, changed or extra, or rows no ledger entry accounts for."""
        problems: list[Problem] = []
        known = set()
        for entry in ledger.entries(LEDGER_KIND):
            known.add(entry.seq)
            p = entry.payload
            rows = self._db.execute("SELECT event FROM events WHERE ledger_seq = ? ORDER BY seq",
                                    (entry.seq,)).fetchall()
            events = [json.loads(r[0]) for r in rows]
            where = f"{self.path} batch of ledger seq {entry.seq} (kernel {entry.subject})"
            if len(events) != p.get("count"):
                problems.append(Problem("missing", where, f"{len(events)} events stored, the "
                                                          f"ledger says {p.get('count')}"))
            elif batch_digest(events) != p.get("sha256"):
                problems.append(Problem("changed", where, "stored events differ from what the "
                                                          "ledger attests (sha256)"))
        for (seq,) in self._db.execute("SELECT DISTINCT ledger_seq FROM events"):
            if seq not in known:
                problems.append(Problem("ledger", f"{self.path} ledger seq {seq}",
                                        "stored events with no kernel_events ledger entry"))
        return problems

