"""Sealing a run record: build its manifest, make it read-only, rename it into place.

The trusted side calls, in order::

    staging = make_staging_dir(runs_dir, run_id)       # same filesystem as runs_dir
    ...  write executed.ipynb, adapter/, events.jsonl, tb/ into staging
    manifest = build_manifest(staging, ManifestContext(run_id=..., user=..., ...))
    write_manifest(staging, manifest)
    record = seal_record(staging, runs_dir, run_id)   # atomic os.rename
    Ledger(...).append_run(record)                    # lora_kernel.trusted.ledger

The manifest format itself (and its verification) is :mod:`lora_kernel.provenance.records`.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import canonical_json
from lora_kernel.common.errors import PolicyRefusal, VerificationError
from lora_kernel.common.paths import check_run_id
from lora_kernel.common.timeutil import iso_time
from lora_kernel.common.version import version_info
from lora_kernel.provenance.records import (
    BUILD_TYPE,
    MANIFEST,
    PACKAGES,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    hash_record,
    verify_record,
)


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    """CPU model and core count; GPUs from ``nvidia-smi`` (if present) or an already-imported
    torch. Never imports torch itself (the trusted side may not have it)."""
    gpus: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True)
            gpus = [line.strip() for line in res.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    elif "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpus": gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def environment_info() -> dict[str, Any]:
    """Python, platform and library versions (importlib.metadata) plus hardware."""
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "packages": _package_versions(),
            "hardware": hardware_info()}


@dataclass(frozen=True)
class ManifestContext:
    """What a manifest says besides its files' digests: the run (id, who, where, when, how it
    ended), its pinned inputs and ``extra`` (free JSON data, e.g. losses). ``started`` /
    ``ended`` are datetimes or ISO strings; ``config`` the resolved config; ``dataset_digests``
    ``{relative path: sha256}``."""

    run_id: str
    user: str
    host: str
    started: str | dt.datetime
    ended: str | dt.datetime
    status: str
    config: dict[str, Any]
    base_model_sha256: str
    dataset_version: str
    dataset_digests: dict[str, str]
    notebook_source_sha256: str
    seed: int
    egress_refusals: int
    uid: int | None = None
    extra: dict[str, Any] | None = None
    # More resolved dependencies (a derived record's source run and files).
    dependencies: tuple[dict[str, Any], ...] = ()


def build_manifest(record_dir: str | Path, context: ManifestContext | None = None, /,
                   **fields: Any) -> dict[str, Any]:
    """Build the provenance manifest of the record in ``record_dir`` (not written; see
    :func:`write_manifest`) from ``context``. Hashes every file present except
    ``manifest.json``. The keyword form (``run_id=..., user=..., ...``: the fields of
    :class:`ManifestContext`) is for hand-made records (tests, tools).
    """
    ctx = context if context is not None else ManifestContext(**fields)
    check_run_id(ctx.run_id)
    config = json.loads(canonical_json(ctx.config))  # fails early on non-JSON values
    base_uri = str(config.get("base_model", ""))
    deps = [{"name": "base_model", "uri": base_uri,
             "digest": {"sha256": ctx.base_model_sha256}},
            {"name": "dataset", "annotations": {"version": ctx.dataset_version,
                                                "files": len(ctx.dataset_digests)}}]
    deps += [{"name": f"dataset/{rel}", "digest": {"sha256": digest}}
             for rel, digest in sorted(ctx.dataset_digests.items())]
    deps.append({"name": "notebook", "digest": {"sha256": ctx.notebook_source_sha256}})
    deps += [dict(d) for d in ctx.dependencies]
    producer = version_info()
    pkg = {"name": "lora_enclave", "annotations": {"version": producer["lora_enclave"]}}
    if producer.get("git_commit"):
        pkg["digest"] = {"gitCommit": producer["git_commit"]}
    deps.append(pkg)
    return {
        "_type": STATEMENT_TYPE,
        "subject": hash_record(record_dir),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": config, "seed": int(ctx.seed),
                                       "notebook_source_sha256": ctx.notebook_source_sha256},
                "internalParameters": {"environment": environment_info()},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": "lora-enclave/runs", "version": producer},
                "metadata": {"invocationId": ctx.run_id, "startedOn": iso_time(ctx.started),
                             "finishedOn": iso_time(ctx.ended), "user": ctx.user,
                             "uid": ctx.uid, "host": ctx.host,
                             "status": ctx.status, "egressRefusals": int(ctx.egress_refusals),
                             "extra": ctx.extra or {}},
            },
        },
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes written to ``manifest.json`` (sorted keys, indented, trailing newline)."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_manifest(record_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``record_dir`` (fsynced) and return its path."""
    path = Path(record_dir) / MANIFEST
    with open(path, "wb") as fh:
        fh.write(manifest_bytes(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def make_staging_dir(runs_dir: str | Path, run_id: str) -> Path:
    """A fresh staging folder for ``run_id`` inside ``runs_dir/.staging`` (same filesystem,
    so that :func:`seal_record` can rename it into place atomically)."""
    check_run_id(run_id)
    base = Path(runs_dir) / ".staging"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{run_id}.", dir=base))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def seal_record(staging_dir: str | Path, runs_dir: str | Path, run_id: str) -> Path:
    """Move a complete, verified staging folder to ``runs_dir/run_id`` in one ``os.rename``.

    The staging folder must already hold ``manifest.json`` and verify against it; it must be on
    the same filesystem as ``runs_dir``. Files are made read-only and fsynced first, so the
    record either appears whole or not at all. Raises :class:`VerificationError` (staging does
    not verify, other filesystem) or :class:`PolicyRefusal` (a record of that id exists:
    records are immutable).
    """
    check_run_id(run_id)
    staging = Path(staging_dir)
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    target = runs / run_id
    if os.stat(staging).st_dev != os.stat(runs).st_dev:
        raise ValueError(f"staging folder {staging} is not on the filesystem of {runs}; "
                                "create it with make_staging_dir()")
    problems = verify_record(staging, run_id=run_id)
    if problems:
        raise VerificationError(f"staging folder {staging} does not verify: "
                                + "; ".join(map(str, problems)))
    if target.exists():
        raise PolicyRefusal(f"run record {target} already exists; records are immutable")
    for dirpath, _dirs, filenames in os.walk(staging):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
    _fsync_tree(staging)
    os.rename(staging, target)
    fd = os.open(runs, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target
