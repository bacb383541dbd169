"""Digests used everywhere a file, a folder, a dataset or a JSON document is pinned.

Standard library only: the kernel, the training code, the verifiers and the trusted side all
hash the same way.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
# Dataset digest keys of files outside the dataset folder (``allow_outside_dataset``): the
# prefix + the absolute resolved path, so they never pass for files inside it.
OUTSIDE_PREFIX = "outside:"
# Dataset digests of regularization images (reg_data_dir) are keyed REG_PREFIX + their path in it.
REG_PREFIX = "reg:"
# ... and held-out images of an image run (validation_dir) VAL_PREFIX + their path in it.
VAL_PREFIX = "val:"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes used for every hash: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def listing_sha256(digests: dict[str, str]) -> str:
    """sha256 over the sorted lines ``<relative path>\\0<file sha256>\\n`` of a file set:
    the digest of a folder (model) or of a dataset."""
    h = hashlib.sha256()
    for rel, digest in sorted(digests.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def path_sha256(path: str | os.PathLike[str]) -> str:
    """The digest of a model (or any input): a file's sha256, or for a folder
    :func:`listing_sha256` over every file in it. ``FileNotFoundError`` when it is missing."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise FileNotFoundError(str(p))
    return listing_sha256({f.relative_to(p).as_posix(): sha256_file(f)
                           for f in sorted(p.rglob("*")) if f.is_file()})


def stat_key(path: str | os.PathLike[str]) -> str:
    """A fingerprint of what :func:`path_sha256` would read, from ``stat`` alone: the sha256
    of the canonical JSON of the real path and, for each file (a folder: every file in it,
    sorted), its relative path, real path, device, inode, size, ``mtime_ns`` and ``ctime_ns``.

    Any change of a file's bytes through the filesystem moves its ``ctime_ns`` (which a user
    cannot set), a replaced file its inode, so equal keys mean "the same files, unchanged"
    (the key of the base-model digest cache, :mod:`lora_kernel.trusted.hashcache`).
    ``FileNotFoundError`` when the path is missing.
    """
    p = Path(path)
    real = os.path.realpath(p)
    if p.is_file():
        files = [(".", p)]
    elif p.is_dir():
        files = [(f.relative_to(p).as_posix(), f) for f in sorted(p.rglob("*")) if f.is_file()]
    else:
        raise FileNotFoundError(str(p))
    rows = []
    for rel, f in files:
        st = os.stat(f)
        rows.append([rel, os.path.realpath(f), st.st_dev, st.st_ino, st.st_size,
                     st.st_mtime_ns, st.st_ctime_ns])
    return sha256_bytes(canonical_json({"path": real, "files": rows}))
