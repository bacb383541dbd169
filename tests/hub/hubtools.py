"""A real JupyterHub for tests (used by conftest.py and the hub tests):
``hub/jupyterhub_config.py`` with configurable-http-proxy, the GPU spawner and the services,
started as a process on free loopback ports.

As root (CI), users are real system users made fresh for the session (``<prefix>hub-alice``...,
see ``tests/sysusers.py``) and every server runs as its user; otherwise hub-only demo users.
Login is the demo password file either way (the same
:class:`hub.auth.DemoAuthenticator` ``make hub`` uses); the PAM path is checked separately.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests") not in sys.path:  # bench/hub_load.py imports this module too
    sys.path.insert(0, str(REPO / "tests"))
import sysusers  # noqa: E402

ROOT = os.geteuid() == 0
# name -> platform groups (policies/hub.yaml roles)
HUB_USERS = {
    "alice": ["lora-researchers"],
    "bob": ["lora-researchers"],
    "rita": ["lora-reviewers"],
    "audrey": ["lora-auditors"],
}
PASSWORD = "correct horse battery"


def user_name(short: str) -> str:
    """The hub (and, as root, system) name of a test user."""
    return sysusers.user_name(f"hub-{short}") if ROOT else f"hub-{short}"


SERVICE_USER = sysusers.service_user()


def hub_xsrf(s) -> str | None:  # type: ignore[no-untyped-def]
    """The hub's xsrf cookie (servers set their own under /user/<name>/)."""
    for c in s.cookies:
        if c.name == "_xsrf" and c.path in ("/hub/", "/hub", "/"):
            return str(c.value)
    return None


def server_procs(hub_api_port: str | None = None, user: str | None = None) -> list:  # type: ignore
    """Single-user server processes (of one hub / one user), found by their environment."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "JUPYTERHUB_USER" not in env or "JUPYTERHUB_API_URL" not in env:
            continue
        if hub_api_port and f":{hub_api_port}/" not in env["JUPYTERHUB_API_URL"]:
            continue
        if user and env["JUPYTERHUB_USER"] != user:
            continue
        found.append(p)
    return found


def make_hub_root(prefix: str) -> Path:
    """A fresh folder for hubs (tests, bench/hub_load.py), outside pytest's 0700 temp root and
    readable by the service account and the users; as root, the repo's parents get their
    traverse bit and the session's service account (:data:`SERVICE_USER`) is created."""
    if shutil.which("node") is None or not (REPO / "hub" / "node_modules" / ".bin" /
                                             "configurable-http-proxy").exists():
        raise RuntimeError("configurable-http-proxy is not installed; run `make setup`")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    if ROOT:
        for folder in [REPO, *REPO.parents]:
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o001)
        sysusers.ensure_user(SERVICE_USER, system=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hub:
    """One hub process (and its proxy); servers survive :meth:`restart` like in production."""

    def __init__(self, root: Path, services: str = "runs,audit", env: dict[str, str] | None = None):
        self.root = root
        self.dir = root / "hub"
        self.state = root / "state"
        self.home = root / "home"
        for d in (self.dir, self.state, self.home):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(self.home, 0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update({
            "LORA_HUB_AUTH": "demo", "LORA_HUB_DIR": str(self.dir), "LORA_STATE": str(self.state),
            "LORA_HOME": str(self.home), "LORA_HUB_PORT": str(self.port),
            "LORA_HUB_API_PORT": str(free_port()), "LORA_PROXY_API_PORT": str(free_port()),
            "LORA_RUNS_PORT": str(free_port()), "LORA_AUDIT_PORT": str(free_port()),
            "LORA_HUB_SERVICES": services, "LORA_SERVICE_USER": SERVICE_USER,
        })
        self.env.pop("LORA_RUNNER", None)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "hub.log"

    # -- process ---------------------------------------------------------------------------
    def start(self, timeout: float = 90, make_hub: bool = False) -> None:
        """Start the hub (``make_hub``: as ``make hub`` does, through ``python -m hub.demo``,
        whose Ctrl-C stops everything); wait until it and its services answer."""
        log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "hub.demo"] if make_hub else \
            [sys.executable, "-m", "jupyterhub", "-f", str(REPO / "hub" / "jupyterhub_config.py")]
        self.proc = subprocess.Popen(argv, cwd=REPO if make_hub else self.dir, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        import requests

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/hub/api/", timeout=2).status_code == 200:
                    if self._services_up():
                        return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"hub did not answer in {timeout}s:\n{self.log_tail()}")

    def _services_up(self) -> bool:
        import requests

        for key, var in (("runs", "LORA_RUNS_PORT"), ("audit", "LORA_AUDIT_PORT")):
            if key in self.env["LORA_HUB_SERVICES"].split(","):
                try:
                    requests.get(f"http://127.0.0.1:{self.env[var]}/", timeout=1)
                except requests.RequestException:
                    return False
        return True

    def stop_hub(self) -> None:
        """Stop the hub and its proxy and services; single-user servers keep running."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop_hub()
        self.start()

    def stop_all(self) -> None:
        """Stop every server this hub started (via the API when it is up), then the hub."""
        for name in self.sessions:
            try:
                self.stop_server(name)
            except Exception:
                pass
        self.stop_hub()
        for p in server_procs(self.env["LORA_HUB_API_PORT"]):  # whatever is left of this hub
            try:
                p.kill()
            except Exception:
                pass

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- users -----------------------------------------------------------------------------
    sessions: dict[str, object]

    def add_users(self, users: dict[str, list[str]]) -> None:
        from hub.auth import add_demo_user

        for short, groups in users.items():
            name = user_name(short)
            if ROOT:
                sysusers.ensure_user(name, groups)
            add_demo_user(self.dir / "demo_users.json", name, groups, password=PASSWORD)

    def login(self, short: str):  # type: ignore[no-untyped-def]
        """A requests session logged in through the hub's login form."""
        import requests

        name = user_name(short)
        s = requests.Session()
        s.get(f"{self.url}/hub/login")
        r = s.post(f"{self.url}/hub/login", data={"username": name, "password": PASSWORD,
                                                   "_xsrf": hub_xsrf(s)})
        assert r.status_code == 200 and "/hub/login" not in r.url, (r.status_code, r.url)
        s.hub_user = name  # type: ignore[attr-defined]
        self.sessions[name] = s
        return s

    def token(self, short: str, scopes: list[str] | None = None) -> str:
        """An API token of the user (made by the user, through the hub's REST API)."""
        name = user_name(short)
        s = self.sessions.get(name) or self.login(short)
        body: dict[str, object] = {"note": "test"}
        if scopes is not None:
            body["scopes"] = scopes
        r = s.post(f"{self.url}/hub/api/users/{name}/tokens", json=body,  # type: ignore
                   headers={"X-XSRFToken": hub_xsrf(s)})  # type: ignore
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def spawn(self, short: str, gpus: int = 0, timeout: float = 120):  # type: ignore
        """Start the user's server through the spawn form; wait until it answers."""
        name = user_name(short)
        s = self.sessions.get(name) or self.login(short)
        started = time.monotonic()
        s.post(f"{self.url}/hub/spawn/{name}", data={"gpus": str(gpus),  # type: ignore
                                                      "_xsrf": hub_xsrf(s)})  # type: ignore
        while time.monotonic() - started < timeout:
            r = s.get(f"{self.url}/hub/api/users/{name}",  # type: ignore
                      headers={"X-XSRFToken": hub_xsrf(s)})  # type: ignore
            server = (r.json().get("servers") or {}).get("", {}) if r.status_code == 200 else {}
            if server.get("ready"):
                lab = s.get(f"{self.url}/user/{name}/lab")  # type: ignore  # OAuth to the server
                assert lab.status_code == 200, lab.status_code
                return s
            time.sleep(0.5)
        raise AssertionError(f"{name}'s server not ready in {timeout}s:\n{self.log_tail()}")

    def server_api(self, s, method: str, path: str, **kwargs):  # type: ignore
        name = s.hub_user
        xsrf = s.cookies.get("_xsrf", path=f"/user/{name}/") or s.cookies.get("_xsrf")
        headers = {"X-XSRFToken": xsrf, **kwargs.pop("headers", {})}
        return s.request(method, f"{self.url}/user/{name}/api/{path}", headers=headers, **kwargs)

    def stop_server(self, name: str) -> None:
        import requests

        s = self.sessions.get(name)
        if s is None:
            return
        s.delete(f"{self.url}/hub/api/users/{name}/server",  # type: ignore
                 headers={"X-XSRFToken": hub_xsrf(s)},  # type: ignore
                 timeout=30)
        for _ in range(60):
            r = s.get(f"{self.url}/hub/api/users/{name}",  # type: ignore
                      headers={"X-XSRFToken": hub_xsrf(s)})  # type: ignore
            if r.status_code != 200 or not (r.json().get("servers") or {}):
                return
            time.sleep(0.5)
        del requests


def execute(hub: Hub, s, kernel_id: str, code: str, timeout: float = 90) -> dict:  # type: ignore
    """Run ``code`` in a kernel of the user's server over the kernel websocket (as JupyterLab
    does); returns stdout, status and the error name."""
    import json
    import uuid

    import websocket

    name = s.hub_user
    cookie = "; ".join(f"{c.name}={c.value}" for c in s.cookies)
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{hub.port}/user/{name}/api/kernels/{kernel_id}/channels",
        cookie=cookie, origin=hub.url, timeout=timeout)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": name, "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    out: dict = {"stdout": "", "status": None, "ename": None}
    deadline = time.monotonic() + timeout
    idle = False
    while time.monotonic() < deadline and not (idle and out["status"]):
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            out["stdout"] += msg["content"]["text"]
        elif kind == "error":
            out["ename"] = msg["content"]["ename"]
        elif kind == "execute_reply":
            out["status"] = msg["content"]["status"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return out


def start_kernel(hub: Hub, s, name: str = "lora") -> str:  # type: ignore
    r = hub.server_api(s, "POST", "kernels", json={"name": name})
    assert r.status_code == 201, (r.status_code, r.text)
    kernel_id = str(r.json()["id"])
    for _ in range(120):  # wait until the kernel answers
        if hub.server_api(s, "GET", f"kernels/{kernel_id}").json().get(
                "execution_state") in ("idle", "busy"):
            break
        time.sleep(0.5)
    return kernel_id


def k8s_round_trip(obj, kind: str):  # type: ignore[no-untyped-def]
    """Serialize a kubernetes model as an API call does and read it back into the client's
    models (whose validation rejects missing required fields and bad values); returns
    ``(data, model)`` after checking the round trip is lossless."""
    import json
    from types import SimpleNamespace

    from kubernetes import client

    api = client.ApiClient()
    data = api.sanitize_for_serialization(obj)
    text = json.dumps(data)
    try:
        back = api.deserialize(text, kind, "application/json")
    except TypeError:  # older clients: deserialize(response, type)
        back = api.deserialize(SimpleNamespace(data=text), kind)
    assert api.sanitize_for_serialization(back) == data
    return data, back
