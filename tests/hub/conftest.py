"""Fixtures: a real hub per test module (see hubtools.py)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hubtools import HUB_USERS, REPO, ROOT, Hub


@pytest.fixture(scope="module")
def hub_root():
    """A folder for the module's hubs, outside pytest's 0700 temp root (the service account and
    the users must reach the state and their files), removed afterwards."""
    if shutil.which("node") is None or not (REPO / "hub" / "node_modules" / ".bin" /
                                             "configurable-http-proxy").exists():
        pytest.fail("configurable-http-proxy is not installed; run `make setup`")
    root = Path(tempfile.mkdtemp(prefix="lora-hub-test-"))
    os.chmod(root, 0o755)
    if ROOT:  # the service account and users must traverse to the state and the venv
        for folder in [REPO, *REPO.parents]:
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o001)
        try:
            pwd.getpwnam("lora-svc")
        except KeyError:
            subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin", "lora-svc"],
                           check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hub(hub_root):
    """A started hub (runs and audit services) with the test users; stopped after the module."""
    h = Hub(hub_root)
    h.sessions = {}
    h.add_users(HUB_USERS)
    h.start()
    yield h
    h.stop_all()

