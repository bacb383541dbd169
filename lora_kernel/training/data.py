"""Datasets: which files a config trains on, and their content-addressed version id."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from lora_kernel.common.digests import OUTSIDE_PREFIX, listing_sha256, sha256_file
from lora_kernel.common.errors import ConfigError


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


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or somewhere below it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def dataset_digests(cfg) -> dict[str, str]:
    """``{key: sha256}`` of every dataset file.

    Files inside train_data_dir (or, without one, the text file's folder) are keyed by their
    relative POSIX path. Files outside it (only accepted with ``allow_outside_dataset: true``)
    are keyed ``OUTSIDE_PREFIX + <absolute resolved path>``; a clash with a relative path
    (a sub-folder literally named ``outside:``) raises :class:`ConfigError` rather than
    merging two files under one key. An image dataset's captions file named by
    ``metadata_path`` outside train_data_dir keeps its file name as key (as it always has).
    """
    files = dataset_files(cfg)
    root = Path(cfg.train_data_dir).resolve() if cfg.train_data_dir else files[0].parent
    meta = (Path(cfg.metadata_path).resolve()
            if cfg.task == "image" and cfg.metadata_path else None)
    out = {}
    for f in files:
        if f.is_relative_to(root):
            key = f.relative_to(root).as_posix()
        elif f == meta:
            key = f.name
        else:
            key = OUTSIDE_PREFIX + str(f)
        if key in out:  # only a sub-folder literally named "outside:" can cause this
            raise ConfigError(f"two dataset files would be recorded as {key!r}; fix: rename "
                              f"the folder {OUTSIDE_PREFIX!r} in {root}", file=cfg.source,
                              key="train_data_dir")
        out[key] = sha256_file(f)
    return dict(sorted(out.items()))



def dataset_version(cfg, digests: dict[str, str] | None = None) -> str:
    """A content-addressed dataset version id: ``ds-`` + the first 32 hex digits of
    :func:`listing_sha256` over the dataset's files.

    Renaming the folder keeps the id; changing, adding or removing any file changes it.
    """
    digests = digests if digests is not None else dataset_digests(cfg)
    return "ds-" + listing_sha256(digests)[:32]
