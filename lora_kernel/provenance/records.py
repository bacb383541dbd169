"""Run records: the provenance manifest format and its re-verification (read-only).

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

Producing a record (staging, manifest, atomic rename) is :mod:`lora_kernel.trusted.sealing`;
this module only reads and checks.

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import canonical_json, sha256_bytes, sha256_file
from lora_kernel.common.errors import VerificationError

MANIFEST = "manifest.json"
NOTEBOOK = "executed.ipynb"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://lora-enclave.local/run/papermill/v1"
PACKAGES = ("torch", "diffusers", "transformers", "peft", "papermill", "safetensors",
            "accelerate", "nbformat")
ADAPTER_NAMES = ("adapter_config.json",)


@dataclass(frozen=True)
class Problem:
    """One verification finding: ``code`` (missing, extra, changed, manifest, ledger, signature,
    publication...), ``where`` (a file path or ``ledger seq N``) and ``what`` is wrong."""

    code: str
    where: str
    what: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.what}"


def file_role(rel: str) -> str:
    """The role of a record file from its relative path."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("snapshots/"):  # adapters saved mid-run: approved one by one (--step)
        return "snapshot"
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


def hash_record(record_dir: str | Path) -> list[dict[str, Any]]:
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


def load_manifest(record_dir: str | os.PathLike[str]) -> dict[str, Any]:
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


def manifest_sha256(record_dir: str | os.PathLike[str]) -> str:
    """sha256 of ``manifest.json``'s bytes as stored (what the ledger records)."""
    return sha256_file(Path(record_dir) / MANIFEST)


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """A flat view of a manifest: run id, user, status, times, inputs, adapter digest."""
    pred = manifest.get("predicate", {})
    meta = pred.get("runDetails", {}).get("metadata", {})
    build = pred.get("buildDefinition", {})
    ext = build.get("externalParameters", {})
    deps = build.get("resolvedDependencies", [])
    by_name = {d.get("name"): d for d in deps}
    files = {s["name"]: s["digest"]["sha256"] for s in manifest.get("subject", [])}
    return {
        "run_id": meta.get("invocationId"), "user": meta.get("user"), "uid": meta.get("uid"),
        "host": meta.get("host"),
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
        "kind": provenance_kind(meta.get("extra"), ext.get("config")),
        "derived_from": (meta.get("extra") or {}).get("derived_from")
        if isinstance(meta.get("extra"), dict) else None,
    }


#: What produced a record's adapter: ``training`` (the platform's training, its numbers
#: measured and its inputs pinned and cross-checked), ``replay``, ``derived`` (merge, resize,
#: convert of a pinned source) or ``notebook`` (a plain notebook: its adapter and numbers are
#: self-reported, claimed by user code).
PROVENANCE_KINDS = ("training", "replay", "derived", "notebook")


def provenance_kind(extra: Any, config: Any) -> str:
    """The record's :data:`PROVENANCE_KINDS` entry from its manifest's ``extra.kind``;
    records made before kinds were recorded count as training when they pinned a config with
    a base model, else as a notebook."""
    kind = extra.get("kind") if isinstance(extra, dict) else None
    if kind in PROVENANCE_KINDS:
        return str(kind)
    return "training" if isinstance(config, dict) and config.get("base_model") else "notebook"


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


def verify_record(record_dir: str | Path, *, expected_manifest_sha256: str | None = None,
                  run_id: str | None = None) -> list[Problem]:
    """Re-hash every file of a record against its manifest; return the problems found.

    Reports a missing record or manifest, a manifest whose bytes differ from
    ``expected_manifest_sha256`` (the ledger's value), a manifest for another run than
    ``run_id`` (default: the folder's name), and each missing, extra or changed file (for the
    executed notebook: which cells). An empty list means the record verifies.
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
    stated = manifest.get("predicate", {}).get("runDetails", {}).get("metadata", {}).get(
        "invocationId")
    expected_id = run_id if run_id is not None else root.name
    if stated != expected_id:
        problems.append(Problem("manifest", man_where,
                                f"manifest is for run {stated!r}, not {expected_id!r}"))
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

