"""The runs and audit services behind a real hub: identity from the hub's token, scopes, runs
as the user sealed by the service account, review rules, kernel events in the ledger, culling."""
from __future__ import annotations

import os
import pwd
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import requests
from hubtools import HUB_USERS, REPO, ROOT, SERVICE_USER, Hub, execute, start_kernel, user_name

pytestmark = [pytest.mark.hub, pytest.mark.slow]
RUNS = "/services/lora-runs/api/runs"
AUDIT = "/services/lora-audit/api"


def api(hub: Hub, token: str, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, hub.url + path, timeout=60,
                            headers={"Authorization": f"token {token}"}, **kw)


def user_home(short: str, hub: Hub) -> Path:
    from hub.settings import user_home as home_of

    return home_of(user_name(short), demo=not ROOT) if ROOT else \
        hub.home / "hub-users" / user_name(short)


def tiny_notebook(hub: Hub, short: str, name: str = "hello.ipynb", sleep: float = 0) -> str:
    """A tiny notebook in the user's working home, owned by the user."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "lora", "display_name": "LoRA", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1\noutput_dir = 'output'",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(f"import time; time.sleep({sleep}); print('x is', x)"),
        nbformat.v4.new_code_cell(  # a (tiny) adapter file, so the run can be approved
            "import os, numpy as np\nfrom safetensors.numpy import save_file\n"
            "os.makedirs(output_dir, exist_ok=True)\n"
            "save_file({'w': np.zeros(2, dtype=np.float32)}, "
            "os.path.join(output_dir, 'adapter.safetensors'))")]
    home = user_home(short, hub)
    home.mkdir(parents=True, exist_ok=True)
    path = home / name
    nbformat.write(nb, str(path))
    if ROOT:
        pw = pwd.getpwnam(user_name(short))
        for p in (home, path):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    return name


def submit(hub: Hub, token: str, notebook: str, **extra) -> int:
    r = api(hub, token, "POST", RUNS, json={"notebook": notebook, "parameters": {"x": 2},
                                            "gpus": 0, **extra})
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def wait_run(hub: Hub, token: str, sub_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        row = api(hub, token, "GET", f"{RUNS}/{sub_id}").json()
        if row.get("status") not in ("queued", "running"):
            return row
        time.sleep(1)
    raise AssertionError(f"run {sub_id} not finished: {row}\n{hub.log_tail()}")


@pytest.fixture(scope="module")
def tokens(hub):
    return {short: hub.token(short) for short in HUB_USERS}


def test_audit_service_is_for_auditors_and_reviewers_only(hub, tokens):
    assert api(hub, tokens["audrey"], "GET", f"{AUDIT}/runs").status_code == 200
    assert api(hub, tokens["rita"], "GET", f"{AUDIT}/runs").status_code == 200
    assert api(hub, tokens["bob"], "GET", f"{AUDIT}/runs").status_code == 403
    assert api(hub, "not-a-token", "GET", f"{AUDIT}/runs").status_code in (401, 403)
    # a token the user narrowed to the runs service cannot read the audit service either
    narrow = hub.token("audrey", scopes=["access:services!service=lora-runs"])
    assert api(hub, narrow, "GET", f"{AUDIT}/runs").status_code in (401, 403)


def test_a_run_through_the_api_is_sealed_by_the_service_account_and_reviewed(hub, tokens):
    from lora_kernel.provenance.audit import verify

    alice_run = wait_run(hub, tokens["alice"], submit(hub, tokens["alice"],
                                                      tiny_notebook(hub, "alice")))
    assert alice_run["status"] == "succeeded", alice_run
    run_id = alice_run["run_id"]
    record = hub.state / "runs" / run_id
    assert verify(run_id, state=hub.state) == []
    if ROOT:  # sealed by the service account; the kernel ran as alice
        assert record.stat().st_uid == pwd.getpwnam(SERVICE_USER).pw_uid
    executed = (record / "executed.ipynb").read_text()
    assert "x is 2" in executed
    assert (record / "adapter" / "adapter.safetensors").is_file(), (
        sorted(p.name for p in record.rglob("*")), executed[-3000:])

    # each user sees only their own runs
    mine = [r["id"] for r in api(hub, tokens["alice"], "GET", RUNS).json()["runs"]]
    assert alice_run["id"] in mine
    theirs = api(hub, tokens["bob"], "GET", RUNS).json()["runs"]
    assert all(r["id"] != alice_run["id"] for r in theirs)
    assert api(hub, tokens["bob"], "GET", f"{RUNS}/{alice_run['id']}").status_code == 404

    # reviews: never one's own run; only reviewers; identity from the token, not the body
    rita_run = wait_run(hub, tokens["rita"], submit(hub, tokens["rita"],
                                                    tiny_notebook(hub, "rita")))
    assert rita_run["status"] == "succeeded", rita_run
    own = api(hub, tokens["rita"], "POST", f"{AUDIT}/runs/{rita_run['run_id']}/review",
              json={"decision": "approve", "note": "mine"})
    assert own.status_code == 403, own.text
    by_auditor = api(hub, tokens["audrey"], "POST", f"{AUDIT}/runs/{run_id}/review",
                     json={"decision": "approve", "reviewer": user_name("rita")})
    assert by_auditor.status_code == 403
    # a plain notebook wrote this adapter itself (kind "notebook"): self-reported, so even a
    # reviewer cannot approve it (issue 20); rejecting it is a review like any other
    self_reported = api(hub, tokens["rita"], "POST", f"{AUDIT}/runs/{run_id}/review",
                        json={"decision": "approve", "note": "looks right"})
    assert self_reported.status_code == 403 and "self-reported" in self_reported.text
    ok = api(hub, tokens["rita"], "POST", f"{AUDIT}/runs/{run_id}/review",
             json={"decision": "reject", "note": "not trained by the platform"})
    assert ok.status_code == 200, ok.text
    shown = api(hub, tokens["audrey"], "GET", f"{AUDIT}/runs/{run_id}").json()
    assert shown["review"] == "rejected" and shown["reviewer"] == user_name("rita")
    assert shown["kind"] == "notebook"


def test_kernel_events_are_posted_to_the_audit_service_and_land_in_the_ledger(hub, tokens):
    from lora_kernel.provenance.ledger import LedgerReader

    s = hub.spawn("alice")
    kernel_id = start_kernel(hub, s)
    marker = "print(6 * 7, 'from-the-hub-test')"
    out = execute(hub, s, kernel_id, marker)
    assert "42 from-the-hub-test" in out["stdout"], out
    name = user_name("alice")
    deadline = time.monotonic() + 60
    found: list = []
    while time.monotonic() < deadline and not found:
        events = api(hub, tokens["audrey"], "GET", f"{AUDIT}/events",
                     params={"user": name}).json()["events"]
        found = [e for e in events if e["event"].get("type") == "execute" and
                 marker in str(e["event"].get("code", "")) and e["kernel_id"] == kernel_id]
        time.sleep(1)
    assert found, f"no execute event for {name}:\n{hub.log_tail()}"
    # a researcher cannot read the events; nobody can post as someone else
    assert api(hub, tokens["bob"], "GET", f"{AUDIT}/events").status_code == 403
    forged = api(hub, tokens["bob"], "POST", f"{AUDIT}/events", json={
        "kernel_id": "k", "user": name, "events": [{"seq": 1, "type": "execute"}]})
    assert forged.status_code == 403
    with LedgerReader(state=hub.state) as led:
        entries = [e for e in led.entries() if e.kind == "kernel_events"]
    assert any(e.payload["user"] == name and e.subject == kernel_id for e in entries)
    hub.stop_server(name)


@pytest.fixture(scope="module")
def culling_hub(hub_root):
    policies = hub_root / "policies-cull"
    shutil.copytree(REPO / "policies", policies)
    text = (policies / "hub.yaml").read_text()
    text = text.replace("timeout_s: 3600", "timeout_s: 8").replace("every_s: 300", "every_s: 4")
    (policies / "hub.yaml").write_text(text)
    os.chmod(policies, 0o755)
    h = Hub(hub_root / "cull", services="runs,audit,culler", env={"LORA_POLICIES": str(policies)})
    h.sessions = {}
    h.add_users(HUB_USERS)
    h.start()
    yield h
    h.stop_all()


def test_idle_servers_are_culled_but_a_running_training_run_is_not(culling_hub):
    hub = culling_hub
    token = hub.token("bob")
    sub_id = submit(hub, token, tiny_notebook(hub, "bob", "slow.ipynb", sleep=30))
    hub.spawn("alice")
    name = user_name("alice")
    s = hub.sessions[name]
    deadline = time.monotonic() + 90
    culled = False
    while time.monotonic() < deadline and not culled:
        time.sleep(2)
        model = s.get(f"{hub.url}/hub/api/users/{name}").json()
        culled = not (model.get("servers") or {})
    assert culled, "the idle server was not culled"
    row = wait_run(hub, token, sub_id)
    assert row["status"] == "succeeded", row   # ran its 30 s through several cull rounds
