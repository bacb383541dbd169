"""The kernel's execution log: one event per executed cell, per refusal, per process launch.

Events are dicts (one JSON object per line). Every event carries ``v`` (format version),
``seq`` (1, 2, ... per kernel, never reused), ``time`` (UTC ISO 8601), ``type``, ``user``,
``host``, ``pid``, ``kernel_id`` and ``run_id`` (``$LORA_RUN_ID`` or ``None``).

Types and their own fields:

``kernel_start``   ``version``, ``policy``, ``python``
``execute``        ``session``, ``msg_id``, ``username`` (the frontend's), ``notebook``,
                   ``cell_id``, ``execution_count``, ``silent``, ``code``, ``sha256``,
                   ``duration_ms``, ``status`` (ok | error | aborted), ``ename``
``refusal``        ``event`` (audit event), ``destination``, ``location``, ``message``
``process`` / ``ctypes`` / ``audithook``   ``event``, ``destination``, ``location``
``kernel_stop``    (nothing else)

A process forked from the kernel (``!cmd`` forks through a pty, then execs) logs its own
``process`` event for the ``exec`` it makes, under a ``kernel_id`` of its own
(``<kernel's id>/fork-<pid>``, ``seq`` from 1, ``parent_kernel_id``), into the local file only:
the fork happened in the kernel (its ``os.fork``/``os.forkpty`` event is the kernel's), and
the child may already have closed every inherited descriptor (ptyprocess does, before exec).

Where they go:

* always the local file ``<home>/logs/<user>/kernel-YYYY-MM-DD.jsonl`` (UTC day), opened in
  append mode and flushed per event (no fsync: a cell must stay cheap);
* when ``$LORA_AUDIT_URL`` is set (the hub's audit service), also an :class:`HttpSink`. Events
  for it are first appended to a spool ``<home>/logs/<user>/spool/<kernel_id>.jsonl``; a
  background thread posts them in order, in batches, and records what was acknowledged in
  ``<kernel_id>.acked``. If the sink is down, events wait in the spool and are sent when it
  comes back, by this kernel or by the next kernel of the same user (orphaned spools).

Runs as: the user (their kernel; a recorded run's kernel as the run's user).
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.paths import lora_home
from lora_kernel.common.timeutil import parse_time

FORMAT_VERSION = 1
BATCH_MAX = 200


class SinkError(OSError):
    """The audit sink could not be reached or did not accept a batch."""


def current_user(environ=None) -> str:
    """The platform user: ``$JUPYTERHUB_USER`` under the hub, else the OS login name."""
    env = os.environ if environ is None else environ
    name = env.get("JUPYTERHUB_USER") or getpass.getuser()
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name) or "unknown"


def log_dir(home=None, user: str | None = None) -> Path:
    """``<home>/logs/<user>``: where a user's kernel logs and spool live."""
    return lora_home(home) / "logs" / (user or current_user())


def _now() -> tuple[str, str]:
    now = datetime.now(UTC)
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z"), now.strftime("%Y-%m-%d")


class HttpSink:
    """Posts batches of events as JSON to the hub's audit service.

    Body: ``{"kernel_id": ..., "user": ..., "events": [...]}``; header
    ``Authorization: token <JUPYTERHUB_API_TOKEN>`` when a token is given. Any 2xx answer
    acknowledges the whole batch; anything else raises :class:`SinkError`.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 3.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"audit sink URL must be http(s)://host[:port]/path, got {url!r}")
        self.url, self.token, self.timeout = url, token, timeout
        self._parts = parts

    def send(self, kernel_id: str, user: str, events: list[dict]) -> None:
        """Deliver one batch, or raise :class:`SinkError`."""
        p = self._parts
        conn_cls = (http.client.HTTPSConnection if p.scheme == "https"
                    else http.client.HTTPConnection)
        body = json.dumps({"kernel_id": kernel_id, "user": user, "events": events}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        conn = conn_cls(p.hostname, p.port, timeout=self.timeout)
        try:
            conn.request("POST", (p.path or "/") + (f"?{p.query}" if p.query else ""),
                         body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
        except OSError as exc:
            raise SinkError(f"audit sink {self.url} unreachable: {exc}") from exc
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise SinkError(f"audit sink {self.url} answered HTTP {resp.status}")


def sink_from_env(environ=None) -> HttpSink | None:
    """The hub sink when ``$LORA_AUDIT_URL`` is set (token: ``$JUPYTERHUB_API_TOKEN``)."""
    env = os.environ if environ is None else environ
    url = env.get("LORA_AUDIT_URL")
    if not url:
        return None
    return HttpSink(url, env.get("JUPYTERHUB_API_TOKEN") or None)


class Spool:
    """An append-only file of events not yet acknowledged by the sink, plus a cursor.

    ``<name>.jsonl`` holds the events; ``<name>.acked`` holds ``"<seq> <byte offset>"`` of
    the last acknowledged one. The owning kernel holds an ``flock`` on the spool so that
    other kernels can tell a live spool from an orphan.
    """

    def __init__(self, path: Path, lock: bool = True):
        self.path = Path(path)
        self.cursor_path = self.path.with_suffix(".acked")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=0)  # one write() per event line
        if lock:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if another owns it

    def append(self, line: bytes) -> None:
        """Append one serialised event (ending in a newline)."""
        self._fh.write(line)

    def cursor(self) -> tuple[int, int]:
        """``(last acknowledged seq, byte offset after it)``."""
        try:
            seq, offset = self.cursor_path.read_text().split()
            return int(seq), int(offset)
        except FileNotFoundError:
            return 0, 0

    def pending(self, limit: int = BATCH_MAX) -> tuple[list[dict], int]:
        """Up to ``limit`` unacknowledged events and the offset after the last one."""
        _, offset = self.cursor()
        events = []
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a write in progress
                events.append(json.loads(line))
                offset += len(line)
                if len(events) >= limit:
                    break
        return events, offset

    def ack(self, seq: int, offset: int) -> None:
        """Record that everything up to ``seq`` (ending at ``offset``) was delivered."""
        atomic_write(self.cursor_path, f"{seq} {offset}\n")

    def drained(self) -> bool:
        """Whether every appended event was acknowledged."""
        return self.cursor()[1] >= self.path.stat().st_size

    def close(self, remove_if_drained: bool = True) -> None:
        """Release the lock; delete the files when nothing is left to deliver."""
        if remove_if_drained and self.drained():
            self.path.unlink(missing_ok=True)
            self.cursor_path.unlink(missing_ok=True)
        self._fh.close()


def deliver(spool: Spool, sink: HttpSink, kernel_id: str, user: str) -> int:
    """Send everything pending in ``spool``, in order; return how many were delivered.

    Stops at the first failure (raising :class:`SinkError`); what was acknowledged before
    stays acknowledged, so nothing is sent twice by this process and nothing is lost.
    """
    sent = 0
    while True:
        events, offset = spool.pending()
        if not events:
            return sent
        sink.send(kernel_id, user, events)
        spool.ack(events[-1]["seq"], offset)
        sent += len(events)


def _call(ref: weakref.ref, method: str) -> None:
    """Call ``method`` of the object ``ref`` points to, if it still exists."""
    obj = ref()
    if obj is not None:
        getattr(obj, method)()


class ExecLog:
    """The event writer of one kernel: local daily JSONL file, optional spooled sink.

    ``emit()`` is thread-safe and cheap (a JSON dump and one or two buffered writes); the
    sink is served by a daemon thread started with :meth:`start`.
    """

    def __init__(self, home=None, user: str | None = None, kernel_id: str | None = None,
                 sink: HttpSink | None = None, environ=None):
        env = os.environ if environ is None else environ
        self.user = user or current_user(env)
        self.dir = log_dir(home, self.user)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kernel_id = kernel_id or str(uuid.uuid4())
        self.base = {"v": FORMAT_VERSION, "user": self.user, "host": socket.gethostname(),
                     "pid": os.getpid(), "kernel_id": self.kernel_id,
                     "run_id": env.get("LORA_RUN_ID") or None}
        self.notebook = env.get("JPY_SESSION_NAME") or env.get("LORA_NOTEBOOK") or None
        self.sink = sink
        self.spool = Spool(self.dir / "spool" / f"{self.kernel_id}.jsonl") if sink else None
        self.sink_error: str | None = None
        self._seq = 0
        self._lock = threading.RLock()
        self._day = None
        self._fh = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deliver_lock = threading.Lock()
        self._delivering = threading.local()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _call(ref, "_after_fork_in_child"))

    def _after_fork_in_child(self) -> None:
        """In a forked child: its own id and counter, fresh locks, the file reopened on the
        next event (the inherited descriptor may be closed before the child's exec), no sink."""
        parent = self.kernel_id
        self.kernel_id = f"{parent}/fork-{os.getpid()}"
        self.base = {**self.base, "pid": os.getpid(), "kernel_id": self.kernel_id,
                     "parent_kernel_id": parent}
        self._seq = 0
        self._lock = threading.RLock()
        self._fh = None
        self._day = None
        self.spool = None
        self.sink = None
        self._thread = None
        self._delivering = threading.local()

    # -- writing ------------------------------------------------------------------
    def emit(self, type_: str, **fields) -> dict:
        """Write one event of ``type_`` with ``fields``; return it."""
        with self._lock:
            self._seq += 1
            stamp, day = _now()
            event = {**self.base, "seq": self._seq, "time": stamp, "type": type_, **fields}
            line = (json.dumps(event, default=str, ensure_ascii=False) + "\n").encode()
            if day != self._day:
                if self._fh is not None:
                    self._fh.close()
                self._fh = open(self.dir / f"kernel-{day}.jsonl", "ab", buffering=0)
                self._day = day
            self._fh.write(line)  # unbuffered: one O_APPEND write() per event
            if self.spool is not None:
                self.spool.append(line)
                self._wake.set()
        return event

    def record_execution(self, code: str, parent: dict | None, reply: dict | None,
                         duration_s: float, silent: bool = False,
                         cell_id: str | None = None) -> dict:
        """Log one execute_request: who, where, what (code + sha256), how long, outcome."""
        parent = parent or {}
        header = parent.get("header") or {}
        meta = parent.get("metadata") or {}
        if reply is None:
            status, ename, count = "aborted", "KernelInterrupted", None
        else:
            status, ename = reply.get("status", "unknown"), reply.get("ename")
            count = reply.get("execution_count")
        return self.emit(
            "execute", session=header.get("session"), msg_id=header.get("msg_id"),
            username=header.get("username"), notebook=self.notebook,
            cell_id=cell_id or meta.get("cellId"), execution_count=count, silent=silent,
            code=code, sha256=hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
            duration_ms=round(duration_s * 1000.0, 3), status=status, ename=ename)

    def record_guard_event(self, ev) -> None:
        """Log a :class:`lora_kernel.kernel.guard.GuardEvent` (called inside the audit hook).

        Refusals met by the sink's own thread are not logged (they would feed themselves);
        they show up as ``sink_error``.
        """
        if getattr(self._delivering, "on", False):
            self.sink_error = ev.message or ev.destination
            return
        fields = {"event": ev.event, "destination": ev.destination, "location": ev.location}
        if ev.message:
            fields["message"] = ev.message
        self.emit(ev.kind, **fields)

    # -- delivery -----------------------------------------------------------------
    def start(self) -> None:
        """Start the delivery thread (no-op without a sink)."""
        if self.sink is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lora-execlog-sink",
                                        daemon=True)
        self._thread.start()

    def _run(self, backoff_max: float = 30.0) -> None:
        backoff = 0.5
        self._deliver_orphans()
        while not self._stop.is_set():
            self._wake.wait(timeout=backoff if self.sink_error else 5.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._deliver_now(self.spool, self.kernel_id)
                self.sink_error, backoff = None, 0.5
            except (SinkError, ValueError) as exc:
                self.sink_error = str(exc)
                backoff = min(backoff * 2, backoff_max)

    def _deliver_now(self, spool: Spool, kernel_id: str) -> int:
        """One delivery pass, serialised, flagged so the guard's refusals of the sink's
        own traffic are not logged as user events."""
        with self._deliver_lock:
            self._delivering.on = True
            try:
                return deliver(spool, self.sink, kernel_id, self.user)
            finally:
                self._delivering.on = False

    def _deliver_orphans(self) -> None:
        """Send what dead kernels of this user left in their spools."""
        for path in sorted((self.dir / "spool").glob("*.jsonl")):
            if path.stem == self.kernel_id:
                continue
            try:
                orphan = Spool(path)
            except BlockingIOError:
                continue  # a live kernel owns it
            try:
                self._deliver_now(orphan, path.stem)
            except SinkError as exc:
                self.sink_error = str(exc)
            finally:
                orphan.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Try to deliver the spool now (from the caller's thread); True when drained."""
        if self.spool is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._deliver_now(self.spool, self.kernel_id)
                return True
            except SinkError as exc:
                self.sink_error = str(exc)
                time.sleep(0.2)
        return False

    def close(self, timeout: float = 2.0) -> None:
        """Log ``kernel_stop``, stop the thread, make a last delivery attempt, close files."""
        self.emit("kernel_stop")
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush(timeout)
        with self._lock:
            if self.spool is not None:
                self.spool.close()
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def read_events(home=None, run_id: str | None = None, since=None,
                user: str | None = None) -> list[dict]:
    """Read kernel events from ``<home>/logs/*/kernel-*.jsonl`` as dicts.

    ``run_id`` keeps events of that ``LORA_RUN_ID``; ``since`` (datetime, ISO string or epoch
    seconds) keeps events at or after that time (and skips the daily files before its day);
    ``user`` limits to one user's folder. Events come back ordered by time, then kernel, then
    ``seq``. A truncated last line (a kernel killed mid-write) is skipped; any other malformed
    line raises ``ValueError`` (with ``run_id``: only a line that names the run is parsed, so
    a run's collection does not parse the whole history of the log).
    """
    root = lora_home(home) / "logs"
    since_dt = parse_time(since) if since is not None else None
    first_day = since_dt.strftime("%Y-%m-%d") if since_dt else ""
    events = []
    pattern = f"{user}/kernel-*.jsonl" if user else "*/kernel-*.jsonl"
    needle = run_id.encode() if run_id is not None else b""
    for path in sorted(root.glob(pattern)):
        if path.stem[len("kernel-"):] < first_day:
            continue
        data = path.read_bytes()
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):
                break
            if needle not in line:  # cannot be this run's event: not parsed
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON event: {exc}") from None
            if run_id is not None and event.get("run_id") != run_id:
                continue
            if since_dt is not None and parse_time(event["time"]) < since_dt:
                continue
            events.append(event)
    events.sort(key=lambda e: (e["time"], e.get("kernel_id", ""), e.get("seq", 0)))
    return events
