"""hub/demo.py (``make hub``): the system users it (and the root tests) make, as they are asked
for; Ctrl-C stops the hub with everything it started."""
from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess

import psutil
import pytest
import sysusers
from hubtools import HUB_USERS, Hub, execute, start_kernel

from hub.demo import ensure_system_user


def _groups(name: str) -> set[str]:
    return {g.gr_name for g in grp.getgrall() if name in g.gr_mem}


@pytest.fixture
def fresh_name(request):
    if os.geteuid() != 0:
        pytest.skip("needs root (system users)")
    name = sysusers.user_name(f"demo{request.node.name[-6:].replace('_', '')}")
    yield name
    subprocess.run(["userdel", "--remove", name], capture_output=True)


@pytest.mark.root
def test_groups_are_set_not_added_and_a_new_home_is_private(fresh_name):
    a, b = sysusers.user_name("grp-a"), sysusers.user_name("grp-b")
    sysusers.ensure_user(sysusers.user_name("grp-owner"), [a, b])  # makes both groups
    assert ensure_system_user(fresh_name, [a]) is True
    home = pwd.getpwnam(fresh_name).pw_dir
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700  # not Debian's 0755
    assert _groups(fresh_name) == {a}
    # a user left by an earlier run with other groups ends up with exactly the groups asked for
    assert ensure_system_user(fresh_name, [b]) is False
    assert _groups(fresh_name) == {b}
    assert ensure_system_user(fresh_name, []) is False
    assert _groups(fresh_name) == set()


@pytest.mark.root
def test_an_existing_open_home_is_tightened(fresh_name):
    ensure_system_user(fresh_name, [])
    home = pwd.getpwnam(fresh_name).pw_dir
    os.chmod(home, 0o755)
    ensure_system_user(fresh_name, [])
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def _tree(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.hub
@pytest.mark.slow
def test_ctrl_c_of_make_hub_leaves_no_process_behind(hub_root):
    """``make hub`` started (it fills the shared store with the demo models and datasets, which
    a new user's studio lists), a user's server and kernel up; Ctrl-C (SIGINT to the
    foreground process group) stops the hub, the proxy, both services, the server and the
    kernel, with no traceback."""
    shared = hub_root / "make-hub-shared"
    h = Hub(hub_root / "make-hub", env={"LORA_SHARED_STORE": str(shared)})
    h.sessions = {}
    h.add_users({"alice": HUB_USERS["alice"]})
    h.start(make_hub=True, timeout=180)  # the first start fills the shared store
    try:
        s = h.spawn("alice")
        kernel_id = start_kernel(h, s)
        # day one: alice's studio lists the shared demo models and datasets
        listed = execute(h, s, kernel_id, "from lora_kernel.studio import list_datasets, "
                         "list_models\nprint([str(p) for p in list_models('image') + "
                         "list_models('text') + list_datasets('image')])")
        assert listed["status"] == "ok", listed
        for part in ("models/tiny-sd", "models/tiny-llama", "datasets/image"):
            assert str(shared / part) in listed["stdout"], listed
        everything = _tree(h.proc.pid)  # hub.demo, the hub, proxy, services, server, kernel
        kernels = [p for p in everything if "ipykernel" in " ".join(psutil.Process(p).cmdline())
                   or "lora_kernel" in " ".join(psutil.Process(p).cmdline())]
        assert len(everything) >= 6 and kernels, _alive(everything)
        os.killpg(h.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert h.proc.wait(timeout=120) == 0, h.log_tail()
        assert _alive(everything) == [], h.log_tail()
        log = h.log_path.read_text(errors="replace")
        assert "nothing left running" in log, log[-3000:]
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-5000:]
    finally:
        h.proc = None if h.proc is None or h.proc.poll() is not None else h.proc
        h.stop_all()
