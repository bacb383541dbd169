"""Run records: the provenance manifest, atomic sealing and re-verification.

A run record is the folder ``<home>/runs/<run_id>/`` holding ``executed.ipynb``, the adapter
files, ``events.jsonl``, ``tb/`` and ``manifest.json``. The manifest follows the shape of an
in-toto Statement carrying a SLSA provenance v1 predicate:

* ``subject`` — every file of the record except ``manifest.json``: name (relative POSIX path),
  ``digest.sha256``, and ``annotations`` (``role``: adapter | notebook | events | tensorboard |
  other, ``size``; the executed notebook also lists one digest per cell, so that verification can
  say *which* cell was edited or removed).
* ``predicate.buildDefinition`` — ``externalParameters`` (resolved config, seed, notebook source
  digest), ``internalParameters`` (python / library versions, platform, CPU/GPU) and
  ``resolvedDependencies`` (base model, every dataset file, the notebook, lora_enclave itself).
* ``predicate.runDetails`` — builder (``lora-enclave`` + version and git commit), metadata
  (run id, user, host, start/end, status, count of refused egress attempts, ``extra``).

The ledger entry of a run holds the sha256 of ``manifest.json``'s bytes, so a manifest that was
edited *and* had its file digests recomputed is still caught (:func:`verify_record` with
``expected_manifest_sha256``).

The runner calls, in order::

    staging = make_staging_dir(runs_dir, run_id)       # same filesystem as runs_dir
    ...  write executed.ipynb, adapter/, events.jsonl, tb/ into staging
    manifest = build_manifest(staging, run_id=..., user=..., ...)
    write_manifest(staging, manifest)
    record = seal_record(staging, runs_dir, run_id)   # atomic os.rename
    Ledger(home=home).append_run(record)              # lora_kernel.ledger
"""
from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_kernel.data import sha256_file
from lora_kernel.errors import PolicyRefusal, VerificationError
from lora_kernel.version import version_info

MANIFEST = "manifest.json"
NOTEBOOK = "executed.ipynb"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://lora-enclave.local/run/papermill/v1"
PACKAGES = ("torch", "diffusers", "transformers", "peft", "papermill", "safetensors",
            "accelerate", "nbformat")
ADAPTER_NAMES = ("adapter_config.json",)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Problem:
    """One verification finding: ``code`` (missing, extra, changed, manifest, ledger, signature,
    publication...), ``where`` (a file path or ``ledger seq N``) and ``what`` is wrong."""

    code: str
    where: str
    what: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.what}"


def canonical_json(obj) -> bytes:
    """Canonical JSON bytes used for every hash: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe folder name, else raise :class:`VerificationError`."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise VerificationError(f"invalid run id {run_id!r}: use letters, digits, '.', '_', '-'")
    return run_id


def iso_time(value) -> str:
    """``value`` (datetime, ISO string or None for now) as an ISO-8601 UTC string."""
    if value is None:
        value = dt.datetime.now(dt.timezone.utc)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> dt.datetime:
    """Parse an ISO time written by :func:`iso_time` (or a date) as an aware datetime."""
    out = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return out if out.tzinfo else out.replace(tzinfo=dt.timezone.utc)


def file_role(rel: str) -> str:
    """The role of a record file from its relative path."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("adapter/") or rel.endswith(".safetensors") or name in ADAPTER_NAMES:
        return "adapter"
    if rel == NOTEBOOK:
        return "notebook"
    if rel == "events.jsonl":
        return "events"
    if rel.startswith("tb/"):
        return "tensorboard"
    return "other"


def record_files(record_dir: str | Path) -> list[str]:
    """Relative POSIX paths of every file in a record except ``manifest.json``, sorted.

    Symbolic links and special files are refused (:class:`VerificationError`): a record holds
    only plain files it owns.
    """
    root = Path(record_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink() or not (full.is_dir() or full.is_file()):
                raise VerificationError(f"{full}: not a plain file or folder (link or special)")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def notebook_cell_digests(path: str | Path) -> list[str]:
    """sha256 of each cell (canonical JSON of the whole cell) of a notebook file."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return [sha256_bytes(canonical_json(cell)) for cell in nb.get("cells", [])]


def adapter_digest_of(files: dict[str, str]) -> str:
    """The adapter digest: sha256 over canonical ``{path: sha256}`` of the adapter files only.

    ``files`` maps relative paths to digests (non-adapter paths are ignored). An approval binds
    to this value, so changing, adding or removing any adapter file changes it.
    """
    adapter = {rel: d for rel, d in sorted(files.items()) if file_role(rel) == "adapter"}
    return sha256_bytes(canonical_json(adapter))


def _package_versions() -> dict:
    out = {}
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


def hardware_info() -> dict:
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


def environment_info() -> dict:
    """Python, platform and library versions (importlib.metadata) plus hardware."""
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "packages": _package_versions(),
            "hardware": hardware_info()}


def hash_record(record_dir: str | Path) -> list[dict]:
    """The ``subject`` list of a record: one entry per file except ``manifest.json``."""
    root = Path(record_dir)
    subject = []
    for rel in record_files(root):
        path = root / rel
        role = file_role(rel)
        ann = {"role": role, "size": path.stat().st_size}
        if role == "notebook":
            try:
                ann["cells"] = notebook_cell_digests(path)
            except (ValueError, UnicodeDecodeError) as exc:
                raise VerificationError(f"{path}: executed notebook is not valid JSON: {exc}") \
                    from None
        subject.append({"name": rel, "digest": {"sha256": sha256_file(path)}, "annotations": ann})
    return subject


def build_manifest(record_dir, *, run_id: str, user: str, host: str, started, ended,
                   status: str, config: dict, base_model_sha256: str, dataset_version: str,
                   dataset_digests: dict, notebook_source_sha256: str, seed: int,
                   egress_refusals: int, extra: dict | None = None) -> dict:
    """Build the provenance manifest of the record in ``record_dir`` (not written; see
    :func:`write_manifest`). Hashes every file present except ``manifest.json``.

    ``started``/``ended`` are datetimes or ISO strings; ``config`` the resolved config dict;
    ``dataset_digests`` ``{relative path: sha256}``; ``extra`` free JSON data (e.g. losses).
    """
    check_run_id(run_id)
    config = json.loads(canonical_json(config))  # fails early on non-JSON values
    base_uri = str(config.get("base_model", ""))
    deps = [{"name": "base_model", "uri": base_uri, "digest": {"sha256": base_model_sha256}},
            {"name": "dataset", "annotations": {"version": dataset_version,
                                                "files": len(dataset_digests)}}]
    deps += [{"name": f"dataset/{rel}", "digest": {"sha256": digest}}
             for rel, digest in sorted(dataset_digests.items())]
    deps.append({"name": "notebook", "digest": {"sha256": notebook_source_sha256}})
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
                "externalParameters": {"config": config, "seed": int(seed),
                                       "notebook_source_sha256": notebook_source_sha256},
                "internalParameters": {"environment": environment_info()},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": "lora-enclave/runs", "version": producer},
                "metadata": {"invocationId": run_id, "startedOn": iso_time(started),
                             "finishedOn": iso_time(ended), "user": user, "host": host,
                             "status": status, "egressRefusals": int(egress_refusals),
                             "extra": extra or {}},
            },
        },
    }


def manifest_bytes(manifest: dict) -> bytes:
    """The exact bytes written to ``manifest.json`` (sorted keys, indented, trailing newline)."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_manifest(record_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` into ``record_dir`` (fsynced) and return its path."""
    path = Path(record_dir) / MANIFEST
    with open(path, "wb") as fh:
        fh.write(manifest_bytes(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load_manifest(record_dir: str | Path) -> dict:
    """Read and parse ``manifest.json``; :class:`VerificationError` if missing or invalid."""
    path = Path(record_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerificationError(f"{path}: manifest missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path}: manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subject"), list):
        raise VerificationError(f"{path}: manifest has no subject list")
    return data


def manifest_sha256(record_dir: str | Path) -> str:
    """sha256 of ``manifest.json``'s bytes as stored (what the ledger records)."""
    return sha256_file(Path(record_dir) / MANIFEST)


def summary(manifest: dict) -> dict:
    """A flat view of a manifest: run id, user, status, times, inputs, adapter digest."""
    pred = manifest.get("predicate", {})
    meta = pred.get("runDetails", {}).get("metadata", {})
    build = pred.get("buildDefinition", {})
    ext = build.get("externalParameters", {})
    deps = build.get("resolvedDependencies", [])
    by_name = {d.get("name"): d for d in deps}
    files = {s["name"]: s["digest"]["sha256"] for s in manifest.get("subject", [])}
    return {
        "run_id": meta.get("invocationId"), "user": meta.get("user"), "host": meta.get("host"),
        "status": meta.get("status"), "started": meta.get("startedOn"),
        "ended": meta.get("finishedOn"), "egress_refusals": meta.get("egressRefusals"),
        "seed": ext.get("seed"), "config": ext.get("config", {}),
        "notebook_source_sha256": ext.get("notebook_source_sha256"),
        "base_model": by_name.get("base_model", {}).get("uri"),
        "base_model_sha256": by_name.get("base_model", {}).get("digest", {}).get("sha256"),
        "dataset_version": by_name.get("dataset", {}).get("annotations", {}).get("version"),
        "dataset_digests": {d["name"][len("dataset/"):]: d["digest"]["sha256"] for d in deps
                            if str(d.get("name", "")).startswith("dataset/")},
        "files": files, "adapter_digest": adapter_digest_of(files),
        "adapter_files": sorted(r for r in files if file_role(r) == "adapter"),
    }


def _cell_changes(where: str, old: list[str], path: Path) -> list[Problem]:
    """Which cells of a notebook differ from the digests the manifest recorded."""
    try:
        new = notebook_cell_digests(path)
    except (ValueError, UnicodeDecodeError) as exc:
        return [Problem("changed", where, f"executed notebook no longer parses: {exc}")]
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "replace" and i2 - i1 == j2 - j1:
            out += [Problem("changed", f"{where} cell {i}", "cell edited") for i in range(i1, i2)]
        elif op in ("replace", "delete"):
            out += [Problem("changed", f"{where} cell {i}", "cell removed or replaced")
                    for i in range(i1, i2)]
            if op == "replace":
                out.append(Problem("changed", f"{where} cells {j1}-{j2 - 1}", "cells inserted"))
        elif op == "insert":
            out.append(Problem("changed", f"{where} cells {j1}-{j2 - 1}",
                               "cells inserted (not in the manifest)"))
    if not out:
        out.append(Problem("changed", where, "notebook metadata changed (cells unchanged)"))
    return out


def verify_record(record_dir: str | Path, *,
                  expected_manifest_sha256: str | None = None) -> list[Problem]:
    """Re-hash every file of a record against its manifest; return the problems found.

    Reports a missing record or manifest, a manifest whose bytes differ from
    ``expected_manifest_sha256`` (the ledger's value), a run id that does not match the folder,
    and each missing, extra or changed file (for the executed notebook: which cells).
    An empty list means the record verifies.
    """
    root = Path(record_dir)
    man_where = str(root / MANIFEST)
    if not root.is_dir():
        return [Problem("missing", str(root), "record folder missing")]
    try:
        manifest = load_manifest(root)
    except VerificationError as exc:
        return [Problem("manifest", man_where, str(exc).split(": ", 1)[-1])]
    problems = []
    if expected_manifest_sha256 is not None:
        actual = manifest_sha256(root)
        if actual != expected_manifest_sha256:
            problems.append(Problem("manifest", man_where,
                                    f"manifest edited: sha256 {actual[:16]}… but the ledger "
                                    f"recorded {expected_manifest_sha256[:16]}…"))
    run_id = manifest.get("predicate", {}).get("runDetails", {}).get("metadata", {}).get(
        "invocationId")
    if run_id != root.name and not root.name.startswith("."):
        problems.append(Problem("manifest", man_where,
                                f"run id {run_id!r} does not match folder {root.name!r}"))
    try:
        present = set(record_files(root))
    except VerificationError as exc:
        return problems + [Problem("extra", str(root), str(exc))]
    expected = {}
    for entry in manifest["subject"]:
        try:
            expected[entry["name"]] = entry
        except (KeyError, TypeError):
            problems.append(Problem("manifest", man_where, f"malformed subject entry {entry!r}"))
    for rel in sorted(set(expected) - present):
        problems.append(Problem("missing", str(root / rel),
                                f"file listed in the manifest is missing ({file_role(rel)})"))
    for rel in sorted(present - set(expected)):
        problems.append(Problem("extra", str(root / rel),
                                f"file not listed in the manifest ({file_role(rel)})"))
    for rel in sorted(present & set(expected)):
        entry = expected[rel]
        path = root / rel
        want = entry.get("digest", {}).get("sha256")
        got = sha256_file(path)
        if got == want:
            continue
        role = file_role(rel)
        cells = entry.get("annotations", {}).get("cells")
        if role == "notebook" and isinstance(cells, list):
            problems += _cell_changes(str(path), cells, path)
        else:
            size = entry.get("annotations", {}).get("size")
            problems.append(Problem("changed", str(path),
                                    f"{role} file changed: sha256 {got[:16]}… expected "
                                    f"{str(want)[:16]}… (size {path.stat().st_size}, "
                                    f"recorded {size})"))
    return problems


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
        raise VerificationError(f"staging folder {staging} is not on the filesystem of {runs}; "
                                "create it with make_staging_dir()")
    problems = verify_record(staging)
    problems = [p for p in problems if not p.what.startswith("run id")]
    if problems:
        raise VerificationError(f"staging folder {staging} does not verify: "
                                + "; ".join(map(str, problems)))
    if load_manifest(staging)["predicate"]["runDetails"]["metadata"]["invocationId"] != run_id:
        raise VerificationError(f"manifest in {staging} is not for run {run_id}")
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
