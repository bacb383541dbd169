"""Fixtures: a real hub per test module (see hubtools.py)."""
from __future__ import annotations

import shutil

import pytest
from hubtools import HUB_USERS, Hub, make_hub_root


@pytest.fixture(scope="module")
def hub_root():
    """A folder for the module's hubs, outside pytest's 0700 temp root (the service account and
    the users must reach the state and their files), removed afterwards."""
    try:
        root = make_hub_root("lora-hub-test-")
    except RuntimeError as exc:
        pytest.fail(str(exc))
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

