"""``lora audit verify --inputs``: do a run's dataset files and base model still match what its
manifest pinned? Re-hashes them where the manifest's config says they are and names each file
that changed, went missing, or could not be read. Read-only, standard library only.

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_kernel.common.digests import (
    OUTSIDE_PREFIX,
    REG_PREFIX,
    VAL_PREFIX,
    path_sha256,
    sha256_file,
)
from lora_kernel.provenance.records import Problem, summary


def _dataset_root(config: dict[str, Any]) -> Path | None:
    """The folder dataset paths are relative to (as :func:`dataset_digests` made them)."""
    if config.get("train_data_dir"):
        return Path(config["train_data_dir"])
    if config.get("metadata_path"):
        return Path(config["metadata_path"]).parent
    return None


def _captions_outside(config: dict[str, Any], root: Path | None) -> Path | None:
    """An image dataset's ``metadata_path`` when it lies outside ``train_data_dir``: recorded
    under its bare file name (not relative to the folder), so re-hashed where it is."""
    meta = config.get("metadata_path")
    if config.get("task") != "image" or not meta or root is None:
        return None
    if Path(meta).resolve().is_relative_to(root.resolve()):
        return None
    return Path(meta)


def verify_inputs(manifest: dict[str, Any], run_id: str) -> list[Problem]:
    """Problems with a run's inputs today: each dataset file and the base model re-hashed
    against the manifest (``drifted``: changed or missing, ``unreadable``)."""
    s = summary(manifest)
    config, where = s["config"], f"run {run_id}"
    if not s["dataset_digests"] and not s["base_model_sha256"]:
        return []  # not a training run: nothing was pinned
    problems = []
    root = _dataset_root(config)
    captions = _captions_outside(config, root)
    for rel, want in sorted(s["dataset_digests"].items()):
        if rel.startswith(OUTSIDE_PREFIX):  # allow_outside_dataset: recorded by absolute path
            path = Path(rel[len(OUTSIDE_PREFIX):])
        elif rel.startswith(REG_PREFIX) and config.get("reg_data_dir"):  # regularization images
            path = Path(config["reg_data_dir"]) / rel[len(REG_PREFIX):]
        elif rel.startswith(VAL_PREFIX) and config.get("validation_dir"):  # held-out images
            path = Path(config["validation_dir"]) / rel[len(VAL_PREFIX):]
        elif captions is not None and rel == captions.name:
            path = captions
        else:
            path = (root / rel) if root is not None else Path(rel)
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            problems.append(Problem("drifted", str(path), f"dataset file of {where} is missing"))
            continue
        except OSError as exc:
            problems.append(Problem("unreadable", str(path),
                                    f"dataset file of {where}: {exc.strerror}"))
            continue
        if got != want:
            problems.append(Problem("drifted", str(path),
                                    f"dataset file of {where} changed: sha256 {got[:16]}… was "
                                    f"{want[:16]}…"))
    base, want = s.get("base_model"), s.get("base_model_sha256")
    if base and want:
        try:
            got = path_sha256(base)
        except FileNotFoundError:
            problems.append(Problem("drifted", base, f"base model of {where} is missing"))
        except OSError as exc:
            problems.append(Problem("unreadable", base, f"base model of {where}: {exc.strerror}"))
        else:
            if got != want:
                problems.append(Problem("drifted", base,
                                        f"base model of {where} changed: sha256 {got[:16]}… "
                                        f"was {want[:16]}…"))
    return problems
