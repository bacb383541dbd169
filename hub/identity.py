"""Who a hub request comes from: the user the hub's token names, never a header or variable.

With PAM or LDAP the hub user is a system user: the :class:`Actor` comes from the passwd and
group databases (uid, groups), exactly as for a Unix-socket peer. The demo hub (``make hub``
without root) has users that exist only in the hub; they get an Actor whose uid is negative and
derived from the name, so it can never equal a real account's uid or another demo user's, and
whose groups are their hub groups.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from lora_kernel.common.errors import PolicyRefusal
from lora_kernel.trusted.identity import Actor, actor_by_name


def demo_uid(name: str) -> int:
    """A uid for a hub-only demo user: negative, stable, distinct per name."""
    return -1 - (zlib.crc32(name.encode()) & 0x3FFFFFFF)


def hub_actor(model: Mapping[str, Any], *, demo: bool = False) -> Actor:
    """The Actor of a hub user model (``name``, ``groups``) from ``/hub/api/user``."""
    if model.get("kind", "user") != "user":
        raise PolicyRefusal(f"{model.get('kind')} {model.get('name')!r} is not a user; only "
                            "users act on runs")
    name = str(model["name"])
    actor = actor_by_name(name, source="hub-token")
    if actor is not None:
        return actor
    if not demo:
        raise PolicyRefusal(f"hub user {name!r} has no system account; fix: log in as a system "
                            "user (PAM/LDAP), or run the demo hub")
    groups = tuple(sorted(str(g) for g in model.get("groups") or ()))
    return Actor(name, demo_uid(name), -1, groups, "hub-token (demo)")
