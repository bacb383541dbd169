"""Who acts: one answer for the trainer, the reviewer, the publisher and the audit trail.

* local mode: the OS user of this process (its real uid, looked up in the passwd database);
* service mode: the caller the runner authenticated: the peer uid of its Unix socket
  (``SO_PEERCRED``, set by the kernel, not by the caller), later the hub's token.

Never an environment variable: ``USER``, ``LOGNAME``, ``LORA_USER`` and ``JUPYTERHUB_USER`` are
set by whoever starts the process and prove nothing (:func:`getpass.getuser` reads them first,
which is why it is not used here).

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from lora_kernel.common.errors import ConfigError


@dataclass(frozen=True)
class Actor:
    """An authenticated user: canonical login ``name`` (from the passwd entry of ``uid``),
    ``uid``, primary ``gid``, every group name, and how it was established (``source``)."""

    name: str
    uid: int
    gid: int
    groups: tuple[str, ...]
    source: str

    def same_person(self, name: str | None, uid: int | None = None) -> bool:
        """Whether a recorded identity (a trainer's ``name`` and, when recorded, ``uid``) is
        this actor, under any spelling: same uid, or the same passwd entry, or the same name
        ignoring case."""
        if uid is not None and uid == self.uid:
            return True
        if not name:
            return False
        if name.casefold() == self.name.casefold():
            return True
        try:
            return pwd.getpwnam(name).pw_uid == self.uid
        except KeyError:
            return False


def actor_for_uid(uid: int, source: str) -> Actor:
    """The :class:`Actor` of ``uid`` from the passwd and group databases."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise ConfigError(f"uid {uid} has no passwd entry; fix: run as a named system user") \
            from None
    groups = {g.gr_name for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    try:
        groups.add(grp.getgrgid(pw.pw_gid).gr_name)
    except KeyError:
        pass
    return Actor(pw.pw_name, uid, pw.pw_gid, tuple(sorted(groups)), source)


def actor_by_name(name: str, source: str = "recorded") -> Actor | None:
    """The :class:`Actor` of a login name, or None when the passwd database has no such user."""
    try:
        return actor_for_uid(pwd.getpwnam(name).pw_uid, source)
    except (KeyError, ConfigError):
        return None


def current_actor() -> Actor:
    """The OS user of this process (local mode, and the service account itself)."""
    return actor_for_uid(os.getuid(), "os")


def peer_actor(conn: socket.socket) -> Actor:
    """The user at the other end of a Unix stream socket, from ``SO_PEERCRED`` (service mode)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return actor_for_uid(uid, "peercred")


def in_group(actor: Actor, group: str | None) -> bool:
    """Whether ``actor`` belongs to the OS group ``group`` (as a member or primary group)."""
    return bool(group) and group in actor.groups
