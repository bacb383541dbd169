"""hub/demo.py (``make hub``): the system users it (and the root tests) make, as they are asked
for. Ctrl-C of ``make hub`` stopping everything it started is checked by the first-hour browser
test (tests/hub/test_browser.py::test_the_first_hour_of_a_new_team)."""
from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess

import pytest
import sysusers

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
