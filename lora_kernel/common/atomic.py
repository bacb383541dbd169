"""Atomic file writes: a temporary file beside the target, then one ``os.replace``.

Neutral code, run by whichever account writes the file (the user's kernel and steps, the
service account's runner and hub). A reader sees the old file or the new one, never a half
written one; a writer that fails leaves no temporary file behind. The temporary file is
created like any other file (its mode follows the umask) unless ``mode`` says otherwise, so a
file another account must read (a Job's ``pinned.json``) stays readable.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary name in ``path``'s folder (same filesystem) for the caller to write
    (a library that takes a file name: safetensors, PIL); on a clean exit it replaces ``path``
    in one ``os.replace`` (after ``chmod mode`` when given); on an error it is removed."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None,
                 encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` atomically
    (:func:`atomic_path`); return ``path``. The temporary file is created exclusively."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
    return Path(path)
