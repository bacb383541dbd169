"""Process control for runs: who the untrusted children run as, how they die with the runner,
and how they are stopped. A plain helper module (no papermill, no torch).

* :class:`RunAs` — the user a run's children (pin, executor and kernel, collector) run as: the
  requesting user's uid, primary gid and groups in service mode; ``None`` (this process's own
  user) in local mode.
* :class:`Privileges` — in service mode the runner is started as root and works with the
  *effective* uid of the service account, so that every file it writes (records, ledger, key)
  belongs to that account; it takes root back only to start a child as another user or to
  signal that user's processes (:meth:`Privileges.elevated`).
* Every child gets ``PR_SET_PDEATHSIG(SIGKILL)`` and its own session: when the runner dies —
  ``kill -9 lora run``, SIGHUP of a closed terminal, the OOM killer — the kernel launcher does
  the same for the kernel (:func:`die_with_parent`), so no training goes on that no record
  knows about; whatever is left is found by ``LORA_RUN_ID`` (:func:`kill_run_processes`).

Runs as: the runner (the service account, taking root back only to start a child as another user
or signal that user's processes).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lora_kernel.common.process import die_with_parent

KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class RunAs:
    """The OS user a run's children run as (service mode), with the groups that make Linux
    permissions on their data hold; :meth:`local` (all None) means this process's user."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    name: str | None = None
    home_dir: str | None = None

    @classmethod
    def local(cls) -> RunAs:
        """Children run as this process's own user (local mode)."""
        return cls()

    @classmethod
    def for_user(cls, name: str) -> RunAs:
        """The passwd user ``name`` with every group it belongs to."""
        pw = pwd.getpwnam(name)
        return cls(pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)), name,
                   pw.pw_dir)

    @property
    def switches(self) -> bool:
        """Whether starting a child means a uid switch."""
        return self.uid is not None and self.uid != os.geteuid()

    def popen_args(self) -> dict[str, Any]:
        """``subprocess.Popen`` keyword arguments for the uid/gid/groups switch."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


@dataclass
class Privileges:
    """Effective-uid switching of a runner started as root (service mode).

    ``service_uid``/``service_gid`` None means no switching at all (local mode, or a runner
    started as the service account itself, which then cannot start children as other users).
    """

    service_uid: int | None = None
    service_gid: int | None = None
    _dropped: bool = field(default=False, repr=False)

    @classmethod
    def for_service_account(cls, name: str) -> Privileges:
        """Privileges of a root runner that writes as the service account ``name``."""
        pw = pwd.getpwnam(name)
        return cls(pw.pw_uid, pw.pw_gid)

    @property
    def active(self) -> bool:
        """Whether this runner switches between root and the service account."""
        return self.service_uid is not None

    def drop(self) -> None:
        """Work as the service account from now on (effective uid/gid; root stays saved)."""
        if not self.active or self._dropped:
            return
        os.setegid(int(self.service_gid))  # type: ignore[arg-type]
        os.seteuid(int(self.service_uid))  # type: ignore[arg-type]
        self._dropped = True

    @contextlib.contextmanager
    def elevated(self) -> Iterator[None]:
        """Root for the body (start a child as another user, signal their processes)."""
        if not self.active or not self._dropped:
            yield
            return
        os.seteuid(0)
        os.setegid(0)
        try:
            yield
        finally:
            os.setegid(int(self.service_gid))  # type: ignore[arg-type]
            os.seteuid(int(self.service_uid))  # type: ignore[arg-type]


def spawn(argv: Sequence[str], *, run_as: RunAs, privileges: Privileges, env: dict[str, str],
          cwd: str | None = None, stdin: int | IO[Any] | None = subprocess.DEVNULL,
          stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None
          ) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``run_as`` in a session of its own, dying with this process."""
    me = os.getpid()
    with privileges.elevated():
        return subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                                stderr=stderr, start_new_session=True,
                                preexec_fn=lambda: die_with_parent(me),
                                **run_as.popen_args())


def child_cwd(home: Path, privileges: Privileges) -> str:
    """Where a child started as the user begins: its working home when that is a folder, else
    ``/``. Looked at with root's rights (as the child's ``chdir`` is done, before it becomes
    the user): a user's home is mode 0700, which the service account may not enter."""
    with privileges.elevated():
        return str(home) if home.is_dir() else "/"


def stop(proc: subprocess.Popen[bytes], privileges: Privileges) -> None:
    """SIGTERM the child's process group, then SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            with privileges.elevated():
                os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_run_processes(run_id: str, privileges: Privileges) -> list[int]:
    """SIGKILL every process whose environment has ``LORA_RUN_ID=run_id`` (the kernel, even
    after its parent died and it was re-parented). Processes this runner may not inspect are
    skipped (``psutil.AccessDenied``). Returns their pids."""
    import psutil

    found = []
    me = os.getpid()
    with privileges.elevated():
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            try:
                try:
                    ours = proc.environ().get("LORA_RUN_ID") == run_id
                except psutil.AccessDenied:  # a recorded run's kernel is not dumpable: its
                    # connection file lies in <work>/<run_id>/.env (steps.cleanenv)
                    ours = any(f"/{run_id}/.env/" in arg for arg in proc.cmdline())
                if ours:
                    proc.kill()
                    found.append(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        psutil.wait_procs(found, timeout=KILL_GRACE_S)
    return [p.pid for p in found]
