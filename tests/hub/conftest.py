"""Fixtures: a real hub per test module (see hubtools.py)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest
from hubtools import HUB_USERS, REPO, ROOT, Hub


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    if shutil.which("node") is None or not (REPO / "hub" / "node_modules" / ".bin" /
                                             "configurable-http-proxy").exists():
        pytest.fail("configurable-http-proxy is not installed; run `make setup`")
    root = tmp_path_factory.mktemp("hubroot", numbered=True)
    if ROOT:  # the service account and users must traverse to the state and the venv
        for folder in [REPO, *REPO.parents, root, *root.parents]:
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o001)
        try:
            pwd.getpwnam("lora-svc")
        except KeyError:
            subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin", "lora-svc"],
                           check=True)
    return root


@pytest.fixture(scope="module")
def hub(hub_root):
    """A started hub (runs and audit services) with the test users; stopped after the module."""
    h = Hub(hub_root)
    h.sessions = {}
    h.add_users(HUB_USERS)
    h.start()
    yield h
    h.stop_all()

