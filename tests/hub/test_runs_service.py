"""The runs service (hub.services.runs) over HTTP, without a hub: the app runs on its own
IOLoop in a thread, and a test-only ``ServiceHandler.get_current_user`` takes the user from
``Authorization: token test:<name>[:<group>,...]`` instead of asking the hub. (Tests with a
real hub live elsewhere.)

Fast: submit / list / get / cancel ownership, quotas, ``lora run --hub`` errors. Slow: a real
run of a tiny notebook through the scheduler and the worker (demo mode), sealed and verified;
a cancel while it runs seals a failed record.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from nbtools import write_notebook
from sysusers import user_name
from tornado.ioloop import IOLoop
from tornado.testing import bind_unused_port

from hub.services.base import ServiceConfig, ServiceHandler
from hub.services.runs import make_runs_app
from hub.settings import HubSettings

SVC, ALICE, BOB = user_name("svc"), user_name("alice"), user_name("bob")

PREFIX = "/services/lora-runs"
SETTINGS = HubSettings(roles={"lora-engineers": "engineer"}, devices=["0", "1", "2"],
                       quotas={"default": 1, "engineer": 2}, max_concurrent_runs=2)


def _test_user(self):
    """Test-only identity: ``Authorization: token test:<name>[:<groups>]``."""
    auth = self.request.headers.get("Authorization", "")
    if not auth.startswith("token test:"):
        return None
    _, name, *groups = auth[len("token "):].split(":")
    self._token_authenticated = True
    return {"kind": "user", "name": name, "groups": groups[0].split(",") if groups else []}


class Server:
    """The runs app on its own IOLoop thread; ``url`` is the hub-side base URL."""

    def __init__(self, config: ServiceConfig, devices: list[str], scheduler: bool):
        self.config, self.devices, self.scheduler = config, devices, scheduler
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the service did not start"
        if self.error:
            raise self.error

    def _main(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        try:
            self.app = make_runs_app(self.config, settings=SETTINGS, devices=self.devices,
                                     scheduler=self.scheduler)
            sock, port = bind_unused_port()
            from tornado.httpserver import HTTPServer

            self.server = HTTPServer(self.app)
            self.server.add_sockets([sock])
            self.url = f"http://127.0.0.1:{port}"
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.start()

    def stop(self):
        def down():
            sched = self.app.settings.get("runs_scheduler")
            if sched is not None:
                sched.stop(grace_s=60)
            self.server.stop()
            self.loop.stop()
        self.loop.add_callback(down)
        self.thread.join(90)

    def call(self, user: str, method: str, path: str, body: dict | None = None):
        """``(status, JSON or text)`` of one request as ``user`` ("name[:groups]")."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{PREFIX}/{path}", data=data, method=method,
                                     headers={"Authorization": f"token test:{user}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    monkeypatch.setattr(ServiceHandler, "get_current_user", _test_user)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", PREFIX + "/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "the-service-token")  # HubOAuth wants them
    monkeypatch.setenv("JUPYTERHUB_CLIENT_ID", "service-lora-runs")
    monkeypatch.setenv("LORA_HOME", str(tmp_path / "lora_home"))
    return tmp_path


@pytest.fixture
def service(hub_env):
    server = Server(ServiceConfig("lora-runs", hub_env / "state", demo=True),
                    devices=["0", "1", "2"], scheduler=False)
    yield server
    server.stop()


def test_a_submission_is_listed_for_its_owner_only(service):
    status, sub = service.call("hub-alice", "POST", "api/runs",
                               {"notebook": "nb.ipynb", "parameters": {"x": 2}, "gpus": 1})
    assert status == 202 and sub["status"] == "queued"
    status, own = service.call("hub-alice", "GET", "api/runs")
    assert status == 200 and [r["id"] for r in own["runs"]] == [sub["id"]]
    row = own["runs"][0]
    home = Path(service.config.state).parent / "lora_home" / "hub-users" / "hub-alice"
    assert row["path"] == str(home / "nb.ipynb") and row["home"] == str(home)
    assert row["parameters"] == {"x": 2} and row["user"] == "hub-alice"
    assert "worker_pid" not in row
    # another user: not in their list, and the id answers 404 (not 403: ids do not leak)
    status, theirs = service.call("hub-bob", "GET", "api/runs")
    assert status == 200 and theirs["runs"] == []
    assert service.call("hub-bob", "GET", f"api/runs/{sub['id']}")[0] == 404
    assert service.call("hub-bob", "GET", "api/runs/999")[0] == 404
    status, got = service.call("hub-alice", "GET", f"api/runs/{sub['id']}")
    assert status == 200 and got["id"] == sub["id"]
    status, page = service.call("hub-alice", "GET", "runs")
    assert status == 200 and "nb.ipynb" in page
    assert "nb.ipynb" not in service.call("hub-bob", "GET", "runs")[1]


def test_the_services_menu_leads_to_my_runs_with_their_outcome(service):
    """The hub's Services menu opens the service's root: it leads to "My runs", where a
    finished run shows its outcome, its record's run id and its images, to its owner only."""
    _, sub = service.call("hub-alice", "POST", "api/runs", {"notebook": "train.ipynb"})
    queue = service.app.settings["runs_queue"]
    assert queue.claim_next().id == sub["id"]
    queue.finish(sub["id"], "succeeded", run_id="20261207T101010Z-abc123",
                 record={"run_id": "20261207T101010Z-abc123",
                         "result": {"steps": 40, "first_loss": 1.25, "final_loss": 0.5}},
                 exit_code=0)
    status, page = service.call("hub-alice", "GET", "")
    assert status == 200 and "My runs (hub-alice)" in page, page[:500]
    assert "40 steps, loss 1.2500 → 0.5000" in page and "20261207T101010Z-abc123" in page
    assert f"api/runs/{sub['id']}/samples.png" in page
    status, empty = service.call("hub-bob", "GET", "runs")
    assert status == 200 and "No runs yet" in empty and "20261207T101010Z" not in empty


def test_cancel_by_another_user_is_refused_by_the_owner_works(service):
    _, sub = service.call("hub-alice", "POST", "api/runs", {"config": "/x/my.yaml",
                                                             "overrides": {"seed": 3}})
    status, _ = service.call("hub-bob", "POST", f"api/runs/{sub['id']}/cancel", {})
    assert status == 404
    assert service.call("hub-alice", "GET", f"api/runs/{sub['id']}")[1]["status"] == "queued"
    status, done = service.call("hub-alice", "POST", f"api/runs/{sub['id']}/cancel", {})
    assert status == 202 and done["status"] == "cancelled" and done["record"] is None
    assert done["parameters"] == {"overrides": {"seed": 3}} and done["kind"] == "config"


def test_gpus_above_the_quota_are_refused_within_it_accepted(service):
    status, body = service.call("hub-alice", "POST", "api/runs",
                                {"notebook": "nb.ipynb", "gpus": 2})
    assert status == 403 and "quota is 1" in body["message"]
    status, _ = service.call("hub-eve:lora-engineers", "POST", "api/runs",
                             {"notebook": "nb.ipynb", "gpus": 2})
    assert status == 202
    status, _ = service.call("hub-eve:lora-engineers", "POST", "api/runs",
                             {"notebook": "nb.ipynb", "gpus": 3})
    assert status == 403
    assert service.call("hub-alice", "GET", "api/runs")[1]["runs"] == []


@pytest.mark.parametrize("body", [
    {}, {"notebook": "a.ipynb", "config": "b.yaml"}, {"notebook": ""},
    {"notebook": "a.ipynb", "parameters": [1]}, {"config": "b.yaml", "overrides": "x"},
    {"notebook": "a.ipynb", "gpus": -1}, {"notebook": "a.ipynb", "gpus": "1"},
    {"notebook": "a.ipynb", "timeout": 0},
])
def test_malformed_submissions_are_400(service, body):
    status, answer = service.call("hub-alice", "POST", "api/runs", body)
    assert status == 400, answer
    assert service.call("hub-alice", "GET", "api/runs")[1]["runs"] == []


def test_without_a_user_nothing_is_answered(service):
    req = urllib.request.Request(f"{service.url}{PREFIX}/api/runs")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code in (401, 403)


def test_lora_run_hub_needs_a_token(monkeypatch, capsys):
    from lora_kernel.cli.main import main

    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with _signals_restored():
        code = main(["run", "--hub", "http://127.0.0.1:9", "--config", "x.yaml"])
    assert code == 2 and "JUPYTERHUB_API_TOKEN" in capsys.readouterr().err


def test_lora_run_hub_maps_a_quota_refusal_to_exit_6(service, monkeypatch, capsys):
    from lora_kernel.cli.main import main

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "test:hub-alice")
    with _signals_restored():
        code = main(["run", "--hub", service.url, "--config", "x.yaml", "--gpus", "2"])
    assert code == 6, capsys.readouterr().err
    with _signals_restored():
        code = main(["run", "--hub", service.url, "--config", "x.yaml", "--home", "/tmp"])
    assert code == 2


class _signals_restored:
    """``lora run`` turns SIGTERM/SIGHUP into Ctrl-C: give pytest its handlers back."""

    def __enter__(self):
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# -- real runs (demo mode: the worker runs the kernel as this user) --------------------------
@pytest.fixture
def live_service(hub_env, monkeypatch, lora_kernel_prefix):
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    server = Server(ServiceConfig("lora-runs", hub_env / "state", demo=True), devices=[],
                    scheduler=True)
    yield server
    server.stop()


def wait_for(service, sub_id, pred, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = service.call("hub-alice", "GET", f"api/runs/{sub_id}")[1]
        if pred(row):
            return row
        time.sleep(0.5)
    log = service.config.state / "hub" / "logs" / f"{sub_id}.log"
    raise AssertionError(f"timed out: {row}\n{log.read_text() if log.exists() else ''}")


@pytest.mark.slow
def test_a_queued_notebook_runs_and_its_record_is_sealed_and_verifies(live_service,
                                                                       monkeypatch, capsys):
    from lora_kernel.cli.main import main
    from lora_kernel.provenance.audit import verify
    from lora_kernel.provenance.records import load_manifest

    home = Path(live_service.config.state).parent / "lora_home" / "hub-users" / "hub-alice"
    write_notebook(home / "hello.ipynb", "x = 1",
                   "import os\nprint('x is', x, 'token' if 'JUPYTERHUB_API_TOKEN' in "
                   "os.environ else 'no token')")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "test:hub-alice")
    with _signals_restored():  # `lora run --hub`: submit, wait, print, exit code
        code = main(["run", "--hub", live_service.url, str(home / "hello.ipynb"),
                     "-p", "x", "2"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    row = live_service.call("hub-alice", "GET", "api/runs")[1]["runs"][0]
    assert row["status"] == "succeeded" and row["run_id"] in out.out, row
    record = Path(row["record"]["path"])
    assert record.parent == Path(live_service.config.state) / "runs"
    assert verify(row["run_id"], state=live_service.config.state) == []
    meta = load_manifest(record)["predicate"]["runDetails"]["metadata"]
    assert meta["status"] == "succeeded" and meta["extra"]["parameters"] == {"x": 2}
    executed = (record / "executed.ipynb").read_text()
    assert "x is 2 no token" in executed  # the hub's token never reaches the kernel
    assert row["gpus_held"] == [] and row["finished"]


@pytest.mark.slow
def test_cancel_while_running_stops_the_kernel_and_seals_a_failed_record(live_service):
    from lora_kernel.provenance.audit import verify
    from lora_kernel.provenance.records import load_manifest

    home = Path(live_service.config.state).parent / "lora_home" / "hub-users" / "hub-alice"
    write_notebook(home / "sleep.ipynb", "seconds = 600", "print('started', flush=True)",
                   "import time; time.sleep(seconds)")
    status, sub = live_service.call("hub-alice", "POST", "api/runs",
                                    {"notebook": "sleep.ipynb"})
    assert status == 202
    row = wait_for(live_service, sub["id"], lambda r: r["run_id"])
    executed = home / "work" / row["run_id"] / "executed.ipynb"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            executed.is_file() and "started" in executed.read_text(errors="replace")):
        time.sleep(0.3)
    assert live_service.call("hub-bob", "POST", f"api/runs/{sub['id']}/cancel", {})[0] == 404
    status, _ = live_service.call("hub-alice", "POST", f"api/runs/{sub['id']}/cancel", {})
    assert status == 202
    row = wait_for(live_service, sub["id"], lambda r: r["status"] != "running", timeout=120)
    assert row["status"] == "failed" and "cancelled by hub-alice" in row["error"], row
    assert row["record"]["status"] == "failed"
    assert verify(row["run_id"], state=live_service.config.state) == []
    meta = load_manifest(Path(row["record"]["path"]))["predicate"]["runDetails"]["metadata"]
    assert meta["status"] == "failed" and "cancelled" in meta["extra"]["error"]


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_recovered_interrupted_with_a_sealed_record(live_service):
    """What a service restart finds: the row running, its worker dead. The scheduler's restore
    (the same as at start-up) marks it interrupted and the trusted recovery seals the run."""
    import os

    import psutil

    from lora_kernel.provenance.audit import verify

    home = Path(live_service.config.state).parent / "lora_home" / "hub-users" / "hub-alice"
    write_notebook(home / "sleep.ipynb", "seconds = 600", "print('started', flush=True)",
                   "import time; time.sleep(seconds)")
    _, sub = live_service.call("hub-alice", "POST", "api/runs", {"notebook": "sleep.ipynb"})
    row = wait_for(live_service, sub["id"], lambda r: r["run_id"])
    executed = home / "work" / row["run_id"] / "executed.ipynb"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            executed.is_file() and "started" in executed.read_text(errors="replace")):
        time.sleep(0.3)
    queue = live_service.app.settings["runs_queue"]
    worker = psutil.Process(queue.get(sub["id"]).worker_pid)
    children = worker.children(recursive=True)
    os.kill(worker.pid, signal.SIGKILL)
    row = wait_for(live_service, sub["id"], lambda r: r["status"] != "running", timeout=120)
    assert row["status"] == "interrupted", row
    assert row["record"] and row["record"]["status"] == "failed", row
    assert verify(row["run_id"], state=live_service.config.state) == []
    psutil.wait_procs(children, timeout=30)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.root
@pytest.mark.slow
def test_root_mode_runs_the_kernel_as_the_user_and_seals_as_the_service_account(
        hub_env, system_users, monkeypatch):
    """Root mode: the worker writes the record as SVC; the kernel runs as ALICE in
    her own ``~/lora`` (the request cannot choose another home)."""
    import os
    import pwd
    import shutil
    import tempfile

    from lora_kernel.provenance.audit import verify
    from lora_kernel.provenance.records import load_manifest
    from lora_kernel.trusted.service import prepare_state

    base = Path(tempfile.mkdtemp(prefix="lora-runs-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    state = base / "state"
    prepare_state(state, SVC)
    alice = pwd.getpwnam(ALICE)
    home = Path(alice.pw_dir) / "lora"
    nb = write_notebook(home / f"whoami-{base.name}.ipynb", "x = 1",
                        "import os\nprint('uid', os.getuid(), 'x', x)")
    for path in (home, nb):
        os.chown(path, alice.pw_uid, alice.pw_gid)
    monkeypatch.delenv("JUPYTER_PATH", raising=False)  # the venv's installed kernelspec
    server = Server(ServiceConfig("lora-runs", state, demo=False, service_user=SVC),
                    devices=[], scheduler=True)
    try:
        status, sub = server.call(ALICE, "POST", "api/runs",
                                  {"notebook": nb.name, "parameters": {"x": 5}})
        assert status == 202, sub
        assert server.call(BOB, "GET", f"api/runs/{sub['id']}")[0] == 404
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            row = server.call(ALICE, "GET", f"api/runs/{sub['id']}")[1]
            if row["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        log = state / "hub" / "logs" / f"{sub['id']}.log"
        assert row["status"] == "succeeded", (row.get("error"),
                                              log.read_text() if log.exists() else "")
        record = Path(row["record"]["path"])
        assert record.stat().st_uid == pwd.getpwnam(SVC).pw_uid
        assert f"uid {alice.pw_uid} x 5" in (record / "executed.ipynb").read_text()
        meta = load_manifest(record)["predicate"]["runDetails"]["metadata"]
        assert meta["extra"]["run_as"]["name"] == ALICE
        assert verify(row["run_id"], state=state) == []
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
