"""What crosses from the user's side into a record: the work folder's evidence.

The ``collect`` child (:mod:`lora_kernel.steps.executor`, started by
:func:`lora_kernel.trusted.runseal.collect_evidence`) runs as the run's user and writes the
evidence as a tar on its stdout; :func:`extract_evidence` unpacks it into the staging
folder with the runner's own rules — plain files and folders under the names of
:data:`~lora_kernel.common.contract.COLLECTED` only, never outside the destination, never over
an existing file — so a symlink or hard link planted in a work folder never pulls the signing
key (or anything else the runner could read) into a record.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO, Any

from lora_kernel.common.contract import COLLECTED
from lora_kernel.common.timeutil import iso_time, parse_time

# How long before its recorded start a run's kernel events may be (the kernel starts while
# the pin step hashes the inputs, before ``started`` is stamped).
EVENTS_BEFORE_START = dt.timedelta(days=1)


def events_since(run: dict[str, Any]) -> str | None:
    """The time from which the kernel log is read for ``run`` (ISO), so that collecting a run
    reads the daily log files of its days, not the user's whole history; None: all."""
    try:
        return iso_time(parse_time(run["started"]) - EVENTS_BEFORE_START)
    except (KeyError, ValueError):
        return None


def open_untrusted(path: Path) -> IO[bytes]:
    """Open ``path``, a file in a folder the run's user writes (a Kubernetes Job's output
    volume), for reading: never through a symlink (``O_NOFOLLOW``), only a regular file, so
    a planted link or FIFO cannot make the trusted side read (or hang on) anything else.
    Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_untrusted(path: Path, limit: int) -> bytes | None:
    """At most the last ``limit`` bytes of ``path`` (:func:`open_untrusted`); None when it is
    missing, a link or not a regular file."""
    try:
        with open_untrusted(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                f.seek(size - limit)
            return f.read(limit)
    except OSError:
        return None


def extract_evidence_file(path: Path, dest: Path) -> list[str]:
    """:func:`extract_evidence` from a tar file the run's user wrote (:func:`open_untrusted`)."""
    try:
        stream = open_untrusted(path)
    except OSError as exc:
        return [f"the run left no readable evidence ({path.name}: {exc.strerror or exc})"]
    with stream:
        return extract_evidence(stream, dest)


def extract_evidence(stream: IO[bytes], dest: Path) -> list[str]:
    """Extract a collector's tar into ``dest``: plain files and folders under the names of
    :data:`~lora_kernel.common.contract.COLLECTED` only, never outside ``dest``, never over an
    existing file. Returns notes about refused members (the rest is kept)."""
    notes: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = Path(member.name).parts
                bad = (not parts or member.name.startswith("/") or ".." in parts
                       or parts[0] not in COLLECTED or not (member.isfile() or member.isdir()))
                if bad:
                    notes.append(f"refused {member.name!r} from the work folder (not a plain "
                                 "file under an expected name)")
                    continue
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError) as exc:
        notes.append(f"the work folder's evidence was cut short: {exc}")
    return notes
