"""Authenticators: PAM for production (roles from Linux groups), a password file for the demo.

Both hand JupyterHub the user's platform groups (``manage_groups``): the Linux groups named in
``policies/hub.yaml`` ``roles``; ``jupyterhub_config.py`` gives each group its role. LDAP is
``ldapauthenticator.LDAPAuthenticator`` with the same group names (docs/hub.md).

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator, PAMAuthenticator
from traitlets import Bool, Unicode, default

from lora_kernel.common.atomic import atomic_write
from lora_kernel.trusted.identity import actor_by_name

from .settings import load_settings


def platform_groups(name: str) -> list[str]:
    """The user's Linux groups that ``policies/hub.yaml`` gives a role."""
    actor = actor_by_name(name)
    if actor is None:
        return []
    roles = load_settings().roles
    return sorted(g for g in actor.groups if g in roles)


class LoraPAMAuthenticator(PAMAuthenticator):
    """PAM login of system users; their platform groups become hub groups at each login."""

    @default("manage_groups")
    def _manage_groups(self) -> bool:
        return True

    async def authenticate(self, handler: Any, data: dict[str, str]) -> dict[str, Any] | None:
        name = await super().authenticate(handler, data)
        if not name:
            return None
        return {"name": name, "groups": platform_groups(name)}


# -- demo -------------------------------------------------------------------------------------
def _hash(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode(), salt=salt, n=2 ** 14, r=8, p=1).hex()


def add_demo_user(path: Path, name: str, groups: list[str], admin: bool = False,
                  password: str | None = None) -> str:
    """Add (or reset) a demo user in the password file; returns the password."""
    users = json.loads(path.read_text()) if path.exists() else {}
    password = password or secrets.token_urlsafe(9)
    salt = secrets.token_bytes(16)
    users[name] = {"salt": salt.hex(), "scrypt": _hash(password, salt), "groups": groups,
                   "admin": admin}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(users, indent=1, sort_keys=True), mode=0o600)
    return password


class DemoAuthenticator(Authenticator):
    """Users and scrypt-hashed passwords from a file ``make hub`` writes (mode 0600), with the
    platform groups each demo user stands for."""

    users_file = Unicode(help="JSON file of demo users (hub/demo.py writes it).").tag(config=True)

    @default("manage_groups")
    def _manage_groups(self) -> bool:
        return True

    allow_all = Bool(True).tag(config=True)

    def _users(self) -> dict[str, Any]:
        try:
            users: dict[str, Any] = json.loads(Path(self.users_file).read_text())
        except (OSError, ValueError):
            self.log.error("demo users file %s is missing or unreadable; run `make hub`",
                           self.users_file)
            return {}
        return users

    async def authenticate(self, handler: Any, data: dict[str, str]) -> dict[str, Any] | None:
        entry = self._users().get(data.get("username", ""))
        if not entry:
            return None
        digest = _hash(data.get("password", ""), bytes.fromhex(entry["salt"]))
        if not hmac.compare_digest(digest, entry["scrypt"]):
            return None
        return {"name": data["username"], "groups": list(entry.get("groups", [])),
                "admin": bool(entry.get("admin"))}
