"""The loadable adapters a training run saved mid-run (``snapshots/`` in its record, listed
in ``snapshots/snapshots.json`` by step, epoch and sha256; written by
:mod:`lora_kernel.training.snapshots`), as a reviewer approves and publishes one of them:
``lora review approve RUN --step N`` / ``lora publish RUN --step N``.

Reads a record that the caller has verified (its manifest lists every file with its
sha256); a snapshot whose files are not those the manifest lists is refused.

Runs as: the trusted side (review and publish, in local mode the reviewer's own account).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import canonical_json, sha256_bytes
from lora_kernel.common.errors import ConfigError, VerificationError

SNAPSHOT_PREFIX = "snapshots/"
SNAPSHOT_INDEX = "snapshots/snapshots.json"


def snapshot_summary(record: Path, s: dict[str, Any], step: int) -> dict[str, Any]:
    """``s`` (a verified record's summary) with ``adapter_files`` and ``adapter_digest``
    those of the snapshot saved at ``step``, and ``step`` set. No such step:
    :class:`ConfigError` naming the steps the run saved."""
    files: dict[str, str] = s["files"]
    if SNAPSHOT_INDEX not in files:
        raise ConfigError(f"run {s['run_id']} saved no adapter during training (no "
                          f"{SNAPSHOT_INDEX}); fix: review the run's final adapter without "
                          f"--step, or train with save_every_n_epochs / save_steps",
                          key="--step")
    index = json.loads((record / SNAPSHOT_INDEX).read_text(encoding="utf-8"))
    entries = index.get("snapshots", []) if isinstance(index, dict) else []
    entry = next((e for e in entries if isinstance(e, dict) and e.get("step") == step), None)
    if entry is None:
        saved = ", ".join(str(e.get("step")) for e in entries if isinstance(e, dict)) or "none"
        raise ConfigError(f"run {s['run_id']} saved no adapter at step {step}; the steps it "
                          f"saved: {saved}; fix: --step one of them", key="--step")
    chosen: dict[str, str] = {}
    for fmt, f in sorted(entry.get("files", {}).items()):
        rel = SNAPSHOT_PREFIX + str(f.get("name"))
        if files.get(rel) != f.get("sha256"):
            raise VerificationError(f"{record / rel}: the {fmt} adapter of step {step} is not "
                                    f"the file the record's manifest lists")
        chosen[rel] = files[rel]
    return {**s, "step": step, "adapter_files": sorted(chosen),
            "adapter_digest": sha256_bytes(canonical_json(chosen))}
