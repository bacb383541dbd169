"""One identity: the OS user (local) or the socket's peer (service); no variable changes it."""
from __future__ import annotations

import os
import pwd
import socket

from lora_kernel.trusted.identity import Actor, current_actor, peer_actor


def test_the_os_user_not_the_environment(monkeypatch):
    me = pwd.getpwuid(os.getuid()).pw_name
    assert current_actor().name == me and current_actor().source == "os"  # must work
    for var in ("USER", "LOGNAME", "LNAME", "USERNAME", "LORA_USER", "JUPYTERHUB_USER"):
        monkeypatch.setenv(var, "mallory")
    actor = current_actor()
    assert actor.name == me and actor.uid == os.getuid()


def test_the_peer_of_a_unix_socket_is_who_connected():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_actor(a)
    assert peer.uid == os.getuid() and peer.source == "peercred"
    assert peer.name == pwd.getpwuid(os.getuid()).pw_name


def test_same_person_under_another_spelling():
    alice = Actor("alice", 51000, 51000, (), "test")
    assert alice.same_person("alice") and alice.same_person("Alice")
    assert alice.same_person("alice-renamed", 51000)  # same uid recorded for the trainer
    assert not alice.same_person("bob", 52000) and not alice.same_person(None)
    me = current_actor()
    assert me.same_person(pwd.getpwuid(me.uid).pw_name.upper())
