"""Datasets: which files a config trains on, how they are read, and their content-addressed
version id.

Validation (``training/config.py``) and training read dataset files through the same helpers
here, so what validation accepted is what training sees: text is UTF-8 with an optional BOM
(Excel's "CSV UTF-8") and any line ends, and images are opened under ``max_image_pixels``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from lora_kernel.common.digests import OUTSIDE_PREFIX, listing_sha256, sha256_file
from lora_kernel.common.errors import ConfigError

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit


class ImageTooLarge(ConfigError):
    """An image's header declares more pixels than ``max_image_pixels`` (a possible
    decompression bomb); :attr:`detail` says its size and the limit."""

    def __init__(self, path: Path, size: tuple[int, int], limit: int) -> None:
        self.path, self.size, self.limit = Path(path), size, limit
        w, h = size
        super().__init__(f"its header says {w}x{h} = {w * h} pixels, above the limit of "
                         f"{limit} pixels (max_image_pixels)", file=path, key="max_image_pixels")


@contextmanager
def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS
               ) -> Iterator[Image.Image]:
    """``Image.open(path)`` refusing, from the header alone, an image of more than
    ``max_pixels`` pixels (:class:`ImageTooLarge`, nothing decoded). While the image is open,
    PIL's own limit (``Image.MAX_IMAGE_PIXELS``, checked again while decoding some formats) is
    ``max_pixels``; it is restored afterwards (process-wide: one image at a time)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size check is ours, with the size named
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ImageTooLarge(Path(path), im.size, max_pixels)
            Image.MAX_IMAGE_PIXELS = max_pixels
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_dataset_text(path: str | os.PathLike, *, source: str | None = None,
                      key: str = "metadata_path") -> str:
    """The text of a dataset file (UTF-8; a leading BOM dropped; line ends kept as written).
    Not UTF-8: :class:`ConfigError` naming the file and line (``source``: the config)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        name = Path(path).name
        excel = "Excel: Save As \"CSV UTF-8\"; or " if name.lower().endswith(".csv") else ""
        raise ConfigError(f"line {line} of {path} is not UTF-8 text ({exc.reason}: byte "
                          f"0x{data[exc.start]:02x}); fix: save it as UTF-8 ({excel}convert it: "
                          f"iconv -f cp1252 -t utf-8 {name} > utf8-{name} && "
                          f"mv utf8-{name} {name})", file=source, key=key) from None


def read_csv_rows(path: str | os.PathLike, *, source: str | None = None
                  ) -> tuple[list[str], list[tuple[int, dict]]]:
    """The column names and ``(line number, row)`` pairs of a captions CSV (BOM and CRLF
    tolerated; a short row has ``None`` in its missing columns)."""
    reader = csv.DictReader(io.StringIO(read_dataset_text(path, source=source), newline=""))
    cols = list(reader.fieldnames or [])
    return cols, [(reader.line_num, row) for row in reader]


def text_files(cfg) -> list[Path]:
    """The .jsonl files of a text dataset: ``metadata_path`` if set, else those in the folder."""
    if cfg.metadata_path:
        return [Path(cfg.metadata_path)]
    if cfg.train_data_dir and Path(cfg.train_data_dir).is_dir():
        return sorted(Path(cfg.train_data_dir).glob("*.jsonl"))
    return []


def read_image_rows(cfg) -> list[dict]:
    """Rows of an image dataset's metadata.csv as ``{"image": Path, "caption": str}``."""
    _, rows = read_csv_rows(cfg.metadata_path, source=cfg.source)
    return [{"image": Path(cfg.train_data_dir) / row[cfg.image_column],
             "caption": row[cfg.caption_column] or ""} for _, row in rows]


def read_text_records(cfg) -> list[dict]:
    """Records of a text dataset, in file order."""
    out = []
    for path in text_files(cfg):
        out.extend(rec for _, rec in jsonl_records(path, source=cfg.source))
    return out


def jsonl_lines(path: str | os.PathLike, *, source: str | None = None
                ) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank line of a JSON Lines file (BOM and CRLF
    tolerated; only ``\\n`` ends a line, as JSON strings may hold other line separators)."""
    for n, line in enumerate(read_dataset_text(path, source=source).split("\n"), start=1):
        if line.strip():
            yield n, line


def jsonl_records(path: str | os.PathLike, *, source: str | None = None
                  ) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` for every non-blank line of a JSON Lines file."""
    for n, line in jsonl_lines(path, source=source):
        yield n, json.loads(line)


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
