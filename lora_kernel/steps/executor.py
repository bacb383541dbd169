"""The runner's child process: ``python -m lora_kernel.steps.executor pin|run|collect``.

It runs as the run's user (service mode: their uid and groups; local mode: the same user), so
everything it reads — config, dataset, base model, notebook, the work folder — is read with
that user's permissions, and nothing it does can touch the state directory. It reads one JSON
spec on stdin and answers on stdout; the trusted runner (:mod:`lora_kernel.trusted.runner`)
decides what to believe:

``pin``      validate the config and hash every input (notebook bytes, config file, dataset
             files, base model); answer JSON. A notebook that declares ``config_path`` (a
             training notebook) without one, or given a parameter it does not declare, is
             refused before anything runs. To resume an interrupted run (``"resume"``: its id
             and work folder, from its sealed record) it finds and hashes the latest
             checkpoint in that work folder, which is the user's: only this child reads it.
``pin-resume`` find and hash the latest checkpoint of the run to resume, for a run whose
             work folder belongs to a run account (:mod:`lora_kernel.trusted.accounts`): run
             as the account of the run that resumes it, which the runner lent it to.
``run``      execute the pinned notebook (its bytes come from the spec, not from disk again)
             with papermill in the ``lora`` kernel into the work folder; on a cell error
             papermill saves the notebook first, then ``error.json`` says what failed (exit 1).
             With ``"progress"`` it writes progress records on stdout, one JSON object a line
             (:class:`ProgressRelay`): each cell's start and end, and the training loop's
             steps, tailed from ``<work>/progress.jsonl`` (the kernel appends them there,
             named by ``$LORA_PROGRESS_FILE``). ``lora run`` renders them.
             Started early (a first line ``{"prestart": true, ...}``), while the pin step
             still hashes: it starts the kernel and imports papermill, then reads the spec on
             a second line (:func:`prestarted_run`).
``snapshot`` write the pinned input files the runner asks for (those its content-addressed
             store lacks) as an uncompressed tar on stdout, read with the user's rights
             (:mod:`lora_kernel.trusted.objects` hashes and stores them).
``collect``  write the run's evidence from the work folder as an uncompressed tar on stdout:
             only plain files under fixed names (:data:`COLLECTED`), links refused. The runner
             extracts it with its own checks
             (:func:`lora_kernel.trusted.evidence.extract_evidence`).

Errors of ``pin`` come back as ``{"error": {"type", "exit_code", "message"}}`` with that exit
code. Heavy imports (papermill, the training package) happen inside the commands.

Runs as: the run's user (a child the runner starts as them, or a Job's container).
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lora_kernel.common.contract import (
    BASE_MODEL_DIGEST_FILE_ENV,
    DIGEST_FILE,
    EXECUTOR_MODULE,
    OUTPUT_EXTRAS,
    PROGRESS_ENV,
)
from lora_kernel.common.digests import sha256_bytes
from lora_kernel.common.errors import ConfigError, LoraError
from lora_kernel.common.paths import private_dir
from lora_kernel.steps.cleanenv import apply_recorded_run_environment

# Optional imports that nothing here needs and that cost seconds at every child's start:
# jsonschema (imported by nbformat, which papermill imports) loads ``rfc3987_syntax`` when
# installed, and that builds a grammar at import (1.7 s of a 2.4 s ``import papermill`` on a
# 2-core machine). It only adds the "iri" / "iri-reference" format checkers, which nbformat's
# schema validation does not use. Blocked in this process (an ImportError for jsonschema, which
# suppresses it); the kernel is a separate process and keeps its own imports.
SKIPPED_IMPORTS = ("rfc3987_syntax",)


def _skip_slow_imports() -> None:
    for name in SKIPPED_IMPORTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: ImportError


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- pin ------------------------------------------------------------------------------------
def pin(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate and hash the inputs of a run request (see the module docstring)."""
    from lora_kernel.common.nbparams import declared_parameters

    notebook = Path(spec["notebook"])
    try:
        source = notebook.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the notebook: {exc.strerror}", file=notebook) from None
    declared = set(declared_parameters(notebook, source))
    params = dict(spec.get("parameters") or {})
    home = Path(spec["home"])
    out: dict[str, Any] = {"notebook": str(notebook), "notebook_sha256": sha256_bytes(source),
                           "notebook_source": source.decode("utf-8"),
                           "declared": sorted(declared), "kind": "notebook"}
    _check_writable(home)
    training = "config_path" in declared
    if training and not params.get("config_path"):
        raise ConfigError(f"{notebook.name} is a training notebook and no config was given: a "
                          "run is recorded only with its inputs pinned; fix: lora run --config "
                          "my.yaml, or lora run NOTEBOOK -f params.yaml with config_path: in it")
    undeclared = sorted(set(params) - declared)
    if training and undeclared:  # papermill would set it as a variable nobody reads
        raise ConfigError(f"{notebook.name} has no parameter {undeclared[0]!r} (its "
                          f"parameters: {', '.join(sorted(declared))}); fix: pass config keys "
                          "in overrides (lora run -p KEY VALUE)", key=undeclared[0])
    if params.get("resume_from"):
        raise ConfigError("resume_from is set by `lora run --resume RUN` (which records the "
                          "run it continues); fix: lora run --resume RUN", key="resume_from")
    if params.get("config_path"):
        out.update(_pin_training(params, Path(spec["work"]), spec.get("model_digests")))
    if spec.get("resume"):
        if out["kind"] != "training" or "resume_from" not in declared:
            raise ConfigError(f"{notebook.name} cannot resume a run (it declares no "
                              "resume_from parameter)", file=notebook)
        out["resume"] = _pin_resume(spec["resume"], out["config"])
    return out


def pin_resume(spec: dict[str, Any]) -> dict[str, Any]:
    """``pin-resume``: :func:`_pin_resume` for a run whose checkpoints belong to its run
    account (the requester's pin step cannot read them); run as that account."""
    if "resume_from" not in (spec.get("declared") or []):
        raise ConfigError(f"{Path(str(spec.get('notebook'))).name} cannot resume a run (it "
                          "declares no resume_from parameter)", file=spec.get("notebook"))
    return _pin_resume(spec["resume"], spec.get("config") or {})


def _pin_resume(resume: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The latest checkpoint in the work folder of the run to resume: path, step, digest."""
    from lora_kernel.common.digests import path_sha256
    from lora_kernel.training.loop import checkpoint_step, latest_checkpoint

    run_id, work = str(resume["run_id"]), Path(resume["work"])
    again = "fix: start a new run (lora run --config ...)"
    if not work.is_dir():
        raise ConfigError(f"the work folder {work} of run {run_id} is gone, and its "
                          f"checkpoints with it: nothing to resume from; {again}", key="RUN")
    ckpt = latest_checkpoint(work / "output")
    if ckpt is None:
        raise ConfigError(f"run {run_id} left no checkpoint in {work / 'output' / 'checkpoints'}"
                          f" (save_steps: 0, or it stopped before the first save); {again} "
                          "with save_steps > 0", key="RUN")
    step = checkpoint_step(ckpt)
    limit = config.get("max_train_steps")
    if step is not None and limit and step >= limit:
        raise ConfigError(f"run {run_id} reached its last step ({step} of {limit}) before it "
                          f"stopped: nothing to resume; {again} with a larger max_train_steps",
                          key="RUN")
    return {"run_id": run_id, "checkpoint": str(ckpt), "step": step,
            "sha256": path_sha256(ckpt)}


def _check_writable(home: Path) -> None:
    """The working home must be a folder this user can write (runs work inside it). One that
    others can read is tightened to mode 0700 (:func:`private_dir`); a missing one is made
    0700 by the run step (:func:`_make_folders`)."""
    if home.exists() and not home.is_dir():
        raise ConfigError("the working home is a file, not a folder; fix: --home a folder",
                          file=home)
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), home)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"the working home is not writable by {os.getuid()}; fix: --home a "
                          "folder you own", file=home)
    if home.exists():
        private_dir(home)


def _make_folders(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents, each mode 0700 (a working home created here
    must not be readable by other users, as ``mkdir -p`` under umask 022 would leave it);
    returns the folders made, outermost first."""
    made = [p for p in (*reversed(path.parents), path) if not p.exists()]
    for folder in made:
        folder.mkdir(mode=0o700, exist_ok=True)
    return made


def _pin_training(params: dict[str, Any], work: Path,
                  known: dict[str, str] | None = None) -> dict[str, Any]:
    from lora_kernel.common.digests import sha256_file
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.data import dataset_paths, dataset_version

    overrides = params.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"parameter 'overrides' must be a mapping, got {overrides!r}")
    overrides = {**overrides, "output_dir": str(work / "output")}
    cfg = load_config(params["config_path"], overrides)
    if cfg.source is None:  # load_config always records the file it read
        raise RuntimeError(f"load_config({params['config_path']!r}) lost its source file")
    paths = dataset_paths(cfg)
    digests = {key: sha256_file(f) for key, f in paths.items()}
    base = _pin_base_model(cfg.base_model, known or {})
    # where each pinned file is, so that the runner can ask for the ones its content-addressed
    # store lacks (the ``snapshot`` command); the runner hashes what it receives itself
    sources = {"dataset": {key: str(f) for key, f in paths.items()},
               "base_model": str(Path(cfg.base_model).expanduser().resolve()),
               "config": str(Path(cfg.source).resolve())}
    init: dict[str, Any] = {}
    if cfg.init_adapter:  # the adapter this run continues from: pinned like the base model
        from lora_kernel.common.digests import path_sha256

        init_path = Path(cfg.init_adapter).expanduser().resolve()
        try:
            init = {"init_adapter_sha256": path_sha256(init_path)}
        except OSError as exc:
            raise ConfigError(f"cannot read init_adapter: {exc.strerror or exc}; fix: point "
                              "it at a readable adapter", file=cfg.source,
                              key="init_adapter") from None
        sources["init_adapter"] = str(init_path)
    return {"kind": "training", "snapshot_sources": sources, "config": cfg.to_dict(),
            "overrides": overrides,
            "config_path": str(cfg.source), "config_sha256": sha256_file(cfg.source),
            "task": cfg.task, "seed": cfg.seed, "dataset_digests": digests,
            "dataset_version": dataset_version(cfg, digests),
            **base, **init, "dataset_warnings": cfg.dataset_warnings,
            "model_family": cfg.model_family}


def _pin_base_model(path: str, known: dict[str, str]) -> dict[str, Any]:
    """The base model's digest, from ``known`` (the runner's digest cache for this user,
    :mod:`lora_kernel.trusted.hashcache`) when its stat key matches exactly, else hashed in
    full. ``base_model_stat_key`` is the key when it did not change while hashing (else
    None: nothing to cache); the runner removes both helper keys before recording."""
    from lora_kernel.common.digests import stat_key
    from lora_kernel.training.models import model_sha256

    try:
        before = stat_key(path)
    except OSError:
        before = None
    if before is not None and isinstance(known.get(before), str):
        return {"base_model_sha256": known[before], "base_model_stat_key": before,
                "base_model_hash_cached": True}
    digest = model_sha256(path)
    try:
        after = stat_key(path)
    except OSError:
        after = None
    return {"base_model_sha256": digest,
            "base_model_stat_key": before if before is not None and before == after else None,
            "base_model_hash_cached": False}


# -- run ------------------------------------------------------------------------------------
def run(spec: dict[str, Any]) -> int:
    """Execute the pinned notebook with papermill; 0 on success, 1 after writing error.json."""
    work = Path(spec["work"])
    _make_folders(work / "output")
    apply_recorded_run_environment(work)
    relay = ProgressRelay(work / "progress.jsonl") if spec.get("progress") else None
    if relay is not None:
        os.environ[PROGRESS_ENV] = str(relay.path)  # the kernel inherits it
    try:
        return _run_notebook(spec, work, relay, None)
    finally:
        if relay is not None:
            relay.close()


def _run_notebook(spec: dict[str, Any], work: Path, relay: ProgressRelay | None,
                  km: Any) -> int:
    """papermill on the spec's notebook source, in ``km``'s running kernel when given (else
    papermill starts one); 0, or 1 after writing error.json."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.reads(spec["notebook_source"], as_version=4)
    extra = {"km": km} if km is not None else {}
    try:
        papermill.execute_notebook(
            nb, str(work / "executed.ipynb"), parameters=spec["parameters"],
            kernel_name=spec["kernel_name"], cwd=str(work), progress_bar=False,
            engine_name=_cell_reporting_engine(relay.emit) if relay is not None else None,
            **extra)
    except PapermillExecutionError as exc:
        _write_error(work, exc.ename, exc.evalue, exc.cell_index)
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded for the runner, then a failing exit
        _write_error(work, type(exc).__name__, str(exc), None)
        raise
    return 0


def prestarted_run(setup: dict[str, Any], stdin: IO[str]) -> int:
    """``run`` started early: get ready to run while the runner's pin step hashes the inputs.

    ``setup`` (the first JSON line: ``{"prestart": true, "work", "kernel_name",
    "progress"}``): makes the work folder,
    starts the kernel there and imports papermill (its environment: this process's, plus
    ``$LORA_PROGRESS_FILE`` and ``$LORA_BASE_MODEL_DIGEST_FILE``). Then reads a second line,
    the ``run`` spec (with ``base_model_digest``: the pin step's stat key and digest, or None),
    and executes it in that kernel. End of input instead of a spec (the pin step refused the
    run): the kernel is shut down, what this process created is removed, exit 0.
    """
    work = Path(setup["work"])
    made = _make_folders(work / "output")
    apply_recorded_run_environment(work)  # before the kernel starts: it inherits it
    relay_path = work / "progress.jsonl"
    if setup.get("progress"):
        os.environ[PROGRESS_ENV] = str(relay_path)
    os.environ[BASE_MODEL_DIGEST_FILE_ENV] = str(work / DIGEST_FILE)
    km: Any = None
    started: Exception | None = None
    try:  # the kernel first: papermill's import overlaps its start
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        km = AsyncKernelManager(kernel_name=setup["kernel_name"])
        km.client_factory = quick_ready_client()
        run_sync(km.start_kernel)(cwd=str(work))
        import papermill  # noqa: F401 - imported now, while the pin step runs
    except Exception as exc:  # noqa: BLE001 - reported once the spec comes (or dropped)
        started = exc
    line = stdin.readline()
    if not line.strip():  # the pin step refused: nothing runs, nothing stays
        _shutdown(km)
        import shutil
        if work in made:
            shutil.rmtree(work, ignore_errors=True)
        for path in reversed(made):  # the folders above it that this process made, if empty
            if path in work.parents:
                try:
                    path.rmdir()
                except OSError:
                    pass
        return 0
    spec = json.loads(line)
    relay = ProgressRelay(relay_path) if setup.get("progress") else None
    try:
        digest = spec.get("base_model_digest")
        if isinstance(digest, dict):
            (work / DIGEST_FILE).write_text(json.dumps(digest), encoding="utf-8")
        if started is not None:
            _write_error(work, type(started).__name__, f"the kernel did not start: {started}",
                         None)
            raise started
        return _run_notebook({**spec, "kernel_name": setup["kernel_name"]}, work, relay, km)
    finally:
        if relay is not None:
            relay.close()
        _shutdown(km)


# How long the readiness check waits for an IOPub message after the kernel_info reply (as
# jupyter_client does) before it asks again.
IOPUB_CHECK_S = 0.2


def quick_ready_client() -> type:
    """The kernel client class nbclient gets for a pre-started kernel: ready once the kernel
    answers ``kernel_info`` on the shell channel and IOPub delivers a message, as
    jupyter_client's ``wait_for_ready`` checks; without its last step, which waits for 0.2 s
    of IOPub silence to drop the startup's status messages (0.2 s of every run). nbclient
    takes from IOPub only the messages whose parent is its own request."""
    import time
    from queue import Empty

    from jupyter_client.asynchronous.client import AsyncKernelClient

    class QuickReadyClient(AsyncKernelClient):
        async def wait_for_ready(self, timeout: float | None = None) -> None:
            deadline = time.monotonic() + (float("inf") if timeout is None else timeout)
            while True:
                self.kernel_info()
                try:
                    reply = await self.shell_channel.get_msg(timeout=1)
                except Empty:
                    reply = None
                if reply is not None and reply["msg_type"] == "kernel_info_reply":
                    try:  # IOPub connected: the status of that request reaches it
                        await self.iopub_channel.get_msg(timeout=IOPUB_CHECK_S)
                    except Empty:
                        pass
                    else:
                        self._handle_kernel_info_reply(reply)
                        return
                if not await self.is_alive():
                    raise RuntimeError("Kernel died before replying to kernel_info")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")

    return QuickReadyClient


# How often the executor looks whether the kernel has exited after its shutdown request
# (jupyter_client's shutdown_kernel looks every 0.1 s; the kernel exits in ~0.05 s).
SHUTDOWN_POLL_S = 0.01


def _shutdown(km: Any) -> None:
    """Shut a pre-started kernel down gracefully, as papermill does (the kernel's execution
    log writes its last events; the kernel manager signals, then kills it after its wait
    time), with jupyter_client's steps: an interrupt, a shutdown request, the wait, the
    clean-up."""
    if km is None:
        return
    from jupyter_core.utils import run_sync

    async def stop() -> None:
        if await km.is_alive():
            await km.interrupt_kernel()  # a cell still running (papermill failed) ends first
            await km.request_shutdown()
            await km.finish_shutdown(pollinterval=SHUTDOWN_POLL_S)
        await km.cleanup_resources()

    try:
        run_sync(stop)()
    except Exception as exc:  # noqa: BLE001 - the runner kills what is left by LORA_RUN_ID
        sys.stderr.write(f"shutting the kernel down failed: {exc!r}\n")


# Fields a training progress record may carry, with their types (everything else is dropped:
# the file is written by user code, the records reach a terminal).
_RECORD_FIELDS: dict[str, type] = {"step": int, "total": int, "start": int, "loss": float,
                                   "lr": float, "elapsed": float, "task": str,
                                   "resumed_from": str}
_TRAINING_EVENTS = ("train_start", "step", "train_end")


def clean_record(line: bytes) -> dict[str, Any] | None:
    """A training progress record from one line of the progress file, reduced to the known
    fields with the right types; None for anything else."""
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("event") not in _TRAINING_EVENTS:
        return None
    out: dict[str, Any] = {"event": raw["event"]}
    for key, kind in _RECORD_FIELDS.items():
        value = raw.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if kind is float and isinstance(value, int | float):
            out[key] = float(value)
        elif kind is int and isinstance(value, int):
            out[key] = value
        elif kind is str and isinstance(value, str):
            out[key] = value[:300]
    return out


class ProgressRelay:
    """Writes progress records on stdout (one JSON object a line, under a lock): what
    :func:`_cell_reporting_engine` reports, and the training records a thread tails from
    ``path`` (appended by the kernel). :meth:`close` relays the rest and ends with
    ``{"event": "done"}``. Progress is a display: a gone reader never stops the run."""

    POLL_S = 0.2

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pos = 0
        self._partial = b""
        self._thread = threading.Thread(target=self._tail, daemon=True)
        self._thread.start()

    def emit(self, record: dict[str, Any]) -> None:
        """Write one record."""
        with self._lock:
            try:
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # the runner went away: it kills this process anyway

    def _tail(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:  # not written yet
            return
        self._pos += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            record = clean_record(line)
            if record is not None:
                self.emit(record)

    def close(self) -> None:
        """Stop tailing, relay what is left, write the ``done`` record."""
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._drain()
        self.emit({"event": "done"})


def _cell_reporting_engine(emit: Callable[[dict[str, Any]], None]) -> str:
    """Register a papermill engine that reports each cell's start and end to ``emit`` as
    ``{"event": "cell", "done": cells finished, "cells": cells in all}``; return its name."""
    from papermill.engines import NBClientEngine, papermill_engines

    class CellReporting(NBClientEngine):  # type: ignore[misc]  # papermill is untyped
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            cells = len(nb_man.nb.cells)
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def cell_start(cell: Any, cell_index: int = 0, **kw: Any) -> Any:
                emit({"event": "cell", "done": cell_index, "cells": cells})
                return start(cell, cell_index, **kw)

            def cell_complete(cell: Any, cell_index: int = 0, **kw: Any) -> Any:
                result = complete(cell, cell_index, **kw)
                emit({"event": "cell", "done": cell_index + 1, "cells": cells})
                return result

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("lora-cell-progress", CellReporting)
    return "lora-cell-progress"


def _write_error(work: Path, ename: str, evalue: str, cell_index: int | None) -> None:
    (work / "error.json").write_text(json.dumps(
        {"ename": ename, "evalue": str(evalue)[:2000], "cell_index": cell_index}),
        encoding="utf-8")


# -- snapshot -------------------------------------------------------------------------------
def snapshot(spec: dict[str, Any], stream: IO[bytes] | None = None) -> int:
    """Write the files ``spec["files"]`` names (``[[arcname, path], ...]``; a folder: every
    plain file in it) as an uncompressed tar on ``stream`` (default stdout), read with this
    user's rights: the pinned inputs the runner's content-addressed store does not hold yet.
    The runner hashes what it receives; nothing here is believed."""
    with tarfile.open(fileobj=stream or sys.stdout.buffer, mode="w|") as tar:
        for arcname, path in spec["files"]:
            p = Path(path)
            # the files path_sha256 hashed: a folder's files found by rglob, links followed
            files = [(str(arcname), p)] if p.is_file() else [
                (f"{arcname}/{f.relative_to(p).as_posix()}", f)
                for f in sorted(p.rglob("*")) if f.is_file()]
            for name, f in files:
                with open(f, "rb") as fh:
                    info = tarfile.TarInfo(name)
                    info.size = os.fstat(fh.fileno()).st_size
                    info.mode = 0o444
                    tar.addfile(info, fh)
    return 0


# -- collect --------------------------------------------------------------------------------
def collect(spec: dict[str, Any], stream: IO[bytes] | None = None) -> int:
    """Write the work folder's evidence as a tar on ``stream`` (default stdout; see the
    module docstring)."""
    from lora_kernel.kernel.execlog import read_events

    work, run_id = Path(spec["work"]), spec["run_id"]
    with tarfile.open(fileobj=stream or sys.stdout.buffer, mode="w|") as tar:
        for name in ("executed.ipynb", "run_result.json", "error.json"):
            _add(tar, work / name, name)
        output = work / "output"
        if output.is_dir() and not output.is_symlink():
            for item in sorted(output.iterdir()):
                if item.is_file() and item.suffix == ".safetensors":
                    _add(tar, item, f"adapter/{item.name}")
                elif item.is_dir() and (item / "adapter_config.json").is_file():
                    _add(tar, item, f"adapter/{item.name}")
                elif item.name in OUTPUT_EXTRAS:
                    _add(tar, item, item.name)
        try:
            events = read_events(spec["home"], run_id=run_id, since=spec.get("since"))
        except (OSError, ValueError) as exc:
            events = [{"type": "log_unreadable", "run_id": run_id, "error": str(exc)}]
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in events)
        info = tarfile.TarInfo("events.jsonl")
        info.size = len(data)
        import io
        tar.addfile(info, io.BytesIO(data))
    return 0


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    """Add a plain file or a folder of plain files; links and special files are left out."""
    if path.is_symlink() or not path.exists():
        return
    if path.is_file():
        tar.add(str(path), arcname=arcname, recursive=False)
        return
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _add(tar, child, f"{arcname}/{child.name}")


def main(argv: list[str]) -> int:
    """Dispatch ``pin``, ``run`` or ``collect`` on the JSON spec read from stdin."""
    _skip_slow_imports()
    command = argv[0] if argv else ""
    first = sys.stdin.readline()
    if command == "run" and first.strip():
        try:
            setup = json.loads(first)
        except ValueError:  # not a whole line of JSON: the spec, read on below
            setup = None
        if isinstance(setup, dict) and setup.get("prestart"):
            rc = prestarted_run(setup, sys.stdin)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)  # the kernel is down: skip tearing down papermill's modules, sockets
    spec = json.loads(first + sys.stdin.read())
    if command == "pin-resume":  # a run account's own checkpoints (an isolated resume)
        try:
            _answer({"resume": pin_resume(spec)})
        except LoraError as exc:
            _answer({"error": {"type": type(exc).__name__, "exit_code": exc.exit_code,
                               "message": str(exc)}})
            return exc.exit_code
        return 0
    if command == "pin":
        try:
            _answer(pin(spec))
        except LoraError as exc:
            _answer({"error": {"type": type(exc).__name__, "exit_code": exc.exit_code,
                               "message": str(exc)}})
            return exc.exit_code
        return 0
    if command == "run":
        return run(spec)
    if command == "collect":
        return collect(spec)
    if command == "snapshot":
        return snapshot(spec)
    raise SystemExit(f"usage: python -m {EXECUTOR_MODULE} pin|pin-resume|run|snapshot|collect")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
