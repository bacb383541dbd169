"""Tying a process's life to its parent's (Linux ``prctl``), for the runner's children and the
kernel of a recorded run.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (``prctl``).

    Called in a child between fork and exec (after the uid switch, which would clear it) and
    by the kernel launcher of a recorded run. ``parent``: the pid the caller expects as its
    parent; if the parent is already gone (re-parented), exit at once.
    """
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def make_undumpable() -> None:
    """Mark this process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): other processes of
    the same uid can no longer ptrace it, read its memory or ``/proc/<pid>/environ``, and it
    leaves no core dump. Called by a recorded run's kernel and executor; it stays set across
    fork (their children) until an exec of another program."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def is_dumpable() -> bool:
    """Whether this process is dumpable (see :func:`make_undumpable`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
