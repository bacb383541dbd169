"""Where things live: the user's working home and the trusted state directory.

* **Working home** (``--home``, ``$LORA_HOME``, default ``./lora_home``): the user's own
  datasets, models, caches, training outputs, kernel logs and run work folders. The kernel and
  user code may read and write it; nothing an auditor relies on lives there.
* **State directory** (``--state``, default :func:`default_state_dir`): run records, the
  ledger, its signing key and the pinned fingerprint. Written only by the trusted side. In
  *service* mode it is owned by the service account (mode 0700) and its location comes from
  the runner's own command line (root's configuration), never from a user's environment; in
  *local* mode (one person, one account) ``$LORA_STATE`` may choose it, and records are only as
  trustworthy as that account. The kernel's environment never names it.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lora_kernel.common.errors import ConfigError

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SERVICE_STATE_DIR = Path("/var/lib/lora-enclave")
RUNNER_SOCKET = Path("/run/lora-enclave/runner.sock")


def lora_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Return the working home: ``home`` if given, else ``$LORA_HOME``, else ``./lora_home``.

    The default is relative to the current directory so that ``make demo`` from the
    repository root writes into the git-ignored ``lora_home/`` folder.
    """
    if home is not None:
        return Path(home).expanduser().resolve()
    env = os.environ.get("LORA_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "lora_home").resolve()


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` a folder only its owner can use, as the account that will work in it.

    Missing: created mode 0700 (parents as :meth:`Path.mkdir` makes them). Present, owned by
    this account and open to group or others: tightened to 0700 (a working home made 0755 by
    an earlier ``mkdir`` under umask 022 let every local user read another's data and
    notebooks). Present, open to others and owned by another account: refused with a
    :class:`ConfigError` naming it, since this account cannot close it. Returns the path.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError("the working home is a file, not a folder; fix: use a folder",
                          file=folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_mode & 0o077:
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"the working home is mode {st.st_mode & 0o777:04o} and owned by uid "
                f"{st.st_uid}, not by this account ({os.geteuid()}): other users can read it; "
                f"fix: its owner runs `chmod 700 {folder}`", file=folder)
        os.chmod(folder, 0o700)
    return folder


def default_state_dir() -> Path:
    """The local-mode state directory: ``$LORA_STATE``, else
    ``$XDG_STATE_HOME/lora-enclave`` (``~/.local/state/lora-enclave``)."""
    env = os.environ.get("LORA_STATE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return (Path(xdg).expanduser() / "lora-enclave").resolve()


def state_dir(state: str | os.PathLike[str] | None = None) -> Path:
    """``state`` if given (``--state``), else :func:`default_state_dir`."""
    if state is not None:
        return Path(state).expanduser().resolve()
    return default_state_dir()


def runs_dir(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/runs``: sealed records (``.staging/`` and ``.active/`` inside are the runner's)."""
    return state_dir(state) / "runs"


def ledger_path(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/ledger/ledger.sqlite``."""
    return state_dir(state) / "ledger" / "ledger.sqlite"


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe folder name, else raise :class:`ConfigError`."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r}: use letters, digits, '.', '_', '-'; "
                          "fix: pick a run id from `lora audit list`", key="RUN")
    return run_id
