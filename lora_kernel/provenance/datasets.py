"""The dataset versions the snapshot store holds (``<state>/objects/datasets/ds-….json``,
written by :mod:`lora_kernel.trusted.objects` when a run pins a dataset), read-only:
``lora data versions``, ``lora data show ds-…`` and ``lora data diff ds-… ds-…``.

Each version lists its files (``{key: sha256}`` as manifests pin them), their sizes, the run
that stored it first and when; :func:`runs_using` finds the kept records pinned on it.

Runs as: whoever reads the state (an auditor, a reviewer, the service account; local mode: the
user); it only reads.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.paths import runs_dir, state_dir

VERSION_ID = re.compile(r"^ds-[0-9a-f]{32}$")


def objects_dir(state: str | os.PathLike[str] | None = None) -> Path:
    """``<state>/objects``: the content-addressed store of pinned inputs."""
    return state_dir(state) / "objects"


def read_index(root: Path, kind: str, name: str) -> dict[str, Any] | None:
    """The index ``<root>/<kind>/<name>.json`` (a dataset version or a base model), or None
    when the store holds no such entry; :class:`VerificationError` when it is unreadable."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"not a snapshot name: {name!r}")
    path = root / kind / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path}: unreadable snapshot index ({exc}); fix: the "
                                "snapshot store was damaged: restore this file from a backup "
                                "of the state directory (the records pinned on it can no "
                                "longer be replayed until then)") from None
    return doc if isinstance(doc, dict) else None


def dataset_versions(state: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every dataset version in the store, oldest first, each with ``runs``: the kept records
    pinned on it."""
    folder = objects_dir(state) / "datasets"
    used = runs_using(state)
    out = []
    for path in sorted(folder.glob("ds-*.json")) if folder.is_dir() else []:
        doc = read_index(objects_dir(state), "datasets", path.stem)
        if doc is not None:
            out.append({**doc, "runs": used.get(path.stem, [])})
    return sorted(out, key=lambda d: (str(d.get("stored")), str(d.get("id"))))


def dataset_version(version: str, state: str | os.PathLike[str] | None = None
                    ) -> dict[str, Any]:
    """One dataset version of the store, with the runs pinned on it; :class:`ConfigError`
    naming the fix when the store does not hold it."""
    if not VERSION_ID.match(version):
        raise ConfigError(f"{version!r} is not a dataset version id (ds- and 32 hex digits); "
                          "fix: pick one from `lora data versions`", key="VERSION")
    doc = read_index(objects_dir(state), "datasets", version)
    if doc is None:
        raise ConfigError(f"the snapshot store {objects_dir(state)} holds no dataset "
                          f"{version} (never pinned here, or pruned); fix: pick one from "
                          "`lora data versions`", key="VERSION")
    return {**doc, "runs": runs_using(state).get(version, [])}


def runs_using(state: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """``{dataset version: [run id, ...]}`` of the kept records whose run read a snapshot."""
    from lora_kernel.provenance.records import load_manifest

    out: dict[str, list[str]] = {}
    base = runs_dir(state)
    for record in sorted(base.iterdir()) if base.is_dir() else []:
        if record.name.startswith(".") or not (record / "manifest.json").is_file():
            continue
        try:
            extra = load_manifest(record)["predicate"]["runDetails"]["metadata"].get(
                "extra") or {}
        except (OSError, VerificationError, KeyError, TypeError):
            continue
        snap = extra.get("snapshot") if isinstance(extra, dict) else None
        if isinstance(snap, dict) and snap.get("read_from") == "snapshot":
            out.setdefault(str(snap.get("dataset_version")), []).append(record.name)
    return out


def snapshots_in_use(state: str | os.PathLike[str] | None = None
                     ) -> tuple[set[str], set[str], set[str]]:
    """What the kept records and the runs in flight (``runs/.active``) were pinned on:
    ``(dataset versions, base model digests, config sha256s)``; the store keeps these."""
    from lora_kernel.provenance.records import load_manifest

    datasets: set[str] = set()
    models: set[str] = set()
    configs: set[str] = set()
    base = runs_dir(state)

    def add(doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        for key, into in (("dataset_version", datasets), ("base_model_sha256", models),
                          ("init_adapter_sha256", models), ("config_sha256", configs)):
            if isinstance(doc.get(key), str):
                into.add(doc[key])

    for record in sorted(base.iterdir()) if base.is_dir() else []:
        if record.name.startswith("."):
            continue
        try:
            extra = load_manifest(record)["predicate"]["runDetails"]["metadata"].get("extra")
        except (OSError, VerificationError, KeyError, TypeError):
            continue  # an unreadable record keeps nothing, but is never pruned by this
        if isinstance(extra, dict):
            add(extra.get("snapshot"))
    active = base / ".active"
    for path in sorted(active.glob("*.json")) if active.is_dir() else []:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pinned = doc.get("pinned") if isinstance(doc, dict) else None
        add(pinned)
        add((doc.get("extra") or {}).get("snapshot") if isinstance(doc, dict) else None)
    return datasets, models, configs
