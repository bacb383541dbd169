"""The base-model digest cache: hash each base model once, not on every ``lora run``.

Hashing a multi-GB base model is most of a run's fixed cost outside training. The cache maps
(the requesting account's uid, :func:`lora_kernel.common.digests.stat_key` of the model) to
its sha256 and lives in the STATE directory (``<state>/cache/model_sha256.json``), which only
the runner writes; never in the user-writable working home.

Design: the pin step runs as the user (service mode: their uid), so it can stat and read the
model but not the state directory, and the runner (trusted side) can read the state directory
but maybe not the model. So the runner reads this user's entries and passes them to the pin
child in its spec (``model_digests``); the child computes the model's stat key, and uses a
digest from the spec only when the key matches exactly (real path, device, inode, size,
mtime_ns, ctime_ns of every file), otherwise hashes in full. It answers the key it saw before
and after hashing; the runner stores a new entry only when both agree (nothing changed while
it was read). Entries are per uid: one user's pin child (which that user could tamper with, as
they could lie about any digest of their own run) cannot put a digest into another user's
run. ``lora audit verify --inputs`` never reads the cache: it re-hashes in full.

Any problem reading or writing the cache is ignored: it only saves time.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.paths import state_dir

MAX_ENTRIES = 512
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def cache_path(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/cache/model_sha256.json``."""
    return state_dir(state) / "cache" / "model_sha256.json"


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items()
            if isinstance(k, str) and isinstance(v, dict)
            and isinstance(v.get("sha256"), str) and _HEX64.match(v["sha256"])}


def lookup(uid: int, state: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """This uid's entries: stat key -> sha256 (empty when there is no cache)."""
    prefix = f"{uid}:"
    return {k[len(prefix):]: v["sha256"] for k, v in _load(cache_path(state)).items()
            if k.startswith(prefix)}


def store(uid: int, key: str, sha256: str,
          state: str | os.PathLike[str] | None = None) -> None:
    """Remember ``key -> sha256`` for ``uid`` (atomic replace; the oldest entries beyond
    :data:`MAX_ENTRIES` are dropped). Errors are ignored."""
    if not (_HEX64.match(key) and _HEX64.match(sha256)):
        return
    path = cache_path(state)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        entries = _load(path)
        entries[f"{uid}:{key}"] = {"sha256": sha256, "stored": time.time()}
        if len(entries) > MAX_ENTRIES:
            keep = sorted(entries.items(), key=lambda kv: float(kv[1].get("stored") or 0))
            entries = dict(keep[-MAX_ENTRIES:])
        atomic_write(path, json.dumps({"version": 1, "entries": entries}), mode=0o600)
    except OSError:
        pass
