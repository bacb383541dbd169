"""Recorded runs: a parameterized notebook executed by papermill in the guarded ``lora`` kernel,
sealed as a run record ``<home>/runs/<run_id>/`` and appended to the ledger.

The runner is the trusted side (in production: the hub's runs service, with the kernel running
as the user's uid). It never trusts what the notebook claims; it hashes what is on disk::

    parent (this module: run_config / run_notebook)          the record (sealed atomically)
      ├─ validates the config (lora_kernel.config)            executed.ipynb
      ├─ child: python -m lora_kernel.runs SPEC  ─ papermill  adapter/...  (adapter files)
      │     └─ kernel "lora" (guard + execution log),         tb/  samples/  loss_curve.png
      │        env LORA_RUN_ID=<run_id>, LORA_HOME=<home>     training_summary.json
      ├─ waits; on child death / timeout / Ctrl-C kills every  run_result.json (the notebook's
      │  process carrying LORA_RUN_ID (the orphaned kernel)    claim, kept as evidence)
      └─ builds the record in runs/.staging, seals, ledger    events.jsonl  executor.log
                                                              manifest.json
A run that fails — a cell raises, the kernel dies (even SIGKILL), the executor is killed, the
timeout passes, Ctrl-C — is recorded too, with whatever the executor wrote of the notebook
(papermill saves it after every cell and on error), marked ``failed``; then
:class:`~lora_kernel.errors.RunFailed` is raised naming the record. A half-written record
never appears: :func:`lora_kernel.records.seal_record` renames a verified staging folder.

The papermill executor runs in a child process so that the parent survives anything that
happens to it; papermill hands the child's environment to the kernel (jupyter_client copies
``os.environ`` when it launches the kernel), which is how ``LORA_RUN_ID`` tags the kernel's
events (:func:`lora_kernel.execlog.read_events`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_kernel.data import sha256_file
from lora_kernel.errors import ConfigError, RunFailed
from lora_kernel.home import lora_home

__all__ = ["RunRecord", "new_run_id", "notebook_dir", "notebook_for_task", "run_config",
           "run_notebook", "KERNEL_NAME"]

KERNEL_NAME = "lora"
NOTEBOOKS = {"image": "train_image_lora.ipynb", "text": "train_text_lora.ipynb"}
# What the runner copies from the run's output folder into the record (checkpoints stay out:
# they are resumable state, not evidence). Adapter files go under adapter/.
OUTPUT_EXTRAS = ("tb", "samples", "loss_curve.png", "training_summary.json")
KILL_GRACE_S = 5.0


@dataclass
class RunRecord:
    """A sealed run: its id, folder, status, ``manifest.json`` sha256 and ledger entry."""

    run_id: str
    path: Path
    status: str
    manifest_sha256: str
    ledger_seq: int
    seconds: float
    result: dict | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)


def new_run_id(now: dt.datetime | None = None) -> str:
    """A time-sortable, unguessable run id: ``20261125T201500Z-ab12cd``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def notebook_dir() -> Path:
    """Where the training notebooks live: ``$LORA_NOTEBOOKS`` or the checkout's ``notebooks/``."""
    env = os.environ.get("LORA_NOTEBOOKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "notebooks"


def notebook_for_task(task: str) -> Path:
    """The training notebook of ``task`` (``image`` or ``text``)."""
    if task not in NOTEBOOKS:
        raise ConfigError(f"no notebook for task {task!r}; use image or text", key="task")
    path = notebook_dir() / NOTEBOOKS[task]
    if not path.is_file():
        raise ConfigError(f"training notebook {path} not found; fix: set LORA_NOTEBOOKS to the "
                          f"folder holding {NOTEBOOKS[task]}", key="task")
    return path


def run_config(config_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
               home=None, notebook: str | os.PathLike | None = None,
               timeout: float | None = None, progress: bool = False,
               log: Callable[[str], None] | None = None) -> RunRecord:
    """Validate a config, then run the training notebook of its task (``lora run --config``).

    ``overrides`` are config keys (``-p key value``); ``output_dir`` is set by the runner.
    Raises :class:`ConfigError` before anything runs, :class:`RunFailed` after recording a
    failed run. Returns the sealed :class:`RunRecord` of a successful run.
    """
    from lora_kernel.config import load_config

    config_path = Path(config_path).resolve()
    task = load_config(config_path, dict(overrides or {})).task  # fail before a run exists
    nb = Path(notebook) if notebook else notebook_for_task(task)
    params = {"config_path": str(config_path), "overrides": dict(overrides or {})}
    return run_notebook(nb, params, home=home, timeout=timeout, progress=progress, log=log)


def run_notebook(notebook: str | os.PathLike, parameters: Mapping[str, Any] | None = None, *,
                 home=None, timeout: float | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> RunRecord:
    """Execute ``notebook`` with papermill in the ``lora`` kernel and seal its run record.

    ``parameters`` are papermill parameters. When they hold ``config_path`` (the training
    notebooks' convention) the runner validates that config with ``overrides``, points
    ``output_dir`` at the run's work folder and injects ``result_path``; the manifest then pins
    the resolved config, base model, dataset files and seed. ``timeout`` bounds the whole run
    (seconds). Raises :class:`RunFailed` (record written; its ``record`` attribute is the
    failed :class:`RunRecord`) when the run does not succeed, :class:`ConfigError` (nothing
    run, nothing recorded) for an invalid notebook, parameters or config.
    """
    from lora_kernel.config import load_config
    from lora_kernel.records import make_staging_dir

    log = log or (lambda _msg: None)
    notebook = Path(notebook).resolve()
    if not notebook.is_file():
        raise ConfigError(f"notebook not found: {notebook}", file=notebook)
    try:
        params = json.loads(json.dumps(dict(parameters or {})))  # plain JSON, our own copy
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"notebook parameters must be plain JSON values: {exc}") from None
    home = lora_home(home)
    runs = home / "runs"
    run_id = new_run_id()
    work = runs / ".work" / run_id
    declared = _declared_parameters(notebook)
    cfg = None
    if params.get("config_path"):
        params["config_path"] = str(Path(params["config_path"]).resolve())
        overrides = params.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"parameter 'overrides' must be a mapping, got {overrides!r}")
        params["overrides"] = {**overrides, "output_dir": str(work / "output")}
        cfg = load_config(params["config_path"], params["overrides"])  # before any run exists
    (work / "output").mkdir(parents=True)
    if "result_path" in declared:
        params["result_path"] = str(work / "run_result.json")
    spec = {"input": str(notebook), "output": str(work / "executed.ipynb"),
            "parameters": params, "cwd": str(work), "kernel_name": KERNEL_NAME,
            "progress": bool(progress), "error_path": str(work / "error.json")}
    (work / "spec.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    staging = make_staging_dir(runs, run_id)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    log(f"run {run_id}: {notebook.name} in kernel '{KERNEL_NAME}' (papermill)")
    rc, reason = _execute_child(work, run_id, home, timeout, progress)
    ended = dt.datetime.now(dt.timezone.utc)
    return _seal(run_id=run_id, home=home, runs=runs, work=work, staging=staging,
                 notebook=notebook, params=params, cfg=cfg, started=started, ended=ended,
                 seconds=time.monotonic() - t0, rc=rc, reason=reason, log=log)


def _declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell (papermill's inspection)."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def _execute_child(work: Path, run_id: str, home: Path, timeout: float | None,
                   progress: bool) -> tuple[int | None, str | None]:
    """Run the papermill executor as a child process; return ``(exit code, why it stopped)``.

    The child gets its own session (Ctrl-C reaches only the parent, which decides). Whatever
    ends the run, every process still carrying ``LORA_RUN_ID`` (the kernel, which
    jupyter_client starts in a session of its own) is killed before the record is built.
    """
    env = dict(os.environ)
    env.update({"LORA_RUN_ID": run_id, "LORA_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    reason = None
    with open(work / "executor.log", "wb") as errlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_kernel.runs", str(work / "spec.json")],
            env=env, cwd=str(work), stdin=subprocess.DEVNULL,
            stdout=None if progress else subprocess.DEVNULL, stderr=errlog,
            start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            reason = f"timed out after {timeout:g}s"
            _stop(proc)
        except KeyboardInterrupt:
            reason = "interrupted (SIGINT / SIGTERM)"
            _stop(proc)
        finally:
            if proc.poll() is None:  # an exception we did not expect: never leave it running
                _stop(proc)
            _kill_run_processes(run_id)
    return proc.returncode, reason


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the executor's process group, then SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_run_processes(run_id: str) -> list[int]:
    """SIGKILL every process of this user whose environment has ``LORA_RUN_ID=run_id``.

    This finds the kernel even after its parent (the executor) died and it was re-parented.
    Processes of other users (production: the kernel runs as the user) are the spawner's to
    stop; ``psutil.AccessDenied`` skips them.
    """
    import psutil

    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("LORA_RUN_ID") == run_id:
                proc.kill()
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    psutil.wait_procs(found, timeout=KILL_GRACE_S)
    return [p.pid for p in found]


# -- building the record -------------------------------------------------------------------
def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


def _collect_outputs(output: Path, staging: Path) -> None:
    """Move adapter files (``*.safetensors`` at the top, PEFT folders) under ``adapter/`` and
    the evidence (TensorBoard logs, samples, loss curve, summary) into the staging folder."""
    if not output.is_dir():
        return
    for item in sorted(output.iterdir()):
        if item.is_file() and item.suffix == ".safetensors":
            _move(item, staging / "adapter" / item.name)
        elif item.is_dir() and (item / "adapter_config.json").is_file():
            _move(item, staging / "adapter" / item.name)
        elif item.name in OUTPUT_EXTRAS:
            _move(item, staging / item.name)


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when missing or unreadable (a killed writer)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _failure_reason(rc: int | None, reason: str | None, error: dict | None,
                    result: dict | None, has_config: bool) -> str | None:
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
    if has_config and result is None:
        return "the notebook finished without writing its result (result_path)"
    return None


def _seal(*, run_id, home, runs, work, staging, notebook, params, cfg, started, ended,
          seconds, rc, reason, log) -> RunRecord:
    """Build, seal and ledger the record; raise :class:`RunFailed` for a failed run."""
    from lora_kernel.data import dataset_digests, dataset_version
    from lora_kernel.execlog import current_user, read_events
    from lora_kernel.ledger import Ledger
    from lora_kernel.models import model_sha256
    from lora_kernel.records import (build_manifest, manifest_sha256, record_files,
                                     seal_record, write_manifest)

    error = _read_json(work / "error.json")
    result = _read_json(work / "run_result.json")
    failure = _failure_reason(rc, reason, error, result, cfg is not None)
    notes = []
    executed = work / "executed.ipynb"
    if executed.is_file():
        if _read_json(executed) is None:  # cut mid-write: keep the bytes, not as a notebook
            _move(executed, staging / "executed.ipynb.partial")
            notes.append("executed notebook was cut mid-write (kept as executed.ipynb.partial)")
        else:
            _move(executed, staging / "executed.ipynb")
    else:
        notes.append("the executor wrote no notebook")
    _collect_outputs(work / "output", staging)
    if result is not None:
        _move(work / "run_result.json", staging / "run_result.json")
    _move(work / "executor.log", staging / "executor.log")
    events = read_events(home, run_id=run_id)
    with open(staging / "events.jsonl", "w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, sort_keys=True) + "\n")
    status = "failed" if failure else "succeeded"
    if cfg is not None:
        digests = dataset_digests(cfg)
        config, seed = cfg.to_dict(), cfg.seed
        base_sha, version = model_sha256(cfg.base_model), dataset_version(cfg, digests)
    else:
        digests, config, seed = {}, {"parameters": params}, int(params.get("seed", 0) or 0)
        base_sha, version = "", ""
    extra = {"notebook": notebook.name, "parameters": params, "kernel": KERNEL_NAME,
             "executor_exit_code": rc, "error": failure, "notes": notes,
             "cells_executed": sum(1 for e in events if e.get("type") == "execute")}
    if result is not None:
        extra.update({k: result.get(k) for k in ("steps", "losses", "eval_loss_before",
                                                 "eval_loss_after", "seconds", "cache_hit")})
    if failure:
        extra["work_dir"] = str(work)  # checkpoints stay there for `lora train --resume`
    manifest = build_manifest(
        staging, run_id=run_id, user=current_user(), host=socket.gethostname(),
        started=started, ended=ended, status=status, config=config,
        base_model_sha256=base_sha, dataset_version=version, dataset_digests=digests,
        notebook_source_sha256=sha256_file(notebook), seed=seed,
        egress_refusals=sum(1 for e in events if e.get("type") == "refusal"), extra=extra)
    write_manifest(staging, manifest)
    record = seal_record(staging, runs, run_id)
    with Ledger(home=home) as ledger:
        entry = ledger.append_run(record)
    if not failure:
        shutil.rmtree(work, ignore_errors=True)
    rec = RunRecord(run_id=run_id, path=record, status=status,
                    manifest_sha256=manifest_sha256(record), ledger_seq=entry.seq,
                    seconds=seconds, result=result, error=failure, files=record_files(record))
    log(f"run {run_id}: {status} in {seconds:.1f}s; record {record}")
    if failure:
        exc = RunFailed(f"run {run_id} failed: {failure}; the failed run is recorded in {record}")
        exc.record = rec
        raise exc
    return rec


# -- the executor (child process) ----------------------------------------------------------
def _child_main(spec_path: str) -> int:
    """Execute one notebook as described by a spec file (the runner's child process).

    On a notebook error papermill saves the notebook first, then raises; the error is written
    to ``error_path`` for the parent and the exit code is 1.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        papermill.execute_notebook(
            spec["input"], spec["output"], parameters=spec["parameters"],
            kernel_name=spec["kernel_name"], cwd=spec["cwd"],
            progress_bar={"file": sys.stdout} if spec.get("progress") else False)
    except PapermillExecutionError as exc:
        _write_error(spec, exc.ename, exc.evalue, exc.cell_index)
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded for the parent, then a failing exit
        _write_error(spec, type(exc).__name__, str(exc), None)
        raise
    return 0


def _write_error(spec: dict, ename: str, evalue: str, cell_index: int | None) -> None:
    Path(spec["error_path"]).write_text(json.dumps(
        {"ename": ename, "evalue": str(evalue)[:2000], "cell_index": cell_index}),
        encoding="utf-8")


if __name__ == "__main__":  # the executor: python -m lora_kernel.runs SPEC
    sys.exit(_child_main(sys.argv[1]))
