"""One queued run as a Kubernetes Job, sealed by the runs service (``runs.backend: kubernetes``).

The run worker (:mod:`hub.services.run_worker`) calls :func:`execute` instead of the local
runner when ``policies/hub.yaml`` says ``runs: {backend: kubernetes}``. The trusted side stays
here, as the service account; only the user's steps move into the cluster::

    run worker (service account)                      Job pod (the user's uid, single-user image)
      ├─ new run id; <state>/runs/.active/<id>.json      (hub.k8s_backend.job_manifest)
      ├─ create Job lora-run-<submission>  ──────────►  lora_kernel.trusted.jobstep:
      ├─ poll its status (cancel, timeout: delete)        pin → papermill in `lora` → collect
      │                                                   into <output claim>/lora-run-<n>/
      ├─ read <output_root>/lora-run-<n>/ back: pinned.json, exit.json, executor.log,
      │    evidence.tar — never through a link, only regular files, size-capped
      │    (lora_kernel.trusted.evidence.open_untrusted); the tar extracted with the
      │    runner's own rules
      └─ manifest, seal, ledger entry (lora_kernel.trusted.runner.seal_run); delete the Job

Inputs refused by the pin step (an invalid config, an unsafe model) end the submission with
that error and no record, as ``lora run`` does; a Job that ends before its inputs were pinned
(image pull failure, deleted, deadline while pending) ends it with the reason and no record:
nothing of the user's ran. Every run that got past pinning is recorded, failed or not.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, LoraError, RunFailed, UnsafeModelError
from lora_kernel.common.paths import runs_dir
from lora_kernel.common.timeutil import iso_time
from lora_kernel.trusted.evidence import read_untrusted
from lora_kernel.trusted.runner import ActiveRun, RunContext, RunRecord, new_run_id, seal_run

from ..k8s_backend import K8sSettings, delete, job_manifest, job_name, job_spec, status, submit
from ..runqueue import RunQueue, Submission

log = logging.getLogger("lora.hub.k8s_run")
POLL_S = 2.0
DONE = ("succeeded", "failed", "timeout", "missing")
PINNED_LIMIT = 64 << 20      # pinned.json: dataset digests of a large dataset fit
SMALL_LIMIT = 1 << 20        # exit.json
LOG_LIMIT = 16 << 20         # the tail of executor.log kept in the record
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_apis() -> Any:
    """A ``BatchV1Api`` from the service's in-cluster service account (or ``~/.kube/config``
    outside a cluster)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ConfigError("runs.backend kubernetes needs the kubernetes client; fix: pip "
                          "install 'lora-enclave[k8s]'") from None
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.BatchV1Api()


def _json_of(path: Path, limit: int) -> dict[str, Any] | None:
    data = read_untrusted(path, limit)
    if data is None:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_pinned(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pin step's answer and the parameters from a Job's ``pinned.json``, checked for the
    shape the sealing needs (the pod is the user's: its word is recorded as the user's, as
    the local pin child's is); :class:`LoraError` when malformed."""
    pinned, params = doc.get("pinned"), doc.get("parameters")
    if not isinstance(pinned, dict) or not isinstance(params, dict):
        raise LoraError("pinned.json has no pinned inputs and parameters")
    if not isinstance(pinned.get("notebook_sha256"), str) \
            or not _SHA256.match(pinned["notebook_sha256"]):
        raise LoraError("pinned.json: notebook_sha256 is not a sha256")
    if pinned.get("kind") not in ("notebook", "training") \
            or not isinstance(pinned.get("declared"), list):
        raise LoraError("pinned.json: kind or declared parameters missing")
    if pinned["kind"] == "training":
        for key, kind in (("config", dict), ("config_path", str), ("config_sha256", str),
                          ("dataset_digests", dict), ("base_model_sha256", str)):
            if not isinstance(pinned.get(key), kind):
                raise LoraError(f"pinned.json: {key} missing or not a {kind.__name__}")
    return pinned, params


def _pin_error(doc: dict[str, Any]) -> LoraError | None:
    err = doc.get("error")
    if not isinstance(err, dict):
        return None
    cls = {2: ConfigError, 3: UnsafeModelError}.get(int(err.get("exit_code") or 1), LoraError)
    return cls(f"the run's inputs were refused in the Job: {err.get('message')}")


def _wait(api: Any, name: str, settings: K8sSettings, timeout: float | None,
          cancelled: Callable[[], bool], poll_s: float) -> tuple[dict[str, Any], str | None]:
    """Poll Job ``name`` until it ends; on cancel or a missed deadline delete it. Returns its
    last status and why the service stopped it (None: it ended by itself)."""
    deadline = time.monotonic() + timeout + 60 if timeout else None
    while True:
        st = status(api, name, settings.namespace)
        if st["state"] in DONE:
            return st, None
        reason = None
        if cancelled():
            reason = "cancelled: the Job was deleted by the runs service"
        elif deadline is not None and time.monotonic() > deadline:
            reason = f"timed out after {timeout:g}s (the Job outlived its deadline)"
        if reason:
            delete(api, name, settings.namespace)
            for _ in range(int(30 / poll_s) + 1):  # the pod gets SIGTERM; let it write
                st = status(api, name, settings.namespace)
                if st["state"] in DONE or not st["active"]:
                    break
                time.sleep(poll_s)
            return st, reason
        time.sleep(poll_s)


def _stopped_reason(st: dict[str, Any], timeout: float | None) -> str | None:
    if st["state"] == "timeout":
        return f"timed out after {timeout or 0:g}s (the Job's activeDeadlineSeconds)"
    if st["state"] == "missing":
        return "the Job disappeared before it finished (deleted outside the runs service)"
    if st["state"] == "failed" and st.get("reason"):
        return f"the Job failed: {st['reason']}"
    return None


def execute(queue: RunQueue, sub: Submission, ctx: RunContext, state: str,
            cancelled: Callable[[], bool], *, api: Any, settings: K8sSettings,
            poll_s: float = POLL_S) -> RunRecord:
    """Run ``sub`` as a Job and seal its record (see the module docstring). Raises what the
    local runner raises: :class:`ConfigError` / :class:`UnsafeModelError` (nothing ran,
    nothing recorded), :class:`RunFailed` (a failed run, recorded)."""
    run_id = new_run_id()
    job = job_manifest(sub, settings, run_id=run_id)  # ConfigError: nothing submitted
    name = job_name(sub)
    spec = job_spec(sub, settings, run_id)
    out = Path(settings.output_root) / name
    with ctx.privileges.elevated():
        queue.set_run_id(sub.id, run_id)
    uid = int(job.spec.template.spec.security_context.run_as_user)
    run: dict[str, Any] = {
        "run_id": run_id, "notebook": spec.get("notebook") or spec.get("config"),
        "parameters": spec.get("parameters") or {"config_path": spec.get("config"),
                                                 "overrides": spec.get("overrides")},
        "home": spec["home"], "work": str(out / "work"), "started": iso_time(),
        "actor": {"name": ctx.actor.name, "uid": ctx.actor.uid, "source": ctx.actor.source},
        "run_as": {"uid": uid, "name": sub.user},
        # Until the pod answers: a record sealed now (recovery) says nothing was pinned.
        "pinned": {"kind": None, "notebook_sha256": ""},
        "backend": "kubernetes", "evidence": str(out / "evidence.tar"),
        "extra": {"backend": "kubernetes", "job": name, "namespace": settings.namespace,
                  "image": settings.image}}
    with ActiveRun(runs_dir(state), run) as active:
        log.info("run %s: Job %s/%s for %s", run_id, settings.namespace, name, sub.user)
        t0 = time.monotonic()
        submit(api, job)
        st, stopped = _wait(api, name, settings, sub.timeout, cancelled, poll_s)
        reason = stopped or _stopped_reason(st, sub.timeout)
        doc = _json_of(out / "pinned.json", PINNED_LIMIT)
        refused = _pin_error(doc) if doc is not None else None
        if doc is None or refused is not None:
            shutil.rmtree(active.staging, ignore_errors=True)
            delete(api, name, settings.namespace)
            raise refused or LoraError(
                f"the Job {name} ended ({st['state']}{': ' + reason if reason else ''}) "
                "before its inputs were pinned: nothing ran, nothing recorded; fix: kubectl "
                f"-n {settings.namespace} describe job {name}")
        try:
            pinned, params = check_pinned(doc)
        except LoraError as exc:
            pinned, params = run["pinned"], run["parameters"]
            reason = reason or f"the Job's pin answer was malformed ({exc})"
        run.update(pinned=pinned, parameters=params,
                   notebook=str(pinned.get("notebook") or run["notebook"]))
        rc_doc = _json_of(out / "exit.json", SMALL_LIMIT) or {}
        rc = rc_doc.get("rc") if isinstance(rc_doc.get("rc"), int) else None
        if rc is not None and stopped is None and st["state"] == "failed":
            reason = None  # the run step ended by itself: its error.json says why
        if rc is None and reason is None:
            reason = f"the Job ended ({st['state']}) without the run step's exit code"
        logged = read_untrusted(out / "executor.log", LOG_LIMIT)
        if logged is not None:
            (active.staging / "executor.log").write_bytes(logged)
        try:
            rec = seal_run(run, active.staging, rc=rc, reason=reason, ctx=ctx, state=state,
                           seconds=time.monotonic() - t0, log=lambda m: log.info("%s", m))
        except RunFailed:
            delete(api, name, settings.namespace)
            raise
    delete(api, name, settings.namespace)
    with ctx.privileges.elevated():
        shutil.rmtree(out, ignore_errors=True)  # a succeeded run's outputs are in its record
    return rec


def recover(state: str, ctx: RunContext, *, api: Any) -> list[RunRecord]:
    """The service's recovery on Kubernetes: delete the Job of every run whose worker died
    (so nothing writes into its outputs any more), then seal those runs as failed from what
    their output folders hold (:func:`lora_kernel.trusted.recovery.recover`)."""
    from lora_kernel.trusted.recovery import recover as seal_stale
    from lora_kernel.trusted.recovery import stale_runs

    for run in stale_runs(state):
        extra = run.get("extra") or {}
        if run.get("backend") == "kubernetes" and extra.get("job"):
            if delete(api, str(extra["job"]), str(extra.get("namespace") or "lora-enclave")):
                log.warning("run %s: deleted Job %s (its worker is gone)", run["run_id"],
                            extra["job"])
    return seal_stale(state=state, ctx=ctx)
