"""Recorded runs: a parameterized notebook executed by papermill in the guarded ``lora`` kernel,
sealed as a run record ``<state>/runs/<run_id>/`` and appended to the ledger.

The runner is the trusted side. It never trusts what the notebook or the user's files claim;
everything untrusted happens in children that run as the run's user
(:mod:`lora_kernel.trusted.executor`), and the runner keeps only what it checked::

    runner (this module; service mode: root, effective uid of the service account)
      ├─ recover stale runs (lora_kernel.trusted.recovery)
      ├─ child "pin" as the user: validate config, hash notebook/config/dataset/base model
      │    (resuming: find and hash the latest checkpoint in the old run's work folder)
      ├─ <state>/runs/.active/<run_id>.json + lock (who, what, pinned inputs, when)
      ├─ child "run" as the user: papermill → kernel "lora" (guard + execution log),
      │    env: LORA_RUN_ID, LORA_HOME=<working home>; never the state directory;
      │    work folder <home>/work/<run_id>/ (output/, checkpoints, executed.ipynb)
      ├─ waits (timeout, Ctrl-C/SIGTERM/SIGHUP, a cancelled request); then kills every process
      │    carrying LORA_RUN_ID; children die with the runner (PR_SET_PDEATHSIG)
      ├─ child "collect" as the user: evidence as a tar → checked, extracted into staging
      └─ manifest (pinned inputs), seal (atomic rename), ledger entry
A run that fails — a cell raises, the kernel dies (even SIGKILL), the executor is killed, the
timeout passes, Ctrl-C — is recorded too, with whatever the executor wrote of the notebook,
marked ``failed``; then :class:`~lora_kernel.common.errors.RunFailed` is raised naming the
record. If the runner itself dies, ``lora audit recover`` seals the run as failed later.

:func:`resume_run` continues a failed training run into a new record: the runner reads the old
run's sealed record (its own state), the pin child finds the checkpoint in the old work folder
(the user's), and the new manifest names the run and checkpoint it continued.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    RunFailed,
    UnsafeModelError,
    VerificationError,
)
from lora_kernel.common.paths import lora_home, runs_dir
from lora_kernel.common.timeutil import iso_time, utc_now
from lora_kernel.common.yamlio import load_yaml
from lora_kernel.provenance.records import load_manifest, manifest_sha256, record_files
from lora_kernel.trusted import hashcache
from lora_kernel.trusted.evidence import collect_evidence, extract_evidence_file
from lora_kernel.trusted.executor import pinned_parameters
from lora_kernel.trusted.identity import Actor, current_actor
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.sealing import (
    build_manifest,
    make_staging_dir,
    seal_record,
    write_manifest,
)
from lora_kernel.trusted.supervisor import (
    Privileges,
    RunAs,
    child_cwd,
    kill_run_processes,
    spawn,
    stop,
)

__all__ = ["RunRecord", "RunContext", "ResumeFrom", "new_run_id", "notebook_dir",
           "notebook_for_task", "run_config", "run_notebook", "resume_run", "KERNEL_NAME"]

KERNEL_NAME = "lora"
# Called with a succeeded run's staging folder and manifest ``extra`` before sealing.
BeforeSeal = Callable[[Path, dict[str, Any]], None]
NOTEBOOKS = {"image": "train_image_lora.ipynb", "text": "train_text_lora.ipynb"}
# Environment the children of a service-mode run get (nothing else of the runner's).
SERVICE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")
# Variables never handed to a run's children, in any mode.
ENV_DROP = ("LORA_STATE", "LORA_RUNNER")


@dataclass
class RunRecord:
    """A sealed run: its id, folder, status, ``manifest.json`` sha256 and ledger entry."""

    run_id: str
    path: Path
    status: str
    manifest_sha256: str
    ledger_seq: int
    seconds: float
    result: dict[str, Any] | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (what the runner service sends back)."""
        return {"run_id": self.run_id, "path": str(self.path), "status": self.status,
                "manifest_sha256": self.manifest_sha256, "ledger_seq": self.ledger_seq,
                "seconds": self.seconds, "result": self.result, "error": self.error,
                "files": self.files}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The inverse of :meth:`to_dict`."""
        return cls(**{**data, "path": Path(data["path"])})


@dataclass
class RunContext:
    """Who a run is for and how its children are started.

    ``actor`` is the authenticated requester (trainer); ``run_as`` the OS user its children run
    as; ``privileges`` the runner's root/service-account switching; ``env`` the children's base
    environment (local mode: this process's, minus the state directory); ``cancelled`` is
    polled while the run executes (the service: the requester hung up; a string it returns
    is recorded as why the run stopped); ``progress`` receives
    the executor's stdout: progress records, one JSON object a line (each cell's start and end,
    the training loop's ``train_start`` / ``step`` / ``train_end``, and ``done``; see
    :mod:`lora_kernel.trusted.executor`), which ``lora run`` renders; None: no progress.
    """

    actor: Actor
    run_as: RunAs = field(default_factory=RunAs.local)
    privileges: Privileges = field(default_factory=Privileges)
    env: dict[str, str] | None = None
    cancelled: Callable[[], bool | str | None] = lambda: False
    progress: Callable[[bytes], None] | None = None

    @classmethod
    def local(cls, progress: Callable[[bytes], None] | None = None) -> RunContext:
        """This process's user, no switching (local mode)."""
        return cls(actor=current_actor(), progress=progress)

    def child_env(self, home: Path, run_id: str | None = None) -> dict[str, str]:
        """The environment of a child: the base environment without the state directory,
        plus the working home and the run id (which tags the kernel's events)."""
        if self.env is not None:
            env = dict(self.env)
        else:
            env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
        env.update({"LORA_HOME": str(home), "PYTHONUNBUFFERED": "1"})
        if run_id:
            env["LORA_RUN_ID"] = run_id
        return env


def service_env(run_as: RunAs, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base environment of a service-mode run's children: the user's identity variables
    from the passwd entry, a few of the runner's neutral variables, and ``extra``."""
    env = {k: os.environ[k] for k in SERVICE_ENV_KEEP if k in os.environ}
    env.setdefault("PATH", f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin")
    env.update({"HOME": run_as.home_dir or "/", "USER": run_as.name or "",
                "LOGNAME": run_as.name or ""})
    env.update(extra or {})
    return env


def new_run_id(now: dt.datetime | None = None) -> str:
    """A time-sortable, unguessable run id: ``20261125T201500Z-ab12cd``."""
    now = now or utc_now()
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def notebook_dir() -> Path:
    """Where the training notebooks live: ``$LORA_NOTEBOOKS`` or the checkout's ``notebooks/``."""
    env = os.environ.get("LORA_NOTEBOOKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "notebooks"


def notebook_for_task(task: str) -> Path:
    """The training notebook of ``task`` (``image`` or ``text``)."""
    if task not in NOTEBOOKS:
        raise ConfigError(f"no notebook for task {task!r}; use image or text", key="task")
    path = notebook_dir() / NOTEBOOKS[task]
    if not path.is_file():
        raise ConfigError(f"training notebook {path} not found; fix: set LORA_NOTEBOOKS to the "
                          f"folder holding {NOTEBOOKS[task]}", key="task")
    return path


def config_task(config_path: str | os.PathLike[str]) -> str:
    """The ``task:`` of a config file (``image`` when absent), read without validating it:
    it only picks the notebook, which then validates the whole config as the user."""
    data = load_yaml(config_path, what="config")
    task = data.get("task", "image") if isinstance(data, dict) else "image"
    return str(task)


def run_config(config_path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None,
               *, notebook: str | os.PathLike[str] | None = None, **kw: Any) -> RunRecord:
    """Run the training notebook of a config's task (``lora run --config``); see
    :func:`run_notebook` for the keywords. ``overrides`` are config keys (``-p key value``)."""
    config_path = Path(config_path).resolve()
    nb = Path(notebook) if notebook else notebook_for_task(config_task(config_path))
    params = {"config_path": str(config_path), "overrides": dict(overrides or {})}
    return run_notebook(nb, params, **kw)


@dataclass(frozen=True)
class ResumeFrom:
    """A failed training run to continue: its id and the work folder holding its checkpoints,
    both from its sealed record."""

    run_id: str
    work: str


def resume_run(run_id: str, *, home: str | os.PathLike[str] | None = None,
               state: str | os.PathLike[str] | None = None, timeout: float | None = None,
               ctx: RunContext | None = None,
               log: Callable[[str], None] | None = None) -> RunRecord:
    """Continue the failed (interrupted) training run ``run_id`` from its latest checkpoint
    as a new recorded run (``lora run --resume RUN``).

    The old record must verify against the ledger; it gives the notebook, the config file and
    the overrides (run again, pinned again: the resumed run refuses a changed config) and the
    work folder. The pin child finds the latest checkpoint there, as the user; the notebook
    gets it as ``resume_from``; the new manifest records ``extra.resumed_from_run`` and
    ``extra.resumed_from_checkpoint``. Raises :class:`ConfigError` for an unknown run, a run
    that succeeded or is no training run, or whose work folder or checkpoints are gone (nothing
    run); otherwise as :func:`run_notebook`.
    """
    from lora_kernel.provenance.audit import verify_run
    from lora_kernel.provenance.ledger import LedgerReader

    with LedgerReader(state=state) as ledger:
        problems = verify_run(run_id, ledger, state)
    record = runs_dir(state) / run_id
    if problems:
        raise VerificationError(f"run {run_id} does not verify, so it is not resumed: "
                                + "; ".join(map(str, problems)))
    if not record.is_dir():
        raise ConfigError(f"run {run_id} was pruned: nothing to resume", key="RUN")
    meta = load_manifest(record)["predicate"]["runDetails"]["metadata"]
    extra = meta.get("extra") or {}
    if meta.get("status") == "succeeded":
        raise ConfigError(f"run {run_id} succeeded: there is nothing to resume; fix: to train "
                          "longer, start a new run with a larger max_train_steps (lora run "
                          "--config ... -p max_train_steps N)", key="RUN")
    if extra.get("kind") != "training" or not extra.get("config_path"):
        raise ConfigError(f"run {run_id} is not a training run: nothing to resume", key="RUN")
    if not extra.get("work_dir"):
        raise ConfigError(f"run {run_id} records no work folder (no checkpoints kept): nothing "
                          "to resume; fix: start a new run (lora run --config ...)", key="RUN")
    overrides = dict((extra.get("parameters") or {}).get("overrides") or {})
    overrides.pop("output_dir", None)  # the new run's work folder replaces it
    params = {"config_path": extra["config_path"], "overrides": overrides}
    return run_notebook(str(extra.get("notebook_path") or extra["notebook"]), params, home=home,
                        state=state, timeout=timeout, ctx=ctx, log=log,
                        resume=ResumeFrom(run_id, str(extra["work_dir"])))


def run_notebook(notebook: str | os.PathLike[str], parameters: Mapping[str, Any] | None = None,
                 *, home: str | os.PathLike[str] | None = None,
                 state: str | os.PathLike[str] | None = None, timeout: float | None = None,
                 ctx: RunContext | None = None,
                 log: Callable[[str], None] | None = None,
                 resume: ResumeFrom | None = None,
                 check_pinned: Callable[[dict[str, Any]], None] | None = None,
                 extra: Mapping[str, Any] | None = None,
                 before_seal: BeforeSeal | None = None,
                 model_hash_cache: bool = True) -> RunRecord:
    """Execute ``notebook`` with papermill in the ``lora`` kernel and seal its run record.

    ``parameters`` are papermill parameters. A training notebook (one that declares
    ``config_path``) needs ``config_path``: the runner validates that config with
    ``overrides``, points ``output_dir`` at the run's work folder, injects ``result_path`` and
    pins the resolved config, base model, dataset files and seed before anything runs.
    ``timeout`` bounds the run (seconds); ``ctx`` says who the run is for (default: this
    process's user, local mode); ``resume`` continues a failed run (:func:`resume_run`).
    A replay (:mod:`lora_kernel.trusted.replay`) passes ``check_pinned`` (called with the pin
    step's answer before anything runs; raising stops the run, nothing recorded), ``extra``
    (merged into the manifest's ``extra``) and ``before_seal`` (called with the staging folder
    and ``extra`` of a succeeded run before its manifest is built). ``model_hash_cache``:
    take the base model's digest from the state directory's digest cache when its stat key
    matches (:mod:`lora_kernel.trusted.hashcache`); a replay passes False (hash in full).
    Raises :class:`ConfigError`/:class:`UnsafeModelError` (nothing run, nothing recorded) for
    invalid input, :class:`RunFailed` (record written;
    ``.record`` is the failed :class:`RunRecord`) when the run does not succeed.
    """
    from lora_kernel.trusted.recovery import recover

    ctx = ctx or RunContext.local()
    say = log or (lambda _msg: None)
    home_p = lora_home(home)
    runs = runs_dir(state)
    notebook = Path(notebook).resolve()
    try:
        params = json.loads(json.dumps(dict(parameters or {})))  # plain JSON, our own copy
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"notebook parameters must be plain JSON values: {exc}") from None
    for rec in recover(state=state, ctx=ctx):
        say(f"recovered stale run {rec.run_id}: sealed as failed ({rec.error})")
    run_id = new_run_id()
    work = home_p / "work" / run_id
    spec: dict[str, Any] = {"notebook": str(notebook), "parameters": params,
                            "home": str(home_p), "work": str(work)}
    if resume is not None:
        spec["resume"] = {"run_id": resume.run_id, "work": resume.work}
    cache_uid = ctx.run_as.uid if ctx.run_as.uid is not None else os.getuid()
    if model_hash_cache:
        spec["model_digests"] = hashcache.lookup(cache_uid, state)
    # The executor starts now (papermill, the kernel) while the pin child hashes the inputs;
    # it runs only when the pin step and the checks below accept the run (_Prestart.abort).
    prestart = _Prestart(ctx, run_id, home_p, work)
    handed = False
    try:
        pinned = _child_json(ctx, "pin", spec, home_p)
        stat_key = pinned.pop("base_model_stat_key", None)
        if not pinned.pop("base_model_hash_cached", False) and model_hash_cache \
                and isinstance(stat_key, str) \
                and isinstance(pinned.get("base_model_sha256"), str):
            hashcache.store(cache_uid, stat_key, pinned["base_model_sha256"], state)
        params = pinned_parameters(params, pinned, work)
        if check_pinned is not None:
            check_pinned(pinned)
        if resume is not None:
            if not isinstance(pinned.get("resume"), dict):
                raise LoraError("the pin step answered no checkpoint to resume from")
            pinned["resume"]["run_id"] = resume.run_id  # ours, not the child's word
            params["resume_from"] = str(pinned["resume"]["checkpoint"])
        run = {"run_id": run_id, "notebook": str(notebook), "parameters": params,
               "home": str(home_p), "work": str(work), "started": iso_time(),
               "actor": {"name": ctx.actor.name, "uid": ctx.actor.uid, "source": ctx.actor.source},
               "run_as": {"uid": ctx.run_as.uid, "name": ctx.run_as.name},
               "pinned": {k: v for k, v in pinned.items() if k != "notebook_source"}}
        if extra:
            run["extra"] = json.loads(json.dumps(dict(extra)))
        with ActiveRun(runs, run) as active:
            say(f"run {run_id}: {notebook.name} in kernel '{KERNEL_NAME}' (papermill)")
            t0 = time.monotonic()
            known = ({"key": stat_key, "sha256": pinned["base_model_sha256"]}
                     if isinstance(stat_key, str) and pinned.get("base_model_sha256") else None)
            handed = True  # from here on _execute stops it, whatever happens
            rc, reason = _execute(ctx, run, pinned["notebook_source"], active.staging, timeout,
                                  prestart, base_model_digest=known)
            return seal_run(run, active.staging, rc=rc, reason=reason, ctx=ctx, state=state,
                            seconds=time.monotonic() - t0, log=say, before_seal=before_seal)
    except BaseException as exc:
        if not handed:
            prestart.abort(clean=isinstance(exc, Exception))
        raise


class ActiveRun:
    """``<runs>/.active/<run_id>.json`` (what the run is) and ``.lock`` (held while the runner
    lives): how :func:`lora_kernel.trusted.recovery.recover` tells a dead runner's run from a
    live one. Also makes the run's staging folder."""

    def __init__(self, runs: Path, run: dict[str, Any]) -> None:
        self.dir = runs / ".active"
        self.run = run
        self.run_id = run["run_id"]
        self._fd: int | None = None
        self.staging = Path()

    def __enter__(self) -> ActiveRun:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.dir / f"{self.run_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.staging = make_staging_dir(self.dir.parent, self.run_id)
        self.run["staging"] = str(self.staging)
        tmp = self.dir / f".{self.run_id}.json.tmp"
        tmp.write_text(json.dumps(self.run, indent=1), encoding="utf-8")
        os.replace(tmp, self.dir / f"{self.run_id}.json")
        return self

    def __exit__(self, *exc: object) -> None:
        (self.dir / f"{self.run_id}.json").unlink(missing_ok=True)
        (self.dir / f"{self.run_id}.lock").unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)


def _python() -> list[str]:
    return [sys.executable, "-m", "lora_kernel.trusted.executor"]


def _child_json(ctx: RunContext, command: str, spec: dict[str, Any], home: Path
                ) -> dict[str, Any]:
    """Run an executor command that answers one JSON object; re-raise its typed errors."""
    proc = spawn([*_python(), command], run_as=ctx.run_as, privileges=ctx.privileges,
                 env=ctx.child_env(home), cwd=child_cwd(home, ctx.privileges),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(json.dumps(spec).encode())
    try:
        answer = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        raise LoraError(f"the run's {command} step crashed (exit {proc.returncode}): "
                        + err.decode("utf-8", "replace")[-2000:]) from None
    if "error" in answer:
        e = answer["error"]
        cls = {2: ConfigError, 3: UnsafeModelError}.get(int(e.get("exit_code", 1)), LoraError)
        raise cls(str(e.get("message")))
    return dict(answer)


# How long a pre-started executor may take to stop its kernel and remove the work folder when
# the pin step refuses the run, before it is killed.
PRESTART_ABORT_S = 30.0


class _LateLog:
    """A child's stderr, read on a thread: kept in memory until :meth:`attach` names the file
    (the staging folder exists only once the pin step accepted the run), then written there."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._fh: IO[bytes] | None = None
        self._stream = stream
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self._stream is not None
        while True:
            chunk = self._stream.read1(4096) if hasattr(self._stream, "read1") \
                else self._stream.read(4096)
            if not chunk:
                break
            with self._lock:
                if self._fh is not None:
                    self._fh.write(chunk)
                    self._fh.flush()
                else:
                    self._buffer.append(chunk)

    def attach(self, path: Path) -> None:
        """Write what came so far, and from now on everything, to ``path``."""
        with self._lock:
            self._fh = open(path, "wb")  # noqa: SIM115 - closed by finish()
            self._fh.write(b"".join(self._buffer))
            self._fh.flush()
            self._buffer.clear()

    def finish(self) -> None:
        """Wait for the end of the stream (bounded), close the file."""
        self._thread.join(timeout=5)
        with self._lock:
            if self._fh is not None:
                self._fh.close()


class _Prestart:
    """The executor's ``run`` child of a run, pre-started (as the run's user, with the run's
    environment), started before the pin step so that papermill's import and the kernel's
    start overlap the hashing. It makes the work folder and starts the kernel there, then
    waits for its spec on stdin (:func:`_execute`); :meth:`abort` stops it when the run is
    refused."""

    def __init__(self, ctx: RunContext, run_id: str, home: Path, work: Path) -> None:
        self.ctx, self.run_id = ctx, run_id
        self.proc = spawn([*_python(), "run"], run_as=ctx.run_as,
                          privileges=ctx.privileges, env=ctx.child_env(home, run_id),
                          cwd=child_cwd(home, ctx.privileges), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.errlog = _LateLog(self.proc.stderr)
        setup = {"prestart": True, "work": str(work), "kernel_name": KERNEL_NAME,
                 "progress": ctx.progress is not None}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(setup) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once: _execute reports its exit code

    def abort(self, clean: bool = True) -> None:
        """The run is refused (nothing recorded): end of input tells the child to stop its
        kernel and remove the work folder it made (``clean``; bounded by
        :data:`PRESTART_ABORT_S`); then every process of the run still alive is killed."""
        try:
            if clean:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=PRESTART_ABORT_S)
        except (OSError, subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        finally:
            if self.proc.poll() is None:
                stop(self.proc, self.ctx.privileges)
            kill_run_processes(self.run_id, self.ctx.privileges)
            self.errlog.finish()


def _execute(ctx: RunContext, run: dict[str, Any], notebook_source: str, staging: Path,
             timeout: float | None, prestart: _Prestart,
             base_model_digest: dict[str, str] | None = None) -> tuple[int | None, str | None]:
    """Hand the run to its pre-started executor (its kernel running, :class:`_Prestart`) and
    wait for it; return ``(exit code, why it stopped)``.

    ``base_model_digest`` (the pin step's stat key and digest of the base model) goes with
    the spec; the executor writes it to a file in the work folder that the kernel's
    ``$LORA_BASE_MODEL_DIGEST_FILE`` names, so the training there does not hash the model
    again while its stat key is unchanged (:func:`lora_kernel.training.models.model_sha256`).

    Its stderr goes to ``executor.log`` in the staging folder (written by the runner), its
    stdout (progress) to ``ctx.progress``. Whatever ends the run, every process still carrying
    ``LORA_RUN_ID`` is killed before the record is built.
    """
    spec = {"notebook_source": notebook_source, "parameters": run["parameters"],
            "work": run["work"], "kernel_name": KERNEL_NAME,
            "progress": ctx.progress is not None, "base_model_digest": base_model_digest}
    reason = None
    proc = prestart.proc
    pump = _pump(proc.stdout, ctx.progress)
    deadline = time.monotonic() + timeout if timeout else None
    try:
        prestart.errlog.attach(staging / "executor.log")
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.close()
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                reason = f"timed out after {timeout:g}s"
                break
            why = ctx.cancelled()
            if why:
                reason = why if isinstance(why, str) else "cancelled: the requester went away"
                break
            try:
                proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        reason = "interrupted (SIGINT / SIGTERM / SIGHUP)"
    except BrokenPipeError:
        pass  # the executor died before reading its spec: its exit code says why
    finally:
        if proc.poll() is None:
            stop(proc, ctx.privileges)
        kill_run_processes(run["run_id"], ctx.privileges)
        pump.join(timeout=5)
        prestart.errlog.finish()
    return proc.returncode, reason


def _pump(stream: IO[bytes] | None, sink: Callable[[bytes], None] | None) -> threading.Thread:
    """Forward a child's output to ``sink`` (or drop it) on a thread."""
    def loop() -> None:
        assert stream is not None
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            if sink is not None:
                try:
                    sink(chunk)
                except (OSError, ValueError):
                    pass  # a gone terminal or client must not stop the run
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


# -- sealing --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when missing or unreadable (a killed writer)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _failure_reason(rc: int | None, reason: str | None, error: dict[str, Any] | None,
                    result: dict[str, Any] | None, training: bool) -> str | None:
    """Why the run failed, in one line; None when it succeeded."""
    if reason:
        return reason
    if error:
        where = f" in cell {error['cell_index']}" if error.get("cell_index") is not None else ""
        return f"{error.get('ename')}{where}: {error.get('evalue')}"
    if rc is not None and rc < 0:
        return f"executor killed by signal {signal.Signals(-rc).name}"
    if rc != 0:
        return f"executor exited with code {rc}"
    if training and result is None:
        return "the notebook finished without writing its result (result_path)"
    return None


def seal_run(run: dict[str, Any], staging: Path, *, rc: int | None, reason: str | None,
             ctx: RunContext, state: str | os.PathLike[str] | None, seconds: float,
             log: Callable[[str], None], before_seal: BeforeSeal | None = None) -> RunRecord:
    """Collect, build, seal and ledger the record of ``run``; raise :class:`RunFailed` for a
    failed run. Used by :func:`run_notebook` and by recovery (``rc`` None, a ``reason``)."""
    run_id = run["run_id"]
    if run.get("evidence"):  # a Kubernetes Job's tar on the output volume (hub.k8s_run)
        notes = extract_evidence_file(Path(run["evidence"]), staging)
    else:
        notes = collect_evidence(ctx, run, staging, _python())
    error = _read_json(staging / "error.json")
    (staging / "error.json").unlink(missing_ok=True)
    result = _read_json(staging / "run_result.json")
    pinned = run["pinned"]
    training = pinned.get("kind") == "training"
    failure = _failure_reason(rc, reason, error, result, training)
    executed = staging / "executed.ipynb"
    if executed.is_file() and _read_json(executed) is None:  # cut mid-write: keep the bytes
        os.rename(executed, staging / "executed.ipynb.partial")
        notes.append("executed notebook was cut mid-write (kept as executed.ipynb.partial)")
    elif not executed.is_file():
        notes.append("the executor wrote no notebook")
    events = [json.loads(line) for line in
              (staging / "events.jsonl").read_text(encoding="utf-8").splitlines()
              if line.strip()] if (staging / "events.jsonl").is_file() else []
    status = "failed" if failure else "succeeded"
    params = run["parameters"]
    extra: dict[str, Any] = {
        "kind": pinned.get("kind"), "notebook": Path(run["notebook"]).name,
        "notebook_path": run["notebook"], "parameters": params, "kernel": KERNEL_NAME,
        "executor_exit_code": rc, "error": failure, "notes": notes,
        "identity": run["actor"]["source"], "run_as": run["run_as"],
        "cells_executed": sum(1 for e in events if e.get("type") == "execute")}
    if training:
        extra.update({"config_path": pinned["config_path"],
                      "config_sha256": pinned["config_sha256"]})
    if result is not None:
        extra.update({k: result.get(k) for k in ("steps", "losses", "eval_loss_before",
                                                 "eval_loss_after", "seconds", "cache_hit")})
    if isinstance(pinned.get("resume"), dict):
        resumed = pinned["resume"]
        extra["resumed_from_run"] = resumed.get("run_id")
        extra["resumed_from_checkpoint"] = {k: resumed.get(k)
                                            for k in ("checkpoint", "step", "sha256")}
    extra.update(run.get("extra") or {})  # a replay: kind "replay", replay_of
    if failure:
        extra["work_dir"] = run["work"]  # checkpoints stay there for `lora run --resume RUN`
    elif before_seal is not None:
        before_seal(staging, extra)
    manifest = build_manifest(
        staging, run_id=run_id, user=run["actor"]["name"], uid=run["actor"]["uid"],
        host=socket.gethostname(), started=run["started"], ended=utc_now(), status=status,
        config=pinned.get("config") or {"parameters": params},
        base_model_sha256=pinned.get("base_model_sha256", ""),
        dataset_version=pinned.get("dataset_version", ""),
        dataset_digests=pinned.get("dataset_digests", {}),
        notebook_source_sha256=pinned["notebook_sha256"],
        seed=int(pinned.get("seed", params.get("seed", 0)) or 0),
        egress_refusals=sum(1 for e in events if e.get("type") == "refusal"), extra=extra)
    write_manifest(staging, manifest)
    record = seal_record(staging, runs_dir(state), run_id)
    with Ledger(state=state) as ledger:
        entry = ledger.append_run(record)
    rec = RunRecord(run_id=run_id, path=record, status=status,
                    manifest_sha256=manifest_sha256(record), ledger_seq=entry.seq,
                    seconds=seconds, result=result, error=failure, files=record_files(record))
    log(f"run {run_id}: {status} in {seconds:.1f}s; record {record}")
    if failure:
        exc = RunFailed(f"run {run_id} failed: {failure}; the failed run is recorded in {record}")
        exc.record = rec
        raise exc
    _remove_work(ctx, run)
    return rec


def _remove_work(ctx: RunContext, run: dict[str, Any]) -> None:
    """Remove a succeeded run's work folder (as its user: it is theirs). A Kubernetes run's
    work folder is on the output volume: the runs service removes it with the Job."""
    if run.get("backend") == "kubernetes":
        return
    if not ctx.run_as.switches:
        shutil.rmtree(run["work"], ignore_errors=True)
        return
    proc = spawn(["rm", "-rf", "--", run["work"]], run_as=ctx.run_as,
                 privileges=ctx.privileges, env=ctx.child_env(Path(run["home"])), cwd="/")
    proc.wait()

