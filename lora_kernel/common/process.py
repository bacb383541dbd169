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
