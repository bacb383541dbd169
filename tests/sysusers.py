"""System users and groups for root-only tests: made fresh for each test session, removed after.

A test that needs a Linux user never relies on one left by an earlier run or another test: the
users it asks for are named ``<prefix><short>`` with a prefix unique to the session
(``$LORA_TEST_USER_PREFIX`` when set, e.g. by ``.ci/run``, else ``lt<4 hex>-`` chosen at
import and exported so that helper processes agree), created with exactly the groups asked for
(set, not added) and a 0700 home, and removed (home included) by :func:`cleanup` at the end of
the session. Platform groups named by ``policies/`` (``lora-reviewers``...) cannot be renamed:
they are created if missing, and removed at the end only when this session created them and
no member is left.

Used by ``conftest.py`` (``system_users``), ``hub/hubtools.py`` and ``bench/hub_load.py``.
"""
from __future__ import annotations

import grp
import os
import pwd
import secrets
import signal
import subprocess
import time

PREFIX = os.environ.setdefault("LORA_TEST_USER_PREFIX", f"lt{secrets.token_hex(2)}-")
_made_users: list[str] = []
_made_groups: list[str] = []


def user_name(short: str) -> str:
    """The system name of the session's test user ``short`` (``alice`` -> ``lt1a2b-alice``)."""
    return f"{PREFIX}{short}"


def service_user() -> str:
    """The session's service account (owns test state directories, like ``lora-svc``)."""
    return user_name("svc")


def ensure_user(name: str, groups: list[str] | tuple[str, ...] = (), *,
                system: bool = False) -> pwd.struct_passwd:
    """Make ``name`` exist with exactly ``groups`` (through :func:`hub.demo.ensure_system_user`,
    the code ``make hub`` uses) and a 0700 home; remember what was made for :func:`cleanup`."""
    from hub.demo import ensure_system_user

    if not name.startswith(PREFIX):
        raise ValueError(f"test user {name!r} lacks the session prefix {PREFIX!r}")
    for group in groups:
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True)
            _made_groups.append(group)
    if ensure_system_user(name, list(groups), system=system):
        _made_users.append(name)
    entry = pwd.getpwnam(name)
    if not system:
        os.chmod(entry.pw_dir, 0o700)
    return entry


def _kill_processes_of(uid: int) -> None:
    """SIGKILL every process of ``uid`` (``userdel`` refuses a user with running processes)."""
    import psutil

    for _ in range(20):
        procs = [p for p in psutil.process_iter(["uids"])
                 if p.info["uids"] is not None and p.info["uids"].real == uid]
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        time.sleep(0.1)


def cleanup() -> list[str]:
    """Remove the users (with their homes) and groups this process made; returns the names
    removed. Groups are removed only when no member is left (another session may use them)."""
    removed = []
    for name in reversed(_made_users):
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        _kill_processes_of(uid)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        removed.append(name)
    _made_users.clear()
    for group in reversed(_made_groups):
        try:
            members = grp.getgrnam(group).gr_mem
        except KeyError:
            continue
        if not members:
            subprocess.run(["groupdel", group], capture_output=True)
            removed.append(group)
    _made_groups.clear()
    return removed
