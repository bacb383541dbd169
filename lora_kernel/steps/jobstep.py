"""A run's untrusted steps inside a Kubernetes Job: ``python -m lora_kernel.steps.jobstep SPEC``.

The Job (:func:`hub.k8s_backend.job_manifest`) runs this in the single-user image as the run's
user, the same steps the runner's children run on one machine
(:mod:`lora_kernel.steps.executor`): ``pin`` (validate the config, hash every input), ``run``
(papermill in the ``lora`` kernel), ``collect`` (the evidence tar). ``SPEC`` is one JSON object:
``run_id``, ``kind`` (``notebook`` with ``notebook`` and ``parameters``, or ``config`` with
``config`` and ``overrides``: the config's ``task`` picks the training notebook, as
``lora run --config`` does), ``home`` (the working home in the pod) and ``out`` (the Job's
folder on the output volume). It writes into ``out``:

``executor.log``  this process's stderr and the kernel's
``pinned.json``   ``{"pinned": ..., "parameters": ...}``, or ``{"error": ...}`` when the
                  inputs were refused (then nothing ran, exit 2 or 3); its sha256 is printed
                  on stdout (:data:`ACK`, the pod's log) before the kernel starts
``work/``         the work folder (``output/``, checkpoints, ``executed.ipynb``)
``exit.json``     ``{"rc": n}``: the run step's exit code
``evidence.tar``  the collect step's tar (written last, renamed into place)

Everything here is the user's word, and the user's code (the notebook, in the kernel) shares
this folder and uid once it runs. So the runs service (:mod:`hub.services.k8s_run`, the trusted
side) takes the pin answer only if it still has the sha256 this step printed to the pod's log
before any user code ran (the container runtime keeps that log; user code can only append to
it), takes success only from the Job's own condition (this process's exit code), reads the
files back without following links, extracts the tar with the runner's own rules and seals
the record as the service account; the Job never sees the state directory, the ledger or its
key. SIGTERM (the Job deleted: cancel, deadline) stops the run step and still collects the
evidence within the pod's grace period.

Runs as: the run's user (a child the runner starts as them, or a Job's container).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from lora_kernel.common.atomic import atomic_path, atomic_write
from lora_kernel.common.contract import ACK, JOBSTEP_MODULE, KERNEL_NAME
from lora_kernel.common.digests import sha256_bytes
from lora_kernel.common.errors import LoraError
from lora_kernel.common.notebooks import config_task, notebook_for_task
from lora_kernel.common.runspec import pinned_parameters
from lora_kernel.steps.executor import collect, pin, run


class Terminated(BaseException):
    """SIGTERM: the Job is being deleted (cancel, deadline)."""


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def _write_json(path: Path, obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj).encode("utf-8")
    atomic_write(path, data)
    return data


def _request(spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The notebook and papermill parameters the spec asks for."""
    if spec.get("kind") == "config":
        config = str(spec["config"])
        return (notebook_for_task(config_task(config)),
                {"config_path": config, "overrides": dict(spec.get("overrides") or {})})
    return Path(spec["notebook"]), dict(spec.get("parameters") or {})


def job(spec: dict[str, Any]) -> int:
    """Pin, run and collect into ``spec["out"]``; the exit code of the Job's container."""
    out = Path(spec["out"])
    work = out / "work"
    home = str(spec["home"])
    try:
        notebook, params = _request(spec)
        pinned = pin({"notebook": str(notebook), "parameters": params, "home": home,
                      "work": str(work)})
    except LoraError as exc:
        _write_json(out / "pinned.json", {"error": {
            "type": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}})
        return exc.exit_code
    params = pinned_parameters(params, pinned, work)
    source = pinned.pop("notebook_source")
    data = _write_json(out / "pinned.json", {"pinned": pinned, "parameters": params})
    sys.stdout.write(f"{ACK}{sha256_bytes(data)}\n")
    sys.stdout.flush()
    try:
        rc = run({"notebook_source": source, "parameters": params, "work": str(work),
                  "kernel_name": KERNEL_NAME, "progress": True})
    except Terminated:
        print("the run step was stopped (SIGTERM: the Job is being deleted)", file=sys.stderr)
        rc = 128 + signal.SIGTERM
    except Exception as exc:  # noqa: BLE001 - run() wrote error.json; the record says why
        print(f"the run step failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        rc = 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # collect within the grace period
    _write_json(out / "exit.json", {"rc": rc})
    with atomic_path(out / "evidence.tar") as tmp, open(tmp, "wb") as stream:
        collect({"work": str(work), "home": home, "run_id": spec["run_id"]}, stream)
    return 0 if rc == 0 else 1


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit(f"usage: python -m {JOBSTEP_MODULE} SPEC_JSON")
    spec = json.loads(argv[0])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "executor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)  # the kernel inherits it: its stderr lands there too
    os.close(fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGTERM, _terminate)  # as PID 1 it would be ignored otherwise
    try:
        return job(spec)
    except Terminated:
        return 128 + signal.SIGTERM  # stopped before the run step: nothing ran


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
