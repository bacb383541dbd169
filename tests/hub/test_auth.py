"""Authenticators: PAM with roles from Linux groups (root: a real system user and password),
and the demo password file."""
from __future__ import annotations

import asyncio
import os
import pwd
import subprocess

import pytest

from hub.auth import DemoAuthenticator, LoraPAMAuthenticator, add_demo_user, platform_groups
from hub.identity import demo_uid, hub_actor


def _login(auth, name: str, password: str):  # type: ignore[no-untyped-def]
    return asyncio.run(auth.authenticate(None, {"username": name, "password": password}))


@pytest.mark.root
def test_pam_login_gives_the_users_platform_groups_and_refuses_a_wrong_password():
    if os.geteuid() != 0:
        pytest.skip("needs root (a system user with a password)")
    import sysusers

    name = sysusers.user_name("pam")
    sysusers.ensure_user(name, ["lora-reviewers", "lora-researchers"])
    subprocess.run(["chpasswd"], input=f"{name}:pam-test-password\n", text=True, check=True)
    auth = LoraPAMAuthenticator()
    assert auth.manage_groups
    assert _login(auth, name, "pam-test-password") == {
        "name": name, "groups": ["lora-researchers", "lora-reviewers"]}
    assert _login(auth, name, "wrong") is None
    assert platform_groups("no-such-user-here") == []


def test_demo_login_checks_the_scrypt_hash_and_hands_over_groups(tmp_path):
    users = tmp_path / "demo_users.json"
    password = add_demo_user(users, "demo-rita", ["lora-reviewers"])
    add_demo_user(users, "demo-admin", ["lora-admins"], admin=True, password="admin-pass-1")
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    assert password not in users.read_text()
    auth = DemoAuthenticator(users_file=str(users))
    assert _login(auth, "demo-rita", password) == {
        "name": "demo-rita", "groups": ["lora-reviewers"], "admin": False}
    assert _login(auth, "demo-admin", "admin-pass-1")["admin"] is True
    assert _login(auth, "demo-rita", password + "x") is None
    assert _login(auth, "nobody", password) is None


def test_hub_only_demo_users_never_share_a_uid_with_anyone():
    alice = hub_actor({"name": "hubonly-alice", "groups": ["lora-researchers"]}, demo=True)
    rita = hub_actor({"name": "hubonly-rita", "groups": ["lora-reviewers"]}, demo=True)
    assert alice.uid < 0 and rita.uid < 0 and alice.uid != rita.uid
    assert alice.uid == demo_uid("hubonly-alice") and rita.groups == ("lora-reviewers",)
    assert not rita.same_person("hubonly-alice", alice.uid)
    # outside the demo a hub user must be a system user
    from lora_kernel.common.errors import PolicyRefusal

    with pytest.raises(PolicyRefusal, match="no system account"):
        hub_actor({"name": "hubonly-alice"}, demo=False)
    root = hub_actor({"name": pwd.getpwuid(os.getuid()).pw_name}, demo=False)
    assert root.uid == os.getuid() and root.source == "hub-token"
