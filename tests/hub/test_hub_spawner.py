"""The GPU spawner in a real hub: servers and kernels as the user, only the lora kernel, the
GPU pool across a hub restart, quotas."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import sys
from pathlib import Path

import pytest
from hubtools import (
    HUB_USERS,
    REPO,
    ROOT,
    Hub,
    execute,
    hub_xsrf,
    server_procs,
    start_kernel,
    user_name,
)

pytestmark = [pytest.mark.hub, pytest.mark.slow]


def expected_uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid if ROOT else os.getuid()


def test_server_and_kernel_run_as_the_user_with_only_the_lora_kernel(hub):
    s = hub.spawn("alice")
    name = user_name("alice")
    procs = server_procs(hub.env["LORA_HUB_API_PORT"], name)
    assert procs and {p.uids().real for p in procs} == {expected_uid(name)}
    if ROOT:  # `firewall: auto` as root with nft: the hub applied the rules, alice is filtered
        import subprocess

        live = subprocess.run(["nft", "list", "set", "inet", "lora_enclave", "lora_users"],
                              capture_output=True, text=True)
        assert live.returncode == 0 and str(expected_uid(name)) in live.stdout, live
        assert "egress firewall: required" in hub.log_path.read_text()

    # only lora is offered, and any other name is refused through the REST API
    specs = hub.server_api(s, "GET", "kernelspecs").json()
    assert list(specs["kernelspecs"]) == ["lora"] and specs["default"] == "lora"
    refused = hub.server_api(s, "POST", "kernels", json={"name": "python3"})
    assert refused.status_code == 403 and "not allowed" in refused.text
    session = hub.server_api(s, "POST", "sessions", json={
        "path": "x.ipynb", "type": "notebook", "kernel": {"name": "python3"}})
    # jupyter_server's sessions handler wraps the refusal (500), but it is the same refusal
    assert session.status_code >= 400 and "not allowed" in session.text
    assert hub.server_api(s, "GET", "kernels").json() == []      # nothing was started
    kernel_id = start_kernel(hub, s, "lora")

    out = execute(hub, s, kernel_id, "import os, json; print(json.dumps({k: os.environ.get(k) "
                  "for k in ('LORA_HOME', 'LORA_STATE', 'CUDA_VISIBLE_DEVICES', "
                  "'HF_HUB_OFFLINE', 'LORA_AUDIT_URL')})); print(os.getuid())")
    assert out["status"] == "ok", out
    env_line, uid_line = out["stdout"].strip().splitlines()[-2:]
    env = json.loads(env_line)
    assert int(uid_line) == expected_uid(name)
    assert env["LORA_STATE"] is None                      # never the state directory
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["HF_HUB_OFFLINE"] == "1"
    assert env["LORA_HOME"].endswith("/lora") if ROOT else name in env["LORA_HOME"]
    assert env["LORA_AUDIT_URL"].endswith("/services/lora-audit/api/events")

    # a shell works in the guarded kernel, with the platform's `lora` first on PATH
    sh = execute(hub, s, kernel_id, "!echo shell-ok\n!command -v lora\n!lora --help")
    assert sh["status"] == "ok", sh
    lines = sh["stdout"].split()
    assert "shell-ok" in lines and str(Path(sys.executable).parent / "lora") in lines, sh
    assert "demo-assets" in sh["stdout"]  # `lora --help` ran

    # the training notebooks are in the user's home, ready to open
    contents = hub.server_api(s, "GET", "contents/notebooks").json()
    assert "train_image_lora.ipynb" in {c["name"] for c in contents["content"]}


@pytest.mark.root
def test_a_user_cannot_read_another_users_working_home(hub):
    if not ROOT:
        pytest.skip("needs root (system users)")
    # bob's working home exists already, open to all (as `mkdir -p` under umask 022 makes it,
    # e.g. by a run before his first login): his spawn must close it, not keep it
    entry = pwd.getpwnam(user_name("bob"))
    bob_home = Path(entry.pw_dir) / "lora"
    hub.stop_server(user_name("bob"))  # (if running) the next spawn is the one under test
    bob_home.mkdir(exist_ok=True)
    os.chown(bob_home, entry.pw_uid, entry.pw_gid)
    os.chmod(bob_home, 0o755)
    bob = hub.spawn("bob")
    assert stat.S_IMODE(bob_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(entry.pw_dir).stat().st_mode) == 0o700
    bob_kernel = start_kernel(hub, bob)
    wrote = execute(hub, bob, bob_kernel, "import os; p = os.path.join(os.environ['LORA_HOME'],"
                    " 'secret.txt'); open(p, 'w').write('bob'); print(p)")
    assert wrote["status"] == "ok", wrote
    secret = wrote["stdout"].strip().splitlines()[-1]

    alice = hub.spawn("alice")
    kernel = start_kernel(hub, alice)
    tried = execute(hub, alice, kernel, f"open({secret!r}).read()")
    assert tried["ename"] == "PermissionError", tried
    own = execute(hub, alice, kernel, "import os; open(os.path.join(os.environ['LORA_HOME'], "
                  "'mine.txt'), 'w').write('a'); print('ok')")
    assert own["status"] == "ok" and "ok" in own["stdout"]


@pytest.fixture(scope="module")
def gpu_hub(tmp_path_factory, hub_root):
    """A hub whose policy lists two GPUs, one per server by default, two for engineers."""
    policies = hub_root / "policies-gpu"
    shutil.copytree(REPO / "policies", policies)
    text = (policies / "hub.yaml").read_text().replace("  devices: []", '  devices: ["0", "1"]')
    (policies / "hub.yaml").write_text(text)
    os.chmod(policies, 0o755)
    h = Hub(hub_root / "gpu", services="none", env={"LORA_POLICIES": str(policies)})
    h.sessions = {}
    h.add_users(HUB_USERS)
    h.start()
    yield h
    h.stop_all()


def pool(h: Hub) -> dict:
    path = h.state / "hub" / "gpus.json"
    return json.loads(path.read_text())["holders"] if path.exists() else {}


def visible_devices(h: Hub, name: str) -> str | None:
    procs = server_procs(h.env["LORA_HUB_API_PORT"], name)
    return procs[0].environ().get("CUDA_VISIBLE_DEVICES") if procs else None


def test_gpus_are_allocated_exclusively_and_survive_a_hub_restart(gpu_hub):
    alice, bob, rita = (user_name(u) for u in ("alice", "bob", "rita"))
    gpu_hub.spawn("alice", gpus=1)
    gpu_hub.spawn("bob", gpus=1)
    assert visible_devices(gpu_hub, alice) == "0" and visible_devices(gpu_hub, bob) == "1"
    assert pool(gpu_hub) == {f"server:{alice}/": ["0"], f"server:{bob}/": ["1"]}

    # above the quota: refused; the pool is unchanged
    s = gpu_hub.login("rita")
    r = s.post(f"{gpu_hub.url}/hub/spawn/{rita}", data={"gpus": "2",
                                                        "_xsrf": hub_xsrf(s)})
    assert r.status_code == 403 and "your quota is 1" in r.text
    gpu_hub.restart()                                   # servers keep running
    assert pool(gpu_hub) == {f"server:{alice}/": ["0"], f"server:{bob}/": ["1"]}
    port = gpu_hub.env["LORA_HUB_API_PORT"]
    assert server_procs(port, alice) and server_procs(port, bob)

    # the pool is full: a third server cannot have a GPU, but may start on the CPU
    gpu_hub.sessions.pop(rita, None)
    s = gpu_hub.login("rita")
    r = s.post(f"{gpu_hub.url}/hub/spawn/{rita}", data={"gpus": "1",
                                                        "_xsrf": hub_xsrf(s)})
    assert r.status_code == 403 and "0 free of 2" in r.text
    gpu_hub.spawn("rita", gpus=0)
    assert visible_devices(gpu_hub, rita) == ""

    # a stopped server's GPU goes back to the pool and to the next user
    gpu_hub.login("alice")
    gpu_hub.stop_server(alice)
    assert f"server:{alice}/" not in pool(gpu_hub)
    gpu_hub.stop_server(rita)
    gpu_hub.spawn("rita", gpus=1)
    assert visible_devices(gpu_hub, rita) == "0"


@pytest.mark.root
def test_firewall_required_refuses_a_server_without_the_rules(hub_root):
    """`firewall: required` in policies/egress.yaml and no `inet lora_enclave` table: the
    spawner refuses the user's server (the must-work twin is every other spawn here, with the
    repository's `firewall: auto`, under which the hub applies the rules itself)."""
    if not ROOT:
        pytest.skip("needs root (nft)")
    import subprocess

    # whatever an earlier hub applied (`auto`), the refusal needs the table absent
    subprocess.run(["nft", "delete", "table", "inet", "lora_enclave"], capture_output=True)
    policies = hub_root / "policies-fw"
    shutil.copytree(REPO / "policies", policies)
    egress = policies / "egress.yaml"
    text = egress.read_text()
    assert "\nfirewall: auto\n" in text
    egress.write_text(text.replace("\nfirewall: auto\n", "\nfirewall: required\n"))
    os.chmod(policies, 0o755)
    h = Hub(hub_root / "fw", services="none", env={"LORA_POLICIES": str(policies)})
    h.sessions = {}
    h.add_users(HUB_USERS)
    h.start()
    try:
        s = h.login("bob")
        name = user_name("bob")
        r = s.post(f"{h.url}/hub/spawn/{name}", data={"gpus": "0", "_xsrf": hub_xsrf(s)})
        assert r.status_code == 403 and "lora firewall" in r.text, r.text[-1500:]
        assert not server_procs(h.env["LORA_HUB_API_PORT"], name)
    finally:
        h.stop_all()
