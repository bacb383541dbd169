"""JupyterHub configuration of LoRA Enclave (``jupyterhub -f hub/jupyterhub_config.py``).

Read from ``policies/hub.yaml`` (roles, GPUs, culling) and the environment of whoever starts the
hub (systemd unit, container entrypoint, ``make hub``):

``LORA_HUB_AUTH``       ``pam`` (production: system users), ``demo`` (password file written by
                        ``make hub``) or ``ldap`` (ldapauthenticator, docs/hub.md); default demo
``LORA_HUB_DIR``        the hub's own files: SQLite database, cookie secret, demo users
``LORA_STATE``          the trusted state directory (records, ledger, GPU pool, runs queue)
``LORA_SERVICE_USER``   the service account that owns the state (root mode; default lora-svc)
``LORA_HUB_IP`` / ``LORA_HUB_PORT``  where users connect (127.0.0.1:8000)
``LORA_HUB_API_PORT``, ``LORA_PROXY_API_PORT``, ``LORA_RUNS_PORT``, ``LORA_AUDIT_PORT``  loopback
                        ports of the hub API, the proxy API and the two services

Started as root, servers run as each user's uid and the services as described in DESIGN.md:
``lora-runs`` as root (it starts each run's kernel as the user and seals as the service account),
``lora-audit`` as the service account. Started as another user, it is the one-account demo:
hub-only users, every server as that account (docs/hub.md says what that does not protect).

Runs as: the hub's account (read by JupyterHub at its start).
"""
# ruff: noqa: F821  (``c`` and ``get_config`` are provided by JupyterHub)
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hub.settings import (  # noqa: E402
    AUDIT_READ,
    AUDIT_SERVICE,
    REVIEW_WRITE,
    RUNS_SERVICE,
    load_settings,
    prepare_hub_state,
    terminals_allowed,
)
from lora_kernel.common.egress import load_egress_policy  # noqa: E402
from lora_kernel.common.paths import state_dir  # noqa: E402
from lora_kernel.trusted import firewall  # noqa: E402

c = get_config()  # type: ignore[name-defined]  # noqa: F821

settings = load_settings()
root = os.geteuid() == 0
auth = os.environ.get("LORA_HUB_AUTH", "demo")
hub_dir = Path(os.environ.get("LORA_HUB_DIR", REPO / "hub_data")).resolve()
hub_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
state = state_dir().resolve()
service_user = os.environ.get("LORA_SERVICE_USER", "lora-svc") if root else None
ip = os.environ.get("LORA_HUB_IP", "127.0.0.1")
port = int(os.environ.get("LORA_HUB_PORT", "8000"))
runs_port = int(os.environ.get("LORA_RUNS_PORT", "10101"))
audit_port = int(os.environ.get("LORA_AUDIT_PORT", "10102"))
public_url = f"http://{ip}:{port}"
os.environ.setdefault("LORA_HUB_PUBLIC_URL", public_url)
demo_spawn = not root  # hub-only users: no per-user uid
if service_user:
    prepare_hub_state(state, service_user)
# the egress firewall (policies/egress.yaml `firewall:`): applied here when `auto` is in force
print(firewall.prepare_host(), flush=True)
terminals, terminals_why = terminals_allowed(
    settings.terminals, firewall.effective(load_egress_policy())[0])
print(terminals_why, flush=True)

# -- hub, proxy, database ------------------------------------------------------------------
c.JupyterHub.ip = ip
c.JupyterHub.port = port
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ.get("LORA_HUB_API_PORT", "8081"))
c.JupyterHub.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(hub_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(hub_dir / "jupyterhub.pid")
c.ConfigurableHTTPProxy.command = [str(REPO / "hub" / "node_modules" / ".bin" /
                                       "configurable-http-proxy")]
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{int(os.environ.get('LORA_PROXY_API_PORT', '8001'))}")
c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")
c.ConfigurableHTTPProxy.should_start = True
# A hub restart leaves users' servers running (production); `make hub` (hub/demo.py) sets
# LORA_HUB_STOP_SERVERS=1 so that its Ctrl-C stops them, with their kernels.
c.JupyterHub.cleanup_servers = os.environ.get("LORA_HUB_STOP_SERVERS") == "1"
c.JupyterHub.default_url = "/hub/home"
c.JupyterHub.template_vars = {"announcement_login": "LoRA Enclave — every notebook runs in "
                                                    "the guarded lora kernel and is audited."}

# -- authentication and roles --------------------------------------------------------------
if auth == "pam":
    c.JupyterHub.authenticator_class = "hub.auth.LoraPAMAuthenticator"
    c.LoraPAMAuthenticator.allowed_groups = set(settings.roles)
    c.LoraPAMAuthenticator.admin_groups = {g for g, r in settings.roles.items() if r == "admin"}
elif auth == "ldap":
    # ldapauthenticator (pip install jupyterhub-ldapauthenticator); server and bind settings go
    # in a site file, see docs/hub.md. Group names as in policies/hub.yaml.
    c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"
    c.LDAPAuthenticator.manage_groups = True
    c.LDAPAuthenticator.allowed_groups = list(settings.roles)
    site = Path(os.environ.get("LORA_HUB_LDAP_CONFIG", "/etc/lora-enclave/ldap_config.py"))
    if site.exists():
        exec(compile(site.read_text(), str(site), "exec"))  # noqa: S102
elif auth == "demo":
    c.JupyterHub.authenticator_class = "hub.auth.DemoAuthenticator"
    c.DemoAuthenticator.users_file = str(hub_dir / "demo_users.json")
else:
    raise SystemExit(f"LORA_HUB_AUTH={auth!r}: use pam, ldap or demo")

c.JupyterHub.custom_scopes = {
    AUDIT_READ: {"description": "Read every run, record, notebook and kernel event in the "
                                "audit service."},
    REVIEW_WRITE: {"description": "Approve or reject other users' runs in the audit service."},
}
_service_access = [f"access:services!service={AUDIT_SERVICE}",
                   f"access:services!service={RUNS_SERVICE}"]
c.JupyterHub.extra_user_scopes = set(_service_access)


def _groups_with(role: str) -> list[str]:
    return sorted(g for g, r in settings.roles.items() if r == role)


c.JupyterHub.load_roles = [
    {"name": "lora-auditor", "description": "Audit service: read everything.",
     "scopes": [AUDIT_READ], "groups": _groups_with("auditor")},
    {"name": "lora-reviewer", "description": "Audit service: review others' runs.",
     "scopes": [AUDIT_READ, REVIEW_WRITE], "groups": _groups_with("reviewer")},
    {"name": "lora-admin", "description": "Hub administration (users and servers).",
     "scopes": ["admin:users", "admin:servers", "admin-ui", "list:users", "read:users"],
     "groups": _groups_with("admin")},
    {"name": "idle-culler", "description": "Cull idle interactive servers.",
     "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
     "services": ["idle-culler"]},
]

# -- spawner --------------------------------------------------------------------------------
c.JupyterHub.spawner_class = "lora-gpu"
c.LoraSpawner.demo = demo_spawn
c.LoraSpawner.terminals = terminals
c.LoraSpawner.state_dir = str(state)
c.LoraSpawner.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
c.LoraSpawner.default_url = "/lab"
c.LoraSpawner.http_timeout = 120
c.LoraSpawner.start_timeout = 180
# The server's token may also post kernel events to the audit service and submit runs.
c.LoraSpawner.server_token_scopes = [
    "users:activity!user", "access:servers!server", *_service_access]
c.Spawner.environment = {"LORA_HUB_PUBLIC_URL": public_url}

# -- services --------------------------------------------------------------------------------
_py = sys.executable
_common = ["--state", str(state)] + (["--demo"] if demo_spawn else [])
_env = {k: os.environ[k] for k in ("LORA_POLICIES", "LORA_NOTEBOOKS", "LORA_HOME", "PATH",
                                   "JUPYTER_PATH") if k in os.environ}
_runs = {"name": RUNS_SERVICE, "url": f"http://127.0.0.1:{runs_port}",
         "command": [_py, "-m", "hub.services.runs", *_common,
                     *(["--service-user", service_user] if service_user else [])],
         "environment": _env, "cwd": str(REPO), "oauth_no_confirm": True}
_audit = {"name": AUDIT_SERVICE, "url": f"http://127.0.0.1:{audit_port}",
          "command": [_py, "-m", "hub.services.audit", *_common],
          "environment": _env, "cwd": str(REPO), "oauth_no_confirm": True,
          "oauth_client_allowed_scopes": [AUDIT_READ, REVIEW_WRITE]}
if service_user:
    _audit["user"] = service_user
_culler = {"name": "idle-culler",
           "command": [_py, "-m", "jupyterhub_idle_culler", f"--timeout={settings.cull_timeout_s}",
                       f"--cull-every={settings.cull_every_s}"]}
# LORA_HUB_SERVICES: which managed services to start (all by default; tests pick).
_wanted = os.environ.get("LORA_HUB_SERVICES", "runs,audit,culler").split(",")
c.JupyterHub.services = [svc for key, svc in (("runs", _runs), ("audit", _audit),
                                              ("culler", _culler)) if key in _wanted]
c.JupyterHub.load_roles = [r for r in c.JupyterHub.load_roles
                           if r["name"] != "idle-culler" or "culler" in _wanted]
