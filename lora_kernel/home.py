"""The working home: where demo assets, runs, logs and the ledger live."""
from __future__ import annotations

import os
from pathlib import Path


def lora_home(home: str | os.PathLike | None = None) -> Path:
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
