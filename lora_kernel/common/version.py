"""Package version and build provenance, stamped into every artifact we write.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Return the git commit of the source tree this package runs from, or None.

    Only a development checkout has one; an installed wheel reports None.
    """
    if not (_REPO / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def version_info() -> dict[str, Any]:
    """Version and commit of this package, as recorded in adapters, manifests and ledger."""
    return {"lora_enclave": __version__, "git_commit": git_commit()}
