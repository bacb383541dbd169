"""Runs as Kubernetes Jobs: the runs service's backend beyond one machine (docs/deploy.md).

A plain module (no tornado, no jupyterhub); the ``kubernetes`` client is imported lazily, so the
rest of the hub works without it (``pip install 'lora-enclave[k8s]'``).

For a claimed submission (:class:`hub.runqueue.Submission`) :func:`job_manifest` builds one
``batch/v1`` Job that runs papermill, in the single-user image, as the requesting user's uid:

* pod and container ``securityContext``: ``runAsUser``/``runAsGroup``/``fsGroup`` from the
  user's passwd entry (or an explicit mapping, :attr:`K8sSettings.uids`), ``runAsNonRoot``,
  ``allowPrivilegeEscalation: false``, every capability dropped, ``seccompProfile:
  RuntimeDefault``, a read-only root filesystem (``/tmp`` is an ``emptyDir``);
* ``nvidia.com/gpu: n`` limits for the GPUs the submission asked for (none: the NVIDIA runtime
  is told ``NVIDIA_VISIBLE_DEVICES=void`` so a GPU node does not hand it every device);
* the user's home volume (PVC ``claim-<user>``, as zero-to-jupyterhub names it) and the
  run's folder ``lora-run-<id>`` (a ``subPath``) of the shared output claim
  (``lora-run-outputs``, ReadWriteMany), which the runs service mounts too
  (:attr:`K8sSettings.output_root`) to seal the record as the service account: the Job itself
  never sees the state directory, the ledger or its key;
* the container runs :mod:`lora_kernel.steps.jobstep` (pin, papermill in the ``lora``
  kernel, collect) with ``LORA_RUN_ID`` set, so the kernel's events carry the run id;
* ``backoffLimit: 0`` (a failed run is sealed as failed, never silently retried),
  ``activeDeadlineSeconds`` from the submission's timeout, ``ttlSecondsAfterFinished``;
* labels ``app.kubernetes.io/part-of: lora-enclave``, ``lora-enclave/run-id`` and the
  zero-to-jupyterhub single-user labels, so that the single-user NetworkPolicy (all egress
  off, docker/k8s/values.yaml) selects the run's pod too; no service-account token.

:func:`submit` creates it, :func:`status` reads its state back, :func:`delete` removes it
and its pod, :func:`pod_log_head` reads the start of its log (where the run step acknowledges
its pinned inputs before any user code runs). :mod:`hub.services.k8s_run` drives them for the
runs service.
"""
from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from lora_kernel.common.contract import JOBSTEP_MODULE
from lora_kernel.common.errors import ConfigError
from lora_kernel.common.offline import OFFLINE_VARS

from .runqueue import Submission
from .settings import K8sSettings

PART_OF = "lora-enclave"
RUN_ID_LABEL = "lora-enclave/run-id"
SUBMISSION_LABEL = "lora-enclave/submission"
USER_LABEL = "lora-enclave/user"
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


def _client() -> Any:
    try:
        from kubernetes import client
    except ImportError:  # pragma: no cover - depends on the extra
        raise ConfigError("the Kubernetes backend needs the kubernetes client; fix: pip "
                          "install 'lora-enclave[k8s]'") from None
    return client


def label_value(value: str) -> str:
    """``value`` as a valid label value (63 characters, alphanumeric at both ends)."""
    cleaned = _LABEL_VALUE.sub("-", str(value))[:63].strip("-_.")
    return cleaned or "none"


def job_name(run_id: str) -> str:
    """``lora-<run id>``: the Job's name and its folder on the output claim. By run id, not
    by submission id: submission ids start again with a new queue, and a failed run's folder
    stays on the claim."""
    name = f"lora-{run_id}".lower()
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise ConfigError(f"run id {run_id!r} does not make a Kubernetes name")
    return name


def user_ids(user: str, mapping: Mapping[str, tuple[int, int]] | None = None
             ) -> tuple[int, int]:
    """The uid and gid ``user``'s run executes as: ``mapping`` first, else the passwd entry.
    Root and the negative uids of hub-only demo users are refused: a Job never runs as
    either."""
    if mapping and user in mapping:
        uid, gid = (int(x) for x in mapping[user])
    else:
        import pwd

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"user {user!r} has no passwd entry and no uid mapping; fix: "
                              "add them to K8sSettings.uids or to the directory (sssd/LDAP)"
                              ) from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid <= 0 or gid <= 0:
        raise ConfigError(f"user {user!r} maps to uid {uid} / gid {gid}; a run never executes "
                          "as root or as a hub-only user; fix: map them to their own uid")
    return uid, gid


def pod_path(sub: Submission, settings: K8sSettings) -> str:
    """``sub.path`` (a path under the user's working home on the hub's side) inside the pod,
    where the home claim is mounted; anything outside the working home is refused (the pod
    sees only the user's own volume)."""
    home = posixpath.normpath(sub.home)
    path = posixpath.normpath(sub.path)
    if path != home and not path.startswith(home.rstrip("/") + "/"):
        raise ConfigError(f"{sub.path} is outside {sub.user}'s working home {sub.home}; a "
                          "Kubernetes run sees only that home", key=sub.kind)
    rel = posixpath.relpath(path, home)
    return posixpath.join(settings.home_mount, settings.workdir, rel)


def job_spec(sub: Submission, settings: K8sSettings, run_id: str) -> dict[str, Any]:
    """What :mod:`lora_kernel.steps.jobstep` runs for ``sub``, in the pod's paths."""
    spec: dict[str, Any] = {"run_id": run_id, "kind": sub.kind,
                            "home": posixpath.join(settings.home_mount, settings.workdir),
                            "out": settings.output_mount}
    if sub.kind == "config":
        spec.update(config=pod_path(sub, settings),
                    overrides=dict(sub.parameters.get("overrides") or {}))
    else:
        spec.update(notebook=pod_path(sub, settings), parameters=dict(sub.parameters))
    return spec


def _labels(sub: Submission, settings: K8sSettings, run_id: str) -> dict[str, str]:
    return {**settings.extra_labels, **settings.netpol_labels,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/component": "run",
            "app.kubernetes.io/managed-by": "lora-runs",
            RUN_ID_LABEL: label_value(run_id),
            SUBMISSION_LABEL: str(int(sub.id)),
            USER_LABEL: label_value(sub.user)}


def job_manifest(sub: Submission, settings: K8sSettings | None = None, *,
                 run_id: str | None = None) -> Any:
    """The ``V1Job`` that executes ``sub`` as run ``run_id`` (see the module's docstring)."""
    settings = settings or K8sSettings()
    k = _client()
    if sub.kind not in ("notebook", "config"):
        raise ConfigError(f"unknown kind {sub.kind!r}")
    uid, gid = user_ids(sub.user, settings.uids)
    run_id = run_id or sub.run_id or f"sub-{int(sub.id)}"
    name = job_name(run_id)
    labels = _labels(sub, settings, run_id)
    gpus = int(sub.gpus)
    if gpus > settings.gpus_per_node:  # one Job is one pod on one node
        raise ConfigError(
            f"the run asks for {gpus} GPUs but a node has {settings.gpus_per_node} "
            f"(runs.kubernetes.gpus_per_node); a run spanning nodes (a Kubeflow PyTorchJob) "
            f"is not built yet, and a pod asking for more than a node has would wait "
            f"unscheduled; fix: ask for at most {settings.gpus_per_node} GPUs (--gpus "
            f"{settings.gpus_per_node}); they train as that many data-parallel processes",
            key="gpus")
    workhome = posixpath.join(settings.home_mount, settings.workdir)
    env = {**OFFLINE_VARS, "HOME": settings.home_mount, "USER": sub.user,
           "LORA_HOME": workhome, "LORA_NOTEBOOKS": settings.notebooks_dir,
           "JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime", "MPLCONFIGDIR": "/tmp/matplotlib",
           "XDG_CACHE_HOME": "/tmp/cache", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONUNBUFFERED": "1", "LORA_RUN_ID": run_id}
    if gpus == 0:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    limits: dict[str, str] = {}
    if settings.memory_limit:
        limits["memory"] = settings.memory_limit
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    out = settings.output_mount
    container = k.V1Container(
        name="run", image=settings.image, image_pull_policy=settings.image_pull_policy,
        command=[settings.python, "-m", JOBSTEP_MODULE],
        args=[json.dumps(job_spec(sub, settings, run_id), sort_keys=True)],
        working_dir=workhome,
        env=[k.V1EnvVar(name=key, value=value) for key, value in sorted(env.items())],
        resources=k.V1ResourceRequirements(
            requests={"cpu": settings.cpu_request, "memory": settings.memory_request},
            limits=limits or None),
        security_context=k.V1SecurityContext(
            run_as_user=uid, run_as_group=gid, run_as_non_root=True,
            allow_privilege_escalation=False, privileged=False,
            read_only_root_filesystem=settings.read_only_root,
            capabilities=k.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
        volume_mounts=[k.V1VolumeMount(name="home", mount_path=settings.home_mount),
                       k.V1VolumeMount(name="output", mount_path=out, sub_path=name),
                       k.V1VolumeMount(name="tmp", mount_path="/tmp")])
    volumes = [
        k.V1Volume(name="home", persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
            claim_name=settings.home_claim.format(user=sub.user))),
        k.V1Volume(name="output", persistent_volume_claim=(
            k.V1PersistentVolumeClaimVolumeSource(claim_name=settings.output_claim))),
        k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource(size_limit="8Gi")),
    ]
    tolerations = ([k.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                   effect="NoSchedule")] if gpus else None)
    pod = k.V1PodSpec(
        restart_policy="Never", containers=[container], volumes=volumes,
        # on delete (cancel, deadline) the run step stops the kernel and collects the evidence
        termination_grace_period_seconds=settings.grace_s,
        automount_service_account_token=False, enable_service_links=False,
        security_context=k.V1PodSecurityContext(
            run_as_user=uid, run_as_group=gid, run_as_non_root=True, fs_group=gid,
            fs_group_change_policy="OnRootMismatch",
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
        node_selector=dict(settings.node_selector) or None, tolerations=tolerations)
    timeout = sub.timeout
    deadline = (max(1, math.ceil(timeout)) if timeout else settings.default_deadline_s)
    return k.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k.V1ObjectMeta(name=name, namespace=settings.namespace, labels=labels,
                                annotations={"lora-enclave/submitted-by": sub.user}),
        spec=k.V1JobSpec(
            backoff_limit=0, active_deadline_seconds=int(deadline),
            ttl_seconds_after_finished=settings.ttl_after_finished_s,
            template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels), spec=pod)))


def submit(api: Any, job: Any) -> Any:
    """Create ``job`` (a ``V1Job``) with ``api`` (a ``BatchV1Api``); returns the created Job."""
    return api.create_namespaced_job(namespace=job.metadata.namespace, body=job)


def delete(api: Any, name: str, namespace: str = "lora-enclave") -> bool:
    """Delete Job ``name`` and its pod with ``propagationPolicy: Foreground``: the Job stays
    (with a deletion timestamp) until its pod is gone — the kubelet sends SIGTERM, the run
    step collects its evidence, SIGKILL after :attr:`K8sSettings.grace_s` — so
    :func:`status` answers ``missing`` only once nothing writes into the output folder any
    more. False when it was already gone."""
    try:
        api.delete_namespaced_job(name=name, namespace=namespace,
                                  propagation_policy="Foreground")
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return False
        raise
    return True


def pod_log_head(core: Any, name: str, namespace: str, limit: int = 65536) -> str | None:
    """The first ``limit`` bytes of the log of Job ``name``'s pod (its container's stdout),
    or None when there is no pod (yet, or any more)."""
    pods = core.list_namespaced_pod(namespace=namespace, label_selector=f"job-name={name}")
    for pod in getattr(pods, "items", None) or []:
        try:
            text = core.read_namespaced_pod_log(name=pod.metadata.name, namespace=namespace,
                                                container="run", limit_bytes=limit)
        except Exception as exc:
            if getattr(exc, "status", None) in (400, 404):  # not started / gone
                continue
            raise
        return str(text)
    return None


def status(api: Any, name: str, namespace: str = "lora-enclave") -> dict[str, Any]:
    """The state of Job ``name``: ``{"name", "state", "reason", "active", "succeeded",
    "failed"}`` where state is ``pending``, ``running``, ``succeeded``, ``failed`` or
    ``timeout`` (the deadline passed: the service seals it as failed), or ``missing``."""
    try:
        job = api.read_namespaced_job_status(name=name, namespace=namespace)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return {"name": name, "state": "missing", "reason": None, "active": 0,
                    "succeeded": 0, "failed": 0}
        raise
    st = job.status
    counts = {key: int(getattr(st, key, None) or 0) if st else 0
              for key in ("active", "succeeded", "failed")}
    state, reason = "pending", None
    for cond in (getattr(st, "conditions", None) or []):
        if str(cond.status) != "True":
            continue
        if cond.type == "Complete":
            state, reason = "succeeded", cond.reason
        elif cond.type == "Failed":
            state = "timeout" if cond.reason == "DeadlineExceeded" else "failed"
            reason = cond.reason or cond.message
    if state == "pending" and counts["active"]:
        state = "running"
    return {"name": name, "state": state, "reason": reason, **counts}
