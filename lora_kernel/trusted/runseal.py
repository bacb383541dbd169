"""Sealing any run: the ``.active`` protocol, collecting a run's evidence as its user, and
the record's manifest, seal and ledger entry. Runs as the service account (local mode: the
requesting user's own account), on the trusted side.

Shared by the three places that end a run — the local runner (:mod:`lora_kernel.trusted.runner`),
recovery of a dead runner's runs (:mod:`lora_kernel.trusted.recovery`) and the Kubernetes
backend of the runs service (``hub/services/k8s_run.py``) — so none of them reaches into
another's internals::

    with ActiveRun(runs, run) as active:      # <runs>/.active/<run_id>.json + .lock held
        ... the run executes (its children write into the work folder)
        seal_run(run, active.staging, ...)    # collect → manifest → seal → ledger
    stale_runs(state)                         # announced runs whose runner is gone

A runner announces each run in ``<state>/runs/.active/<run_id>.json`` and holds an exclusive
``flock`` on ``<run_id>.lock`` while it lives; Linux drops the lock when the process dies,
however it dies, so a run whose lock can be taken is stale (:func:`stale_runs`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.contract import EXECUTOR_MODULE, KERNEL_NAME
from lora_kernel.common.errors import ConfigError, RunFailed
from lora_kernel.common.notebooks import training_notebook_digests
from lora_kernel.common.paths import runs_dir
from lora_kernel.common.runspec import PinnedInputs, RunDescription
from lora_kernel.common.timeutil import utc_now
from lora_kernel.provenance.records import manifest_sha256, record_files
from lora_kernel.trusted.evidence import (
    events_since,
    extract_evidence,
    extract_evidence_file,
)
from lora_kernel.trusted.identity import Actor, current_actor
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.sealing import (
    ManifestContext,
    build_manifest,
    make_staging_dir,
    seal_record,
    write_manifest,
)
from lora_kernel.trusted.supervisor import Privileges, RunAs, spawn

__all__ = ["ActiveRun", "BeforeSeal", "KERNEL_NAME", "RunContext", "RunRecord",
           "collect_evidence", "executor_command", "seal_run", "stale_runs", "try_lock"]

# Called with a succeeded run's staging folder and manifest ``extra`` before sealing.
BeforeSeal = Callable[[Path, dict[str, Any]], None]
# Variables never handed to a run's children, in any mode.
ENV_DROP = ("LORA_STATE", "LORA_RUNNER")


def executor_command() -> list[str]:
    """The command line of the user-side steps (pin, run, collect): this interpreter."""
    return [sys.executable, "-m", EXECUTOR_MODULE]


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
    :mod:`lora_kernel.steps.executor`), which ``lora run`` renders; None: no progress.
    """

    actor: Actor
    run_as: RunAs = field(default_factory=RunAs.local)
    privileges: Privileges = field(default_factory=Privileges)
    env: dict[str, str] | None = None
    isolation: Any = None  # service mode: the run-account pool (trusted.accounts.RunAccounts)
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


# -- the .active protocol -----------------------------------------------------------------
class ActiveRun:
    """``<runs>/.active/<run_id>.json`` (what the run is) and ``.lock`` (held while the runner
    lives): how :func:`stale_runs` tells a dead runner's run from a live one. Also makes the
    run's staging folder (``run.staging``)."""

    def __init__(self, runs: Path, run: RunDescription) -> None:
        self.dir = runs / ".active"
        self.run = run
        self.run_id = run.run_id
        self._fd: int | None = None
        self.staging = Path()

    def __enter__(self) -> ActiveRun:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_state_space(self.dir)
        self._fd = os.open(self.dir / f"{self.run_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        reserve_space(self.reserve)
        self.staging = make_staging_dir(self.dir.parent, self.run_id)
        self.run.staging = str(self.staging)
        atomic_write(self.dir / f"{self.run_id}.json", json.dumps(self.run.to_dict(), indent=1))
        return self

    @property
    def reserve(self) -> Path:
        """The space held for sealing this run when the state store fills up
        (:func:`seal_run` frees it to write a minimal failed record)."""
        return self.dir / f"{self.run_id}.reserve"

    def __exit__(self, _type: object, exc: object, _tb: object) -> None:
        self.reserve.unlink(missing_ok=True)
        if getattr(exc, "unsealed", False):  # no record could be written: leave the run
            if self._fd is not None:         # announced for `lora audit recover`
                os.close(self._fd)
            return
        (self.dir / f"{self.run_id}.json").unlink(missing_ok=True)
        (self.dir / f"{self.run_id}.lock").unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)


#: Bytes held per live run in the state store for a minimal failed record (manifest, ledger
#: entry) should the store fill up while the run is sealed.
RESERVE_BYTES = 256 * 1024
#: Free bytes a run needs in the state store to start, besides its reserve.
START_MARGIN_BYTES = 256 * 1024


def check_state_space(folder: Path) -> None:
    """Refuse to start a run (:class:`ConfigError`, exit 2) when the state store holding
    ``folder`` has less free space than a reserve and a margin: such a run could not be
    recorded."""
    free = shutil.disk_usage(folder).free
    need = RESERVE_BYTES + START_MARGIN_BYTES
    if free < need:
        raise ConfigError(f"the state store has {free // 1024} KiB free; a run needs at least "
                          f"{need // 1024} KiB to be recorded; fix: free space there (or "
                          "`lora audit prune` old records) before starting runs",
                          file=folder.parent.parent, key="state")


def reserve_space(path: Path) -> None:
    """Write :data:`RESERVE_BYTES` to ``path`` (really allocated, not a sparse file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)



def try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None when a live runner holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def stale_runs(state: str | os.PathLike[str] | None = None) -> list[RunDescription]:
    """Descriptions of active runs whose runner is gone (their lock is free), checked
    (:meth:`RunDescription.from_untrusted`: a malformed one is a :class:`LoraError`)."""
    active = runs_dir(state) / ".active"
    out = []
    for desc in sorted(active.glob("*.json")) if active.is_dir() else []:
        fd = try_lock(active / f"{desc.stem}.lock")
        if fd is None:
            continue
        os.close(fd)
        out.append(RunDescription.from_untrusted(json.loads(desc.read_text(encoding="utf-8")),
                                                 where=str(desc)))
    return out


# -- collecting ---------------------------------------------------------------------------
def collect_evidence(ctx: RunContext, run: RunDescription, staging: Path,
                     python: list[str] | None = None) -> list[str]:
    """Collect the work folder's evidence (as the run's user) into ``staging``; return notes
    about what was refused. ``python``: the steps' command line (:func:`executor_command`)."""
    home = Path(run.home)
    proc = spawn([*(python or executor_command()), "collect"], run_as=ctx.run_as,
                 privileges=ctx.privileges, env=ctx.child_env(home), cwd="/", stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    since = events_since({"started": run.started})
    proc.stdin.write(json.dumps({"work": run.work, "home": run.home, "run_id": run.run_id,
                                 "since": since}).encode())
    proc.stdin.close()
    notes = extract_evidence(proc.stdout, staging)
    proc.stdout.close()  # what was not read (a full disk cut it short) ends the collector
    err = proc.stderr.read() if proc.stderr else b""
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if rc != 0:
        notes.append("collecting the work folder failed: "
                     + err.decode("utf-8", "replace")[-500:])
    return notes


# -- sealing ------------------------------------------------------------------------------
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


def _inputs_differ(pinned: PinnedInputs, result: dict[str, Any]) -> str | None:
    """Why the training's own report of what it read (dataset version, base model digest)
    contradicts what the pin step hashed, or None when it agrees: a dataset or model swapped
    after the pin must not be sealed as trained on the pinned one."""
    differences = []
    for key, what in (("dataset_version", "dataset version"),
                      ("base_model_sha256", "base model sha256")):
        expected, reported = getattr(pinned, key), result.get(key)
        if expected and reported != expected:
            differences.append(f"{what}: pinned {expected}, the training read {reported}")
    if not differences:
        return None
    return ("the training read other inputs than were pinned (changed after the pin?): "
            + "; ".join(differences) + "; the adapter is not the pinned inputs' adapter")


def seal_run(run: RunDescription, staging: Path, *, rc: int | None, reason: str | None,
             ctx: RunContext, state: str | os.PathLike[str] | None, seconds: float,
             log: Callable[[str], None], before_seal: BeforeSeal | None = None) -> RunRecord:
    """Collect, build, seal and ledger the record of ``run``; raise :class:`RunFailed` for a
    failed run. Used by the runner, by recovery (``rc`` None, a ``reason``) and by the
    Kubernetes backend (``run.evidence``: the Job's tar)."""
    try:
        return _seal_run(run, staging, rc=rc, reason=reason, ctx=ctx, state=state,
                         seconds=seconds, log=log, before_seal=before_seal)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return _seal_minimal(run, staging, ctx=ctx, state=state, seconds=seconds, log=log,
                             why=str(exc))


def _seal_run(run: RunDescription, staging: Path, *, rc: int | None, reason: str | None,
              ctx: RunContext, state: str | os.PathLike[str] | None, seconds: float,
              log: Callable[[str], None], before_seal: BeforeSeal | None) -> RunRecord:
    if run.evidence:  # a Kubernetes Job's tar on the output volume (hub.k8s_run)
        notes = extract_evidence_file(Path(run.evidence), staging)
    else:
        notes = collect_evidence(ctx, run, staging)
    cut = next((n for n in notes if n.startswith("the work folder's evidence was cut short")),
               None)
    if cut is not None and "No space left" in cut:
        raise OSError(errno.ENOSPC, cut)
    error = _read_json(staging / "error.json")
    (staging / "error.json").unlink(missing_ok=True)
    result = _read_json(staging / "run_result.json")
    pinned = run.pinned
    training = pinned is not None and pinned.training
    failure = _failure_reason(rc, reason, error, result, training)
    if failure is None and cut is not None:
        failure = cut  # a record missing part of its evidence never seals as succeeded
    if failure is None and training and result is not None and pinned is not None:
        failure = _inputs_differ(pinned, result)
    notes += _keep_partial_notebook(staging)
    events = _read_events(staging / "events.jsonl")
    status = "failed" if failure else "succeeded"
    extra = _record_extra(run, rc=rc, failure=failure, notes=notes, events=events,
                          result=result)
    isolated = bool((run.extra.get("isolation") or {}).get("account"))
    if failure:
        extra["work_dir"] = run.work  # checkpoints stay there for `lora run --resume RUN`
    elif before_seal is not None:
        before_seal(staging, extra)
    context = _manifest_context(run, status=status, extra=extra, events=events)
    write_manifest(staging, build_manifest(staging, context))
    record = seal_record(staging, runs_dir(state), run.run_id)
    with Ledger(state=state) as ledger:
        entry = ledger.append_run(record)
    rec = RunRecord(run_id=run.run_id, path=record, status=status,
                    manifest_sha256=manifest_sha256(record), ledger_seq=entry.seq,
                    seconds=seconds, result=result, error=failure, files=record_files(record))
    if failure and isolated:  # kept for a resume, out of reach of the (reused) run account
        from lora_kernel.trusted.accounts import secure_work

        with ctx.privileges.elevated():
            secure_work(Path(run.work))
    log(f"run {run.run_id}: {status} in {seconds:.1f}s; record {record}")
    if failure:
        exc = RunFailed(f"run {run.run_id} failed: {failure}; the failed run is recorded in "
                        f"{record}")
        exc.record = rec
        raise exc
    _remove_work(ctx, run)
    return rec


def _seal_minimal(run: RunDescription, staging: Path, *, ctx: RunContext,
                  state: str | os.PathLike[str] | None, seconds: float,
                  log: Callable[[str], None], why: str) -> RunRecord:
    """The state store filled up while ``run`` was sealed: drop the evidence collected so far,
    free the run's reserve (:class:`ActiveRun`) and seal a record that holds only its
    manifest, failed, naming the cause; the work folder stays for ``lora run --resume``. If
    even that cannot be written, :class:`RunFailed` says so and the run stays announced in
    ``.active`` for ``lora audit recover`` (which reports it)."""
    reserve = runs_dir(state) / ".active" / f"{run.run_id}.reserve"
    if not staging.is_dir():  # sealed, then the ledger could not take its entry
        exc = RunFailed(f"run {run.run_id} was sealed in {runs_dir(state) / run.run_id} but "
                        f"the ledger could not record it: the state store is full ({why}); "
                        "`lora audit verify --all` reports it; fix: free space in the state "
                        "store")
        raise exc
    for child in list(staging.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    reserve.unlink(missing_ok=True)
    failure = (f"the state store is full (ENOSPC) while sealing: {why}; the run's evidence "
               f"(notebook, adapter, logs) could not be kept; its work folder {run.work} was "
               "kept; fix: free space in the state store, then `lora run --resume "
               f"{run.run_id}` or run it again")
    extra = _record_extra(run, rc=None, failure=failure, notes=["state store full"],
                          events=[], result=None)
    extra["work_dir"] = run.work
    try:
        context = _manifest_context(run, status="failed", extra=extra, events=[])
        write_manifest(staging, build_manifest(staging, context))
        record = seal_record(staging, runs_dir(state), run.run_id)
        with Ledger(state=state) as ledger:
            entry = ledger.append_run(record)
    except OSError as exc:
        unsealed = RunFailed(f"run {run.run_id} failed and could not be recorded: the state "
                             f"store is full ({exc}); it stays listed by `lora audit "
                             "recover`, which seals it once there is space; fix: free space "
                             "in the state store")
        unsealed.unsealed = True  # type: ignore[attr-defined]  # ActiveRun keeps it announced
        raise unsealed from None
    rec = RunRecord(run_id=run.run_id, path=record, status="failed",
                    manifest_sha256=manifest_sha256(record), ledger_seq=entry.seq,
                    seconds=seconds, error=failure, files=record_files(record))
    log(f"run {run.run_id}: failed (state store full) in {seconds:.1f}s; record {record}")
    exc2 = RunFailed(f"run {run.run_id} failed: {failure}; the failed run is recorded in "
                     f"{record}")
    exc2.record = rec
    raise exc2


def _keep_partial_notebook(staging: Path) -> list[str]:
    """Notes about the executed notebook; one cut mid-write is kept as ``.partial``."""
    executed = staging / "executed.ipynb"
    if executed.is_file() and _read_json(executed) is None:  # cut mid-write: keep the bytes
        os.rename(executed, staging / "executed.ipynb.partial")
        return ["executed notebook was cut mid-write (kept as executed.ipynb.partial)"]
    if not executed.is_file():
        return ["the executor wrote no notebook"]
    return []


def _read_events(path: Path) -> list[dict[str, Any]]:
    """The kernel's events collected with the run (none when it wrote none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _record_extra(run: RunDescription, *, rc: int | None, failure: str | None,
                  notes: list[str], events: list[dict[str, Any]],
                  result: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``extra``: what ran, how it ended, the result's numbers, the run it
    resumed, and the run's own ``extra`` (a replay's, a Job's)."""
    pinned = run.pinned
    kind = pinned.kind if pinned is not None else None
    if kind == "training" and pinned is not None \
            and pinned.notebook_sha256 not in training_notebook_digests():
        kind = "notebook"  # the user's own notebook around a config: its numbers are claims
        notes = [*notes, "the notebook is not one of the platform's training notebooks: its "
                 "adapter and numbers are self-reported (kind notebook)"]
    extra: dict[str, Any] = {
        "kind": kind,
        "notebook": Path(run.notebook).name, "notebook_path": run.notebook,
        "parameters": run.parameters, "kernel": KERNEL_NAME, "executor_exit_code": rc,
        "error": failure, "notes": notes, "identity": run.actor.source,
        "run_as": {"uid": run.run_as.uid, "name": run.run_as.name},
        "cells_executed": sum(1 for e in events if e.get("type") == "execute")}
    if pinned is not None and pinned.training:
        extra.update({"config_path": pinned.config_path, "config_sha256": pinned.config_sha256,
                      "model_family": pinned.model_family})
    if result is not None:
        extra.update({k: result.get(k) for k in ("steps", "losses", "eval_loss_before",
                                                 "eval_loss_after", "seconds", "cache_hit",
                                                 "base_weight_dtype", "trainable_dtype")})
        if result.get("distributed"):  # num_processes > 1: each rank's pid, the batch, lr
            extra["distributed"] = result["distributed"]
    if pinned is not None and pinned.resume is not None:
        extra["resumed_from_run"] = pinned.resume.run_id
        extra["resumed_from_checkpoint"] = {"checkpoint": pinned.resume.checkpoint,
                                            "step": pinned.resume.step,
                                            "sha256": pinned.resume.sha256}
    extra.update(run.extra)  # a replay: kind "replay", replay_of
    return extra


def _manifest_context(run: RunDescription, *, status: str, extra: dict[str, Any],
                      events: list[dict[str, Any]]) -> ManifestContext:
    """What the manifest says of ``run``: its pinned inputs (none when ``run.pinned`` is None:
    an unbelieved pin answer pins nothing), who, where and when."""
    pinned, params = run.pinned, run.parameters
    training = pinned is not None and pinned.training
    seed = pinned.seed if pinned is not None and training else params.get("seed", 0)
    return ManifestContext(
        run_id=run.run_id, user=run.actor.name, uid=run.actor.uid, host=socket.gethostname(),
        started=run.started, ended=utc_now(), status=status,
        config=(pinned.config if pinned is not None else None) or {"parameters": params},
        base_model_sha256=(pinned.base_model_sha256 if pinned is not None else None) or "",
        dataset_version=(pinned.dataset_version if pinned is not None else None) or "",
        dataset_digests=(pinned.dataset_digests if pinned is not None else None) or {},
        notebook_source_sha256=pinned.notebook_sha256 if pinned is not None else "",
        seed=int(seed or 0),
        egress_refusals=sum(1 for e in events if e.get("type") == "refusal"), extra=extra,
        dependencies=_init_adapter_dependency(pinned))


def _init_adapter_dependency(pinned: PinnedInputs | None) -> tuple[dict[str, Any], ...]:
    """The adapter a run continued from (``init_adapter``), pinned by its sha256 as an input
    of the manifest, so ``lora audit lineage`` finds every run that started from it."""
    if pinned is None or not pinned.init_adapter_sha256:
        return ()
    uri = str((pinned.config or {}).get("init_adapter") or "")
    return ({"name": "init_adapter", "uri": uri,
             "digest": {"sha256": pinned.init_adapter_sha256}},)


def _remove_work(ctx: RunContext, run: RunDescription) -> None:
    """Remove a succeeded run's work folder (as its user: it is theirs). A Kubernetes run's
    work folder is on the output volume: the runs service removes it with the Job."""
    if run.backend == "kubernetes":
        return
    if not ctx.run_as.switches:
        shutil.rmtree(run.work, ignore_errors=True)
        return
    if (run.extra.get("isolation") or {}).get("account"):  # a run account's private folder
        with ctx.privileges.elevated():
            shutil.rmtree(run.work, ignore_errors=True)
        return
    inputs = (run.extra.get("snapshot") or {}).get("inputs")
    if inputs and Path(str(inputs)).parent.name == run.run_id:  # <state>-runs/<run_id>/inputs
        with ctx.privileges.elevated():  # the laid-out snapshot is the runner's
            shutil.rmtree(Path(str(inputs)).parent, ignore_errors=True)
    proc = spawn(["rm", "-rf", "--", run.work], run_as=ctx.run_as,
                 privileges=ctx.privileges, env=ctx.child_env(Path(run.home)), cwd="/")
    proc.wait()

