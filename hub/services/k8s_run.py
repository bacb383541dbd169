"""One queued run as a Kubernetes Job, sealed by the runs service (``runs.backend: kubernetes``).

The run worker (:mod:`hub.services.run_worker`) calls :func:`execute` instead of the local
runner when ``policies/hub.yaml`` says ``runs: {backend: kubernetes}``. The trusted side stays
here, as the service account; only the user's steps move into the cluster::

    run worker (service account)                      Job pod (the user's uid, single-user image)
      ├─ new run id; <state>/runs/.active/<id>.json      (hub.k8s_backend.job_manifest)
      ├─ create Job lora-<run id>  ───────────────────►  lora_kernel.steps.jobstep:
      ├─ poll its status (transient API errors           pin → ack on stdout → papermill in
      │    retried; cancel, deadline: delete it           `lora` → collect into
      │    and wait until its pod is gone)                <output claim>/lora-<run id>/
      ├─ read the pin acknowledgement (the sha256 of pinned.json) from the head of the
      │    pod's log, printed before any user code ran
      ├─ read <output_root>/lora-<run id>/ back: pinned.json (only if it still has that
      │    sha256), exit.json, executor.log, evidence.tar — never through a link, only
      │    regular files, size-capped (lora_kernel.trusted.evidence.open_untrusted); the
      │    tar extracted with the runner's own rules; success only from the Job's condition
      └─ manifest, seal, ledger entry (lora_kernel.trusted.runseal.seal_run); delete the Job

Inputs refused by the pin step (an invalid config, an unsafe model) end the submission with
that error and no record, as ``lora run`` does; a Job that ends before its inputs were pinned
(image pull failure, deleted, deadline while pending) ends it with the reason and no record:
nothing of the user's ran. Every run that got past pinning is recorded, failed or not: also
when the cluster API fails for good while it runs (the Job is deleted and the run sealed failed
with the reason), and when the user's code rewrote the pin answer (sealed failed, the forged
answer ignored).

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_kernel.common.contract import ACK
from lora_kernel.common.digests import sha256_bytes
from lora_kernel.common.errors import ConfigError, LoraError, RunFailed, error_from_answer
from lora_kernel.common.paths import runs_dir
from lora_kernel.common.runspec import PinnedInputs, RunActor, RunDescription, RunUser
from lora_kernel.common.timeutil import iso_time
from lora_kernel.trusted.evidence import open_untrusted, read_untrusted
from lora_kernel.trusted.runner import new_run_id
from lora_kernel.trusted.runseal import ActiveRun, RunContext, RunRecord, seal_run, stale_runs

from ..k8s_backend import (
    K8sSettings,
    delete,
    job_manifest,
    job_spec,
    pod_log_head,
    status,
    submit,
)
from ..runqueue import RunQueue, Submission

log = logging.getLogger("lora.hub.k8s_run")
POLL_S = 2.0
DONE = ("succeeded", "failed", "timeout", "missing")
PINNED_LIMIT = 64 << 20      # pinned.json: dataset digests of a large dataset fit
SMALL_LIMIT = 1 << 20        # exit.json
LOG_LIMIT = 16 << 20         # the tail of executor.log kept in the record
API_RETRIES = 8              # consecutive transient API failures tolerated while polling
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_apis() -> tuple[Any, Any]:
    """``BatchV1Api`` and ``CoreV1Api`` from the service's in-cluster service account (or
    ``~/.kube/config`` outside a cluster)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ConfigError("runs.backend kubernetes needs the kubernetes client; fix: pip "
                          "install 'lora-enclave[k8s]'") from None
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"no Kubernetes credentials: {exc}; fix: run the runs service "
                              "in the cluster with its service account (docker/k8s/"
                              "services.yaml), or give it a kubeconfig") from None
    return client.BatchV1Api(), client.CoreV1Api()


def _transient(exc: BaseException) -> bool:
    """An API error worth retrying: 429/5xx, or the connection itself."""
    code = getattr(exc, "status", None)
    if code in (429, 500, 502, 503, 504):
        return True
    return isinstance(exc, (OSError, TimeoutError)) or \
        type(exc).__module__.split(".")[0] == "urllib3"


def _read_json(path: Path, limit: int) -> tuple[dict[str, Any] | None, bytes | None]:
    """``(object, bytes)`` of a JSON file the pod wrote; ``(None, bytes)`` when it is not a
    JSON object, ``(None, None)`` when missing, a link, not a regular file or over
    ``limit`` bytes (never truncated: a cut file is not the file)."""
    try:
        with open_untrusted(path) as f:
            if os.fstat(f.fileno()).st_size > limit:
                log.error("%s is over %d bytes: not read", path, limit)
                return None, None
            data = f.read(limit + 1)
    except OSError:
        return None, None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, data
    return (obj if isinstance(obj, dict) else None), data


def pin_answer(doc: dict[str, Any]) -> tuple[PinnedInputs, dict[str, Any]]:
    """The pin step's answer and the parameters from a Job's ``pinned.json``, typed
    (:meth:`PinnedInputs.from_untrusted`: the pod is the user's, its word is recorded as the
    user's, as the local pin child's is); :class:`LoraError` naming the field when malformed.
    No resume on Kubernetes: a resume point is dropped."""
    params = doc.get("parameters")
    if not isinstance(doc.get("pinned"), dict) or not isinstance(params, dict):
        raise LoraError("pinned.json has no pinned inputs and parameters")
    return PinnedInputs.from_untrusted(doc["pinned"], where="pinned.json", resume=False), params


def check_pinned(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`pin_answer` as plain JSON (the pinned inputs the record keeps)."""
    pinned, params = pin_answer(doc)
    return pinned.to_dict(), params


def _pin_error(doc: dict[str, Any]) -> LoraError | None:
    err = doc.get("error")
    if not isinstance(err, dict):
        return None
    return error_from_answer(err, prefix="the run's inputs were refused in the Job: ",
                             limit=2000)


class Watch:
    """Job ``name``: its status (transient API errors retried) and the pin acknowledgement
    from the head of its pod's log."""

    def __init__(self, api: Any, core: Any, name: str, settings: K8sSettings, out: Path,
                 poll_s: float) -> None:
        self.api, self.core, self.name, self.settings = api, core, name, settings
        self.out, self.poll_s = out, poll_s
        self.ack: str | None = None
        self._failures = 0

    def _call(self, fn: Callable[[], Any]) -> Any:
        while True:
            try:
                answer = fn()
            except Exception as exc:
                if not _transient(exc) or self._failures >= API_RETRIES:
                    raise
                self._failures += 1
                log.warning("Job %s: API error %s (%d of %d), retrying", self.name, exc,
                            self._failures, API_RETRIES)
                time.sleep(self.poll_s * min(2 ** self._failures, 16))
                continue
            self._failures = 0
            return answer

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self._call(lambda: status(self.api, self.name,
                                                       self.settings.namespace))
        if self.ack is None and os.path.lexists(self.out / "pinned.json"):
            self.read_ack()
        return st

    def read_ack(self) -> None:
        """The first acknowledgement line of the pod's log (later ones are user code's)."""
        text = self._call(lambda: pod_log_head(self.core, self.name, self.settings.namespace))
        for line in (text or "").splitlines():
            if line.startswith(ACK):
                sha = line[len(ACK):].strip()
                self.ack = sha if _SHA256.match(sha) else None
                return

    def pods_gone(self) -> bool:
        pods = self._call(lambda: self.core.list_namespaced_pod(
            namespace=self.settings.namespace, label_selector=f"job-name={self.name}"))
        return not (getattr(pods, "items", None) or [])

    def delete(self) -> None:
        """Delete the Job; wait (up to the grace period and a margin) until neither it nor its
        pod is left, so nothing writes into the output folder any more."""
        self._call(lambda: delete(self.api, self.name, self.settings.namespace))
        deadline = time.monotonic() + self.settings.grace_s + 30
        while time.monotonic() < deadline:
            if self.status()["state"] == "missing" and self.pods_gone():
                return
            time.sleep(self.poll_s)
        log.error("Job %s: still there %ss after its deletion", self.name,
                  self.settings.grace_s + 30)

    def wait(self, timeout: float | None, cancelled: Callable[[], bool]
             ) -> tuple[dict[str, Any], str | None]:
        """Poll until the Job ends; on cancel or a missed deadline delete it. Returns its
        last status and why the service stopped it (None: it ended by itself)."""
        deadline = time.monotonic() + timeout + 60 if timeout else None
        while True:
            st = self.status()
            if st["state"] in DONE:
                if st["state"] == "missing":  # deleted from outside: its pod may still write
                    self.delete()
                return st, None
            reason = None
            if cancelled():
                reason = "cancelled: the Job was deleted by the runs service"
            elif deadline is not None and time.monotonic() > deadline:
                reason = f"timed out after {timeout:g}s (the Job outlived its deadline)"
            if reason:
                self.delete()
                return st, reason
            time.sleep(self.poll_s)


def _stopped_reason(st: dict[str, Any], timeout: float | None) -> str | None:
    if st["state"] == "timeout":
        return f"timed out after {timeout or 0:g}s (the Job's activeDeadlineSeconds)"
    if st["state"] == "missing":
        return "the Job disappeared before it finished (deleted outside the runs service)"
    if st["state"] == "failed" and st.get("reason"):
        return f"the Job failed: {st['reason']}"
    return None


def _remove(path: Path, ctx: RunContext) -> None:
    """Remove a sealed run's output folder; say so when the service may not (its files are
    the user's: a non-root service needs a retention job, docs/deploy.md)."""
    failed: list[str] = []
    with ctx.privileges.elevated():
        shutil.rmtree(path, onerror=lambda _f, p, _e: failed.append(p))
    if failed:
        log.warning("could not remove %d file(s) of %s (they belong to the run's user); "
                    "the output claim's retention job removes them", len(failed), path)


def execute(queue: RunQueue, sub: Submission, ctx: RunContext, state: str,
            cancelled: Callable[[], bool], *, api: Any, core: Any, settings: K8sSettings,
            poll_s: float | None = None) -> RunRecord:
    """Run ``sub`` as a Job and seal its record (see the module docstring). Raises what the
    local runner raises: :class:`ConfigError` / :class:`UnsafeModelError` (nothing ran,
    nothing recorded), :class:`RunFailed` (a failed run, recorded)."""
    run_id = new_run_id()
    job = job_manifest(sub, settings, run_id=run_id)  # ConfigError: nothing submitted
    name = str(job.metadata.name)
    out = Path(settings.output_root) / name
    if os.path.lexists(out):
        raise LoraError(f"{out} already exists: another run's outputs; nothing submitted")
    with ctx.privileges.elevated():
        queue.set_run_id(sub.id, run_id)
    run = _describe(sub, ctx, settings, job, run_id, out)
    watch = Watch(api, core, name, settings, out, POLL_S if poll_s is None else poll_s)
    with ActiveRun(runs_dir(state), run) as active:
        log.info("run %s: Job %s/%s for %s", run_id, settings.namespace, name, sub.user)
        t0 = time.monotonic()
        _submit(api, job, active.staging)
        st, stopped = _wait(watch, sub.timeout, cancelled)
        job_reason = _stopped_reason(st, sub.timeout)
        doc, data = _read_json(out / "pinned.json", PINNED_LIMIT)
        if watch.ack is None and not any(os.path.lexists(out / f) for f in
                                         ("exit.json", "evidence.tar", "work")):
            # The run step acknowledges before the kernel starts: no user code ran.
            shutil.rmtree(active.staging, ignore_errors=True)
            _delete_quietly(watch)
            raise _refusal(doc, st, stopped or job_reason, name, settings)
        pin_reason = _take_pin_answer(run, doc, data, watch.ack)
        rc, job_reason = _exit_code(out, st, stopped, job_reason)
        reason = stopped or pin_reason or job_reason
        if rc is None and reason is None:
            reason = f"the Job ended ({st['state']}) without the run step's exit code"
        logged = read_untrusted(out / "executor.log", LOG_LIMIT)
        if logged is not None:
            (active.staging / "executor.log").write_bytes(logged)
        rec = _seal(run, active.staging, rc, reason, ctx, state, t0, watch)
    _delete_quietly(watch)
    _remove(out, ctx)  # a succeeded run's outputs are in its record
    return rec


def _describe(sub: Submission, ctx: RunContext, settings: K8sSettings, job: Any, run_id: str,
              out: Path) -> RunDescription:
    """The run as announced before its Job is created: no pin answer yet (a recovery seals
    it so), the Job's tar as its evidence."""
    spec = job_spec(sub, settings, run_id)
    uid = int(job.spec.template.spec.security_context.run_as_user)
    return RunDescription(
        run_id=run_id, notebook=str(spec.get("notebook") or spec.get("config")),
        parameters=spec.get("parameters") or {"config_path": spec.get("config"),
                                              "overrides": spec.get("overrides")},
        home=str(spec["home"]), work=str(out / "work"), started=iso_time(),
        actor=RunActor(ctx.actor.name, ctx.actor.uid, ctx.actor.source),
        run_as=RunUser(uid, sub.user),
        pinned=None,  # until the pod answers (a recovery seals it so)
        backend="kubernetes", evidence=str(out / "evidence.tar"),
        extra={"backend": "kubernetes", "job": str(job.metadata.name),
               "namespace": settings.namespace, "image": settings.image})


def _submit(api: Any, job: Any, staging: Path) -> None:
    """Create the Job; when the cluster refuses it nothing was created (no record)."""
    try:
        submit(api, job)
    except Exception as exc:  # nothing was created
        shutil.rmtree(staging, ignore_errors=True)
        raise LoraError(f"the cluster refused the Job {job.metadata.name}: {exc}") from None


def _wait(watch: Watch, timeout: float | None, cancelled: Callable[[], bool]
          ) -> tuple[dict[str, Any], str | None]:
    """:meth:`Watch.wait` and the pin acknowledgement; when the API fails for good the Job is
    stopped and the run goes on to be sealed with what it left."""
    try:
        st, stopped = watch.wait(timeout, cancelled)
        if watch.ack is None:
            watch.read_ack()
        return st, stopped
    except Exception as exc:  # the API failed for good: stop the Job, seal what it left
        log.exception("Job %s: lost", watch.name)
        try:
            watch.delete()
        except Exception:
            log.exception("Job %s: could not delete it", watch.name)
        return {"state": "lost"}, f"the runs service lost the Job: {exc}"


def _refusal(doc: dict[str, Any] | None, st: dict[str, Any], why: str | None, name: str,
             settings: K8sSettings) -> LoraError:
    """The error of a Job that ended before its inputs were pinned (nothing ran): the pin
    step's own refusal when it wrote one, else why the Job ended."""
    refused = _pin_error(doc) if doc is not None else None
    return refused or LoraError(
        f"the Job {name} ended ({st['state']}{': ' + why if why else ''}) before its inputs "
        f"were pinned: nothing ran, nothing recorded; fix: kubectl -n {settings.namespace} "
        f"describe job {name}")


def _take_pin_answer(run: RunDescription, doc: dict[str, Any] | None, data: bytes | None,
                     ack: str | None) -> str | None:
    """Put the pod's pin answer into ``run`` when it is the acknowledged one and well formed;
    else leave the run unpinned and return why."""
    pinned: PinnedInputs | None = None
    params, pin_reason = run.parameters, None
    if ack is None:
        pin_reason = "the pin acknowledgement is missing from the pod's log"
    elif doc is None or data is None or sha256_bytes(data) != ack:
        pin_reason = ("the pin answer (pinned.json) was changed or removed after the "
                      "inputs were pinned; the record keeps none of it")
    else:
        try:
            pinned, params = pin_answer(doc)
        except LoraError as exc:
            pin_reason = f"the Job's pin answer was malformed ({exc})"
    run.pinned, run.parameters = pinned, params
    run.notebook = pinned.notebook if pinned is not None else run.notebook
    return pin_reason


def _exit_code(out: Path, st: dict[str, Any], stopped: str | None, job_reason: str | None
               ) -> tuple[int | None, str | None]:
    """The run step's exit code and what is left of the Job's reason. Success is the Job's
    own word (its condition), never ``exit.json``'s; a failed Job's "0" is not believed."""
    rc_doc, _ = _read_json(out / "exit.json", SMALL_LIMIT)
    told = (rc_doc or {}).get("rc")
    told = told if isinstance(told, int) and not isinstance(told, bool) else None
    if st["state"] == "succeeded" and stopped is None:
        return 0, job_reason
    if told is not None and st["state"] == "failed":
        job_reason = None  # the run step ended by itself: error.json says why
    return (1 if told == 0 else told), job_reason


def _delete_quietly(watch: Watch) -> None:
    try:
        delete(watch.api, watch.name, watch.settings.namespace)
    except Exception:
        log.exception("Job %s: could not delete it", watch.name)


def _seal(run: RunDescription, staging: Path, rc: int | None, reason: str | None,
          ctx: RunContext, state: str, t0: float, watch: Watch) -> RunRecord:
    """:func:`seal_run`; a failed run deletes its Job first. A value of the pod's that the
    sealing cannot take is sealed failed without the pin answer, never left unrecorded."""
    def say(msg: str) -> None:
        log.info("%s", msg)
    try:
        return seal_run(run, staging, rc=rc, reason=reason, ctx=ctx, state=state,
                        seconds=time.monotonic() - t0, log=say)
    except RunFailed:
        _delete_quietly(watch)
        raise
    except (ValueError, TypeError, KeyError) as exc:
        log.exception("run %s: sealing failed", run.run_id)
        _delete_quietly(watch)
        for item in staging.iterdir():  # start again from an empty staging folder
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        run.pinned, run.evidence = None, str(staging / "none")
        return seal_run(run, staging, rc=rc, ctx=ctx, state=state, log=say,
                        reason=f"the Job's outputs could not be sealed ({exc})",
                        seconds=time.monotonic() - t0)


def recover(state: str, ctx: RunContext, *, api: Any, core: Any,
            settings: K8sSettings | None = None) -> list[RunRecord]:
    """The service's recovery on Kubernetes: delete the Job of every run whose worker died
    and wait until its pod is gone (so nothing writes into its outputs any more), then seal
    those runs as failed from what their output folders hold
    (:func:`lora_kernel.trusted.recovery.recover`)."""
    from lora_kernel.trusted.recovery import recover as seal_stale

    for run in stale_runs(state):
        extra = run.extra
        if run.backend == "kubernetes" and extra.get("job"):
            job_settings = settings or K8sSettings()
            job_settings = K8sSettings(**{**job_settings.__dict__,
                                          "namespace": str(extra.get("namespace")
                                                           or job_settings.namespace)})
            Watch(api, core, str(extra["job"]), job_settings, Path(run.work).parent,
                  POLL_S).delete()
            log.warning("run %s: deleted Job %s (its worker is gone)", run.run_id,
                        extra["job"])
    return seal_stale(state=state, ctx=ctx)
