"""Datasets: which files a config trains on, and their content-addressed version id."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from lora_kernel.common.digests import listing_sha256, sha256_file



def text_files(cfg) -> list[Path]:
    """The .jsonl files of a text dataset: ``metadata_path`` if set, else those in the folder."""
    if cfg.metadata_path:
        return [Path(cfg.metadata_path)]
    if cfg.train_data_dir and Path(cfg.train_data_dir).is_dir():
        return sorted(Path(cfg.train_data_dir).glob("*.jsonl"))
    return []


def read_image_rows(cfg) -> list[dict]:
    """Rows of an image dataset's metadata.csv as ``{"image": Path, "caption": str}``."""
    rows = []
    with open(cfg.metadata_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append({"image": Path(cfg.train_data_dir) / row[cfg.image_column],
                         "caption": row[cfg.caption_column] or ""})
    return rows


def read_text_records(cfg) -> list[dict]:
    """Records of a text dataset, in file order."""
    out = []
    for path in text_files(cfg):
        with open(path, encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


def dataset_files(cfg) -> list[Path]:
    """Every file the dataset consists of (metadata and data files), sorted, de-duplicated."""
    if cfg.task == "image":
        files = {Path(cfg.metadata_path).resolve()}
        files.update(r["image"].resolve() for r in read_image_rows(cfg))
    else:
        files = {p.resolve() for p in text_files(cfg)}
    return sorted(files)


def dataset_digests(cfg) -> dict[str, str]:
    """``{relative path: sha256}`` of every dataset file (relative to train_data_dir or its file)."""
    files = dataset_files(cfg)
    root = Path(cfg.train_data_dir).resolve() if cfg.train_data_dir else files[0].parent
    out = {}
    for f in files:
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            rel = f.name
        out[rel] = sha256_file(f)
    return dict(sorted(out.items()))



def dataset_version(cfg, digests: dict[str, str] | None = None) -> str:
    """A content-addressed dataset version id: ``ds-`` + the first 32 hex digits of
    :func:`listing_sha256` over the dataset's files.

    Renaming the folder keeps the id; changing, adding or removing any file changes it.
    """
    digests = digests if digests is not None else dataset_digests(cfg)
    return "ds-" + listing_sha256(digests)[:32]
