"""The runner service (service mode): ``lora runner serve``, and the client the CLI uses.

The service is started as root (systemd unit, container entrypoint) with the state directory,
the service account and a Unix socket. It makes the state directory the service account's
(mode 0700) and listens on the socket (mode 0666: any local user may ask). Per connection it
forks a handler that

1. learns who is asking from the socket itself (``SO_PEERCRED``: the kernel states the peer's
   uid; :func:`lora_kernel.trusted.identity.peer_actor`) — the request carries no identity;
2. drops to the service account's effective uid (records, ledger and key are written as that
   account) and serves one request:

   ``run``      a notebook run (:func:`lora_kernel.trusted.runner.run_notebook`) whose
                children run as the requesting user, with their groups and only their working
                home; log lines and the progress bar stream back; if the requester hangs up,
                the run is stopped and sealed as failed;
   ``resume``   continue a failed run's training into a new record that references it;
   ``review``   approve / reject as the requesting user (the reviewers-group check uses the
                OS groups of the peer uid);
   ``publish``  publish an approved run as the requesting user;
   ``withdraw`` withdraw a run's publication as the requesting user (a reviewer or its
                publisher);
   ``recover``  seal stale runs (:func:`lora_kernel.trusted.recovery.recover`).

Protocol: one JSON line from the client; JSON lines back: ``{"log": text}``,
``{"progress": text}``, then ``{"result": ...}`` or ``{"error": {"type", "exit_code",
"message", "record"}}``.

Runs as: root with the service account's effective uid (the runner service); :func:`call`, its
client, as the caller.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import select
import socket
import socketserver
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    PolicyRefusal,
    RunFailed,
    error_from_answer,
)
from lora_kernel.common.paths import RUNNER_SOCKET
from lora_kernel.trusted.identity import Actor, peer_actor
from lora_kernel.trusted.supervisor import Privileges, RunAs

logger = logging.getLogger(__name__)
# Variables of the service's own (root's) environment handed to a run's children.
PASS_ENV = ("LORA_POLICIES", "LORA_NOTEBOOKS", "JUPYTER_PATH")


def prepare_state(state: Path, service_user: str) -> None:
    """Create the state directory (and ``runs/``, ``ledger/``) owned by the service account,
    mode 0700. Refuses a state directory that others can read or write."""
    pw = pwd.getpwnam(service_user)
    for path in (state, state / "runs", state / "ledger"):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o700)


class _Handler(socketserver.StreamRequestHandler):
    server: RunnerServer

    def send(self, obj: dict[str, Any]) -> None:
        """One JSON line to the client; a client that went away is not an error here (the
        run it asked for still ends, is sealed and cleaned up)."""
        try:
            self.wfile.write(json.dumps(obj, default=str).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            pass

    def hung_up(self) -> bool:
        """Whether the client closed its end (poll, without reading its data)."""
        ready, _w, _x = select.select([self.request], [], [], 0)
        if not ready:
            return False
        try:
            peeked: bytes = self.request.recv(1, socket.MSG_PEEK)
            return peeked == b""
        except OSError:
            return True

    def handle(self) -> None:
        try:
            actor = peer_actor(self.request)
            line = self.rfile.readline(1 << 20)
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ConfigError("a request is one JSON object")
            privileges = Privileges.for_service_account(self.server.service_user)
            privileges.drop()
            result = self.server.dispatch(request, actor, privileges, self)
            self.send({"result": result})
        except LoraError as exc:
            record = getattr(exc, "record", None)
            self.send({"error": {"type": type(exc).__name__, "exit_code": exc.exit_code,
                                 "message": str(exc),
                                 "record": record.to_dict() if record is not None else None}})
        except (ValueError, KeyError, TypeError) as exc:
            self.send({"error": {"type": "ConfigError", "exit_code": 2,
                                 "message": f"malformed request: {exc}"}})
        except BrokenPipeError:
            pass


class RunnerServer(socketserver.ForkingMixIn, socketserver.UnixStreamServer):
    """The runner service: one forked handler per connection (see the module docstring)."""

    def __init__(self, socket_path: Path, state: Path, service_user: str) -> None:
        self.state = state
        self.service_user = service_user
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        socket_path.unlink(missing_ok=True)
        super().__init__(str(socket_path), _Handler)
        os.chmod(socket_path, 0o666)

    def dispatch(self, request: dict[str, Any], actor: Actor, privileges: Privileges,
                 conn: _Handler) -> Any:
        """Serve one request for ``actor`` (already authenticated)."""
        from lora_kernel.trusted.runner import RunContext, run_notebook, service_env

        op = request.get("op")
        run_as = RunAs.for_user(actor.name)
        extra = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        ctx = RunContext(actor=actor, run_as=run_as, privileges=privileges,
                         env=service_env(run_as, extra), cancelled=conn.hung_up)
        if op in ("run", "resume"):
            from lora_kernel.trusted.accounts import run_accounts

            ctx.isolation = run_accounts(privileges, self.state)
            from lora_kernel.trusted.runner import resume_run

            home = Path(str(request["home"]))
            if not home.is_absolute():
                raise ConfigError(f"the working home must be an absolute path, got {home}")
            if request.get("progress"):
                ctx.progress = lambda chunk: conn.send(
                    {"progress": chunk.decode("utf-8", "replace")})
            if op == "resume":  # the old record is read here, its work folder as the user
                rec = resume_run(str(request["run"]), home=home, state=self.state,
                                 timeout=request.get("timeout"), ctx=ctx,
                                 log=lambda msg: conn.send({"log": msg}))
            else:
                rec = run_notebook(str(request["notebook"]), request.get("parameters") or {},
                                   home=home, state=self.state, timeout=request.get("timeout"),
                                   ctx=ctx, log=lambda msg: conn.send({"log": msg}))
            return rec.to_dict()
        if op == "review":
            from lora_kernel.trusted.review import approve, reject

            fn = approve if request.get("decision") == "approve" else reject
            step = request.get("step")
            entry = fn(str(request["run"]), str(request.get("note", "")), actor=actor,
                       state=self.state, step=int(step) if step is not None else None)
            return {"seq": entry.seq, "payload": entry.payload}
        if op == "publish":
            from lora_kernel.trusted.review import publish

            step = request.get("step")
            dest = publish(str(request["run"]), str(request["to"]), request.get("name"),
                           actor=actor, state=self.state,
                           step=int(step) if step is not None else None)
            return {"path": str(dest)}
        if op == "withdraw":
            from lora_kernel.trusted.review import withdraw

            name = request.get("name")
            entries = withdraw(str(request["run"]), str(request.get("note", "")),
                               name=str(name) if name else None, actor=actor, state=self.state)
            return [{"seq": e.seq, "payload": e.payload} for e in entries]
        if op == "recover":
            from lora_kernel.trusted.recovery import recover

            return [r.to_dict() for r in recover(state=self.state, ctx=ctx)]
        if op in ("audit_list", "audit_show", "data_versions", "data_show"):
            return audit_view(op, request, actor, self.state)
        raise ConfigError(f"unknown request {op!r}; one of run, resume, review, publish, "
                          "withdraw, recover, audit_list, audit_show, data_versions, "
                          "data_show")


def sees_every_run(actor: Actor) -> bool:
    """Reviewers and auditors (the groups ``policies/hub.yaml`` maps to ``auditor``) see every
    run's record; anyone else sees their own."""
    from lora_kernel.common.policy import load_policy
    from lora_kernel.trusted.identity import in_group
    from lora_kernel.trusted.review import is_reviewer

    if is_reviewer(actor):
        return True
    roles = load_policy("hub", {}).get("roles") or {}
    return any(role == "auditor" and in_group(actor, group) for group, role in roles.items())


def audit_view(op: str, request: dict[str, Any], actor: Actor, state: Path) -> Any:
    """``lora audit list`` / ``show`` for a caller who cannot read the state directory: the
    service reads it and answers with the runs the caller may see (:func:`sees_every_run`,
    else their own: a trainer's samples, losses and metrics instead of a PermissionError)."""
    import datetime as dt

    from lora_kernel.common.timeutil import parse_time
    from lora_kernel.provenance.audit import list_runs, show

    everyone = sees_every_run(actor)

    def mine(user: Any, uid: Any) -> bool:
        return everyone or actor.same_person(str(user), uid)

    if op == "audit_list":
        times: dict[str, dt.datetime | None] = {}
        for key in ("since", "until"):
            times[key] = parse_time(str(request[key])) if request.get(key) else None
        rows = list_runs(state=state, user=request.get("user"), since=times["since"],
                         until=times["until"], status=request.get("status"),
                         review=request.get("review"), expired=bool(request.get("expired")),
                         columns=list(request.get("columns") or []))
        return json.loads(json.dumps([r for r in rows if mine(r.get("user"), r.get("uid"))],
                                     default=str))
    if op in ("data_versions", "data_show"):
        return _data_view(op, request, state, everyone, mine)
    run_id = str(request["run"])
    info = show(run_id, state=state)
    if not mine(info.get("user"), info.get("uid")):
        raise PolicyRefusal(f"run {run_id} is not yours; fix: ask a reviewer or auditor, who "
                            "see every run")
    return json.loads(json.dumps(info, default=str))


def _data_view(op: str, request: dict[str, Any], state: Path, everyone: bool,
               mine: Callable[[Any, Any], bool]) -> Any:
    """``lora data versions`` / ``show`` through the service: the snapshot store's dataset
    versions the caller's own kept runs were pinned on (reviewers and auditors: all), each
    naming only the caller's runs."""
    from lora_kernel.provenance.audit import list_runs
    from lora_kernel.provenance.datasets import dataset_version, dataset_versions

    own = None if everyone else {r["run_id"] for r in list_runs(state=state)
                                 if mine(r.get("user"), r.get("uid"))}

    def visible(v: dict[str, Any]) -> dict[str, Any] | None:
        if own is None:
            return v
        runs = [r for r in v.get("runs") or [] if r in own]
        if not runs:
            return None
        return {**v, "runs": runs,
                "first_run": v.get("first_run") if v.get("first_run") in own else None}

    if op == "data_versions":
        return [x for x in (visible(v) for v in dataset_versions(state)) if x is not None]
    version = str(request.get("version"))
    seen = visible(dataset_version(version, state))
    if seen is None:
        raise PolicyRefusal(f"no run of yours was pinned on {version}; fix: ask a reviewer or "
                            "auditor, who see every dataset version")
    return seen


def serve(socket_path: Path, state: Path, service_user: str) -> None:
    """Run the service until interrupted (root only)."""
    if os.geteuid() != 0:
        raise PolicyRefusal("the runner service starts as root (it runs each user's kernel as "
                            "that user); fix: start it from systemd or the hub image as root")
    prepare_state(state, service_user)
    with RunnerServer(socket_path, state, service_user) as server:
        logger.info("lora runner: serving %s (state %s, service account %s)", socket_path, state,
                    service_user)
        server.serve_forever()


# -- client -----------------------------------------------------------------------------------
def runner_socket(explicit: str | None = None) -> Path | None:
    """The runner service's socket if service mode applies: ``--runner``, ``$LORA_RUNNER``, or
    the platform's default socket when it exists; None means local mode."""
    value = explicit or os.environ.get("LORA_RUNNER")
    if value:
        return Path(value)
    return RUNNER_SOCKET if RUNNER_SOCKET.exists() else None


def call(socket_path: Path, request: dict[str, Any],
         on_log: Callable[[str], None] = lambda _m: None,
         on_progress: Callable[[str], None] = lambda _m: None) -> Any:
    """Send one request to the runner service and return its result; its typed errors are
    raised as the same classes (a failed run's :class:`RunFailed` carries the record)."""
    from lora_kernel.trusted.runner import RunRecord

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as exc:
        raise ConfigError(f"cannot reach the runner service at {socket_path}: {exc.strerror}; "
                          "fix: ask an admin to start `lora runner serve`, or unset "
                          "LORA_RUNNER for a local run") from None
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps(request).encode() + b"\n")
        stream.flush()
        for raw in stream:
            msg = json.loads(raw)
            if "log" in msg:
                on_log(str(msg["log"]))
            elif "progress" in msg:
                on_progress(str(msg["progress"]))
            elif "result" in msg:
                return msg["result"]
            elif "error" in msg:
                err = msg["error"]
                error = error_from_answer(err)
                if isinstance(error, RunFailed) and err.get("record"):
                    error.record = RunRecord.from_dict(err["record"])
                raise error
    raise LoraError(f"the runner service at {socket_path} closed the connection without an "
                    "answer")
