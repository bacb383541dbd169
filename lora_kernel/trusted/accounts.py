"""Run accounts: in service mode a recorded run's kernel runs under an account its requester
does not control, so that nothing the requester runs with their own uid can write into the
run's work folder, signal or trace its kernel, or replace its adapter before it is sealed.

The accounts are a pool of system users whose primary group is ``run_group`` of
``policies/runs.yaml`` (default ``lora-runs``; ``make hub`` / the deploy create
``lora-run0`` …). A run leases one free account for its whole life (an exclusive ``flock``
on ``<state>/runs/.accounts/<name>.lock``, released when the runner lets go or dies), so two
runs never share a uid. Its work folder is ``<work_root>/<run_id>/`` (mode 0700, owned by the
run account; ``work_root`` is root's, mode 0711), with a private home (``home/``: kernel
config, logs) and the laid-out snapshot of its pinned inputs (``inputs/``, root's, read-only).
The requester's data rights are checked when the pin step (as the requester) reads the
inputs; the run itself reads only the snapshot.

``isolation`` in the policy: ``auto`` (default: isolate when the group exists with at least
one member, else run as the requester), ``accounts`` (refuse a run when no account is free or
none exists) or ``none`` (run as the requester, as in local mode). Local mode (no root) never
isolates; the record says which (``extra.isolation``).

Runs as: the runner (the service account, root only to make the work folder and to start the
run's children as the run account).
"""
from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.common.paths import runs_dir, state_dir
from lora_kernel.common.policy import load_policy, policy_path
from lora_kernel.trusted.supervisor import Privileges, RunAs

RUNS_DEFAULTS: dict[str, Any] = {"isolation": "auto", "run_group": "lora-runs",
                                 "work_root": None}
ISOLATIONS = ("auto", "accounts", "none")


def runs_policy() -> dict[str, Any]:
    """``policies/runs.yaml`` over :data:`RUNS_DEFAULTS`, checked."""
    policy = load_policy("runs", RUNS_DEFAULTS)
    if policy["isolation"] not in ISOLATIONS:
        raise ConfigError(f"isolation must be one of {', '.join(ISOLATIONS)}, got "
                          f"{policy['isolation']!r}", file=policy_path("runs"), key="isolation")
    return policy


@dataclass(frozen=True)
class RunAccounts:
    """The pool (``names``, all with primary group ``gid``) and where run work folders go."""

    group: str
    gid: int
    names: tuple[str, ...]
    work_root: Path

    def acquire(self, state: str | os.PathLike[str] | None) -> Lease:
        """Lease a free account (non-blocking); :class:`PolicyRefusal` when all are busy."""
        folder = runs_dir(state) / ".accounts"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in self.names:
            fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            pw = pwd.getpwnam(name)
            return Lease(RunAs(pw.pw_uid, self.gid, (self.gid,), name, None), fd)
        raise PolicyRefusal(f"all {len(self.names)} run accounts of group {self.group} are busy "
                            "with other runs; fix: wait for one to end, or add accounts to the "
                            f"group (useradd --system -g {self.group} lora-runN)")


@dataclass
class Lease:
    """One leased run account (``run_as``) while its lock is held."""

    run_as: RunAs
    fd: int | None
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        if self.on_release is not None:
            self.on_release()
            self.on_release = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def run_accounts(privileges: Privileges, state: str | os.PathLike[str] | None
                 ) -> RunAccounts | None:
    """The run-account pool the policy asks for, or None (local mode, ``isolation: none``,
    or ``auto`` without a populated group). ``isolation: accounts`` without one: a
    :class:`ConfigError` naming the policy and the fix."""
    policy = runs_policy()
    if not privileges.active or policy["isolation"] == "none":
        return None
    group = str(policy["run_group"])
    try:
        gr = grp.getgrnam(group)
    except KeyError:
        gr = None
    names = tuple(sorted({p.pw_name for p in pwd.getpwall() if gr and p.pw_gid == gr.gr_gid}))
    if gr is None or not names:
        if policy["isolation"] == "accounts":
            raise ConfigError(f"isolation: accounts needs system users whose primary group is "
                              f"{group}, and there are none; fix: groupadd --system {group} && "
                              f"useradd --system --no-create-home -g {group} lora-run0",
                              file=policy_path("runs"), key="run_group")
        return None
    return RunAccounts(group, gr.gr_gid, names, inputs_root(state))


def inputs_root(state: str | os.PathLike[str] | None) -> Path:
    """``<work_root>``: where run accounts' work folders go, and, in service mode without run
    accounts, each run's laid-out snapshot (``<work_root>/<run_id>/inputs``)."""
    policy = runs_policy()
    return Path(str(policy["work_root"])) if policy["work_root"] else \
        state_dir(state).parent / f"{state_dir(state).name}-runs"


def make_work(accounts: RunAccounts, run_as: RunAs, run_id: str) -> tuple[Path, Path]:
    """Make ``<work_root>/<run_id>`` (0700, the run account's) and its private home; as root
    (the caller elevates). Returns ``(work, home)``."""
    accounts.work_root.mkdir(parents=True, exist_ok=True, mode=0o711)
    os.chown(accounts.work_root, 0, 0)
    os.chmod(accounts.work_root, 0o711)
    work = accounts.work_root / run_id
    home = work / "home"
    for folder in (work, home):
        folder.mkdir(mode=0o700)
        os.chown(folder, int(run_as.uid or 0), int(run_as.gid or 0))
    return work, home


def _chown_tree(work: Path, uid: int, gid: int) -> None:
    """``work`` and everything in it but ``inputs/`` (the laid-out snapshot: hard links to
    the store's objects, whose owner must not change) to ``uid:gid``; links not followed."""
    os.lchown(work, uid, gid)
    for dirpath, dirs, files in os.walk(work):
        if Path(dirpath) == work and "inputs" in dirs:
            dirs.remove("inputs")
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def secure_work(work: Path) -> None:
    """A failed isolated run's work folder (its checkpoints, for ``lora run --resume``), made
    root's (mode 0700): the run account goes back to the pool, and the next run leasing it
    must not be able to change the checkpoints a resume will pin. As root."""
    if work.is_dir():
        _chown_tree(work, 0, 0)
        os.chmod(work, 0o700)


def lend_work(work: Path, run_as: RunAs) -> None:
    """Give a failed isolated run's work folder to the run account of the run that resumes
    it (reads its checkpoint and laid-out snapshot at the same paths); :func:`secure_work`
    takes it back when that run ends. As root."""
    _chown_tree(work, int(run_as.uid or 0), int(run_as.gid or 0))


def remove_work(work: Path) -> None:
    """Remove a run's work folder (as root: the run account's and the runner's files)."""
    shutil.rmtree(work, ignore_errors=True)
