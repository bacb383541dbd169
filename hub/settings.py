"""``policies/hub.yaml``: roles from Linux groups, the GPU pool and quotas, runs, culling.

Plain helpers (no jupyterhub import), shared by the hub config, the spawner and the services.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.paths import state_dir
from lora_kernel.common.policy import load_policy, policy_path

ROLES = ("researcher", "engineer", "reviewer", "auditor", "admin")
AUDIT_READ = "custom:lora-audit:read"
REVIEW_WRITE = "custom:lora-review:write"
RUNS_SERVICE = "lora-runs"
AUDIT_SERVICE = "lora-audit"


@dataclass
class K8sSettings:
    """Where and how the Jobs run. Defaults match docker/k8s/values.yaml."""

    namespace: str = "lora-enclave"
    image: str = "registry.example.internal/lora-enclave/singleuser:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The zero-to-jupyterhub release: its single-user NetworkPolicy selects these labels.
    release: str = "lora-enclave"
    # user name -> (uid, gid); users not in it are looked up in the passwd database (NSS:
    # files, sssd or LDAP, the same source the hub's authenticator uses).
    uids: dict[str, tuple[int, int]] = field(default_factory=dict)
    home_claim: str = "claim-{user}"        # z2jh's per-user PVC name
    home_mount: str = "/home/jovyan"        # where the single-user image mounts it
    workdir: str = "lora"                   # the working home inside it ($LORA_HOME)
    output_mount: str = "/lora-run"         # the run's folder, inside the pod
    output_claim: str = "lora-run-outputs"  # ReadWriteMany; one subPath per run
    output_root: str = "/srv/lora-run-outputs"  # the same claim, mounted in the runs service
    notebooks_dir: str = "/opt/lora-enclave/notebooks"  # the image's copy of notebooks/
    python: str = "/opt/lora-enclave/.venv/bin/python"
    read_only_root: bool = True
    default_deadline_s: int = 24 * 3600     # a submission without a timeout
    ttl_after_finished_s: int = 3600        # the service seals well before this
    grace_s: int = 60                       # SIGTERM to SIGKILL: time to collect evidence
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    memory_limit: str | None = "64Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    extra_labels: dict[str, str] = field(default_factory=dict)
    # GPUs of one node: a run asking for more would span nodes (not built yet: refused)
    gpus_per_node: int = 8

    @property
    def netpol_labels(self) -> dict[str, str]:
        """The labels zero-to-jupyterhub's ``singleuser`` NetworkPolicy selects pods by."""
        return {"app": "jupyterhub", "release": self.release,
                "component": "singleuser-server"}


@dataclass
class HubSettings:
    roles: dict[str, str] = field(default_factory=dict)   # Linux group -> role
    devices: list[str] = field(default_factory=list)
    exclusive: bool = True
    quotas: dict[str, int] = field(default_factory=lambda: {"default": 1})
    max_concurrent_runs: int = 2
    cull_timeout_s: int = 3600
    cull_every_s: int = 300
    runs_backend: str = "local"    # "local" (run workers here) or "kubernetes" (Jobs)
    kubernetes: K8sSettings = field(default_factory=K8sSettings)  # runs.kubernetes
    terminals: bool = False        # terminals in users' servers (only with the firewall)

    def roles_of(self, groups: list[str] | tuple[str, ...]) -> list[str]:
        """The hub roles of a user in Linux ``groups`` (researcher when none applies)."""
        found = sorted({self.roles[g] for g in groups if g in self.roles})
        return found or ["researcher"]


def _section(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"must be a mapping, got {type(value).__name__}", file=path, key=key)
    return value


def load_settings() -> HubSettings:
    """Read and check ``policies/hub.yaml`` (missing file: the defaults)."""
    path = policy_path("hub")
    data = load_policy("hub")
    roles = _section(data, "roles", path)
    for group, role in roles.items():
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} for group {group!r}; fix: one of "
                              f"{', '.join(ROLES)}", file=path, key=f"roles.{group}")
    gpus = _section(data, "gpus", path)
    devices = gpus.get("devices") or []
    if not isinstance(devices, list):
        raise ConfigError("must be a list of CUDA device indices such as [\"0\", \"1\"]",
                          file=path, key="gpus.devices")
    quotas = gpus.get("quotas") or {"default": 1}
    for name, value in quotas.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"quota must be a whole number >= 0, got {value!r}", file=path,
                              key=f"gpus.quotas.{name}")
    runs = _section(data, "runs", path)
    culler = _section(data, "culler", path)
    settings = HubSettings(
        roles={str(g): str(r) for g, r in roles.items()},
        devices=[str(d) for d in devices], exclusive=bool(gpus.get("exclusive", True)),
        quotas={str(k): int(v) for k, v in quotas.items()},
        max_concurrent_runs=int(runs.get("max_concurrent", 2)),
        cull_timeout_s=int(culler.get("timeout_s", 3600)),
        cull_every_s=int(culler.get("every_s", 300)))
    if settings.max_concurrent_runs < 1:
        raise ConfigError("must be at least 1", file=path, key="runs.max_concurrent")
    settings.runs_backend = str(runs.get("backend", "local"))
    if settings.runs_backend not in ("local", "kubernetes"):
        raise ConfigError(f"unknown backend {settings.runs_backend!r}; fix: local or "
                          "kubernetes", file=path, key="runs.backend")
    settings.kubernetes = _k8s_settings(_section(runs, "kubernetes", path), path)
    terminals = data.get("terminals", False)
    if not isinstance(terminals, bool):
        raise ConfigError(f"must be true or false, got {terminals!r}", file=path,
                          key="terminals")
    settings.terminals = terminals
    return settings


def terminals_allowed(asked: bool, firewall_mode: str) -> tuple[bool, str]:
    """Whether users' servers get terminals, and why: only when the policy asks for them and
    the egress firewall is in force (``firewall_mode``: what ``firewall: ...`` resolves to
    here), since a terminal's processes bypass the guarded kernel."""
    if not asked:
        return False, "terminals: off (policies/hub.yaml)"
    if firewall_mode != "required":
        return False, ("terminals: off although policies/hub.yaml asks for them: the egress "
                       "firewall is not in force here (a terminal bypasses the kernel's guard)")
    return True, "terminals: on (policies/hub.yaml; the egress firewall filters them)"


def _k8s_settings(data: dict[str, Any], path: Path) -> K8sSettings:
    """``runs.kubernetes`` as :class:`K8sSettings` (unknown keys refused)."""
    fields = {f.name: f for f in dataclasses.fields(K8sSettings)}
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key; fix: one of {', '.join(sorted(fields))}",
                              file=path, key=f"runs.kubernetes.{key}")
        where = f"runs.kubernetes.{key}"
        if key == "uids":
            if not isinstance(value, dict) or not all(
                    isinstance(ids, list) and len(ids) == 2 and all(
                        isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
                    for ids in value.values()):
                raise ConfigError("must map user names to [uid, gid], two whole numbers > 0 "
                                  "(never root)", file=path, key=where)
            value = {str(u): (ids[0], ids[1]) for u, ids in value.items()}
        else:
            default = getattr(K8sSettings(), key)
            kind = type(default) if default is not None else str
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) \
                    or (kind is dict and not all(isinstance(v, str) for v in value.values())):
                if not (value is None and key == "memory_limit"):
                    raise ConfigError(f"must be a {kind.__name__} (like {default!r}), got "
                                      f"{value!r}", file=path, key=where)
            if kind is int and value is not None and value < (0 if key.startswith("ttl")
                                                              else 1):
                raise ConfigError(f"must be at least {0 if key.startswith('ttl') else 1}, got "
                                  f"{value!r}", file=path, key=where)
            if kind is dict and not all(isinstance(k, str) for k in value):
                raise ConfigError("keys must be strings", file=path, key=where)
        kw[key] = value
    return K8sSettings(**kw)


def hub_state_dir(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/hub``: the GPU pool file and the runs queue (service account's, mode 0700)."""
    return state_dir(state) / "hub"


def gpu_pool_path(state: str | os.PathLike[str] | None = None) -> Path:
    return hub_state_dir(state) / "gpus.json"


def user_home(name: str, demo: bool) -> Path:
    """A hub user's working home (``$LORA_HOME`` of their server and runs): ``~name/lora`` for a
    system user; ``$LORA_HOME/hub-users/<name>`` for a hub-only demo user."""
    import pwd

    from lora_kernel.common.paths import lora_home

    if demo:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return lora_home() / "hub-users" / name
    try:
        return Path(pwd.getpwnam(name).pw_dir) / "lora"
    except KeyError:
        raise ConfigError(f"hub user {name!r} has no system account; fix: log in as a system "
                          "user (PAM/LDAP), or run the demo hub") from None



def prepare_hub_state(state: Path, service_user: str) -> None:
    """Root mode: the state directory (``runs/``, ``ledger/``, ``hub/``) belongs to the service
    account, mode 0700 (the runs service, as root, still reaches it)."""
    import pwd

    from lora_kernel.trusted.service import prepare_state

    state.mkdir(parents=True, exist_ok=True)
    prepare_state(state, service_user)
    svc = pwd.getpwnam(service_user)
    hub = hub_state_dir(state)
    hub.mkdir(mode=0o700, exist_ok=True)
    os.chown(hub, svc.pw_uid, svc.pw_gid)
