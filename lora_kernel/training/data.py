"""Datasets: which files a config trains on, how they are read, and their content-addressed
version id.

Validation (``training/config.py``) and training read dataset files through the same helpers
here, so what validation accepted is what training sees: text is UTF-8 with an optional BOM
(Excel's "CSV UTF-8") and any line ends, and images are opened under ``max_image_pixels``.

Image datasets come in three layouts (:func:`image_layout`), used as they are:

- ``csv``: ``metadata.csv`` (``file_name,text``; ``metadata_path``),
- ``jsonl``: ``metadata.jsonl`` (Hugging Face imagefolder: one ``{"file_name": ..., "text":
  ...}`` per line), used when ``metadata_path`` is left at its default and only it exists,
- ``kohya``: no metadata file; each image's caption is a sidecar ``<stem>.txt`` (or
  ``<stem>.caption``) next to it, and images may sit in ``N_concept`` folders (kohya's repeat
  folders: ``10_enclavestyle/`` trains each of its images 10 times per epoch). The sidecars
  are files of the dataset, so editing a caption changes the dataset version.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from lora_kernel.common.digests import (
    OUTSIDE_PREFIX,
    REG_PREFIX,
    VAL_PREFIX,
    listing_sha256,
    sha256_file,
)
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


def frame_count(im: Image.Image) -> int:
    """How many frames ``im`` holds (an animated GIF, WebP or APNG: more than one)."""
    return int(getattr(im, "n_frames", 1) or 1)


def animated_message(where: str, name: str, frames: int) -> str:
    """The refusal of an animated image (one clear message for the validator and loaders)."""
    return (f"{where} names {name!r}, an animated image of {frames} frames: training would "
            f"silently use its first frame only; fix: save the frame(s) you want as separate "
            f"PNG images and list those")


def rgb_image(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB, converted faithfully: 16-bit and 32-bit integer images (``I;16``,
    ``I``: 16-bit PNG and TIFF) are scaled to 8 bits instead of clipped (PIL's
    ``convert("RGB")`` turns a 16-bit gradient all white), float images (``F``) by their
    range; a palette image with transparency goes through RGBA. Other modes as PIL converts.
    Always a new, loaded image (usable after ``im``'s file is closed)."""
    import numpy as np

    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) <= 65535 \
            else float(arr.max())
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0  # already a [0, 1] image
        span = (hi - lo) or 1.0
        gray = np.clip(np.rint((arr - lo) * (255.0 / span)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an image suffix training reads (PNG, JPEG, WebP, BMP)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def image_layout(cfg) -> str:
    """``"csv"``, ``"jsonl"`` or ``"kohya"`` (see the module docstring).

    A ``metadata_path`` that exists decides (``.jsonl`` suffix: jsonl, else csv). Left at its
    default ``<train_data_dir>/metadata.csv`` and missing: ``metadata.jsonl`` beside it, else
    the kohya layout (sidecar captions, repeat folders). Any other missing ``metadata_path`` is
    "csv" (validation then says the file is missing)."""
    meta = Path(cfg.metadata_path) if cfg.metadata_path else None
    if meta is not None and meta.is_file():
        return "jsonl" if meta.suffix.lower() == ".jsonl" else "csv"
    data = Path(cfg.train_data_dir) if cfg.train_data_dir else None
    if data is None or (meta is not None and meta != data / "metadata.csv"):
        return "csv"
    if (data / "metadata.jsonl").is_file():
        return "jsonl"
    return "kohya"


def metadata_file(cfg) -> Path | None:
    """The captions file of an image dataset (None in the kohya layout)."""
    layout = image_layout(cfg)
    if layout == "kohya":
        return None
    meta = Path(cfg.metadata_path)
    if layout == "jsonl" and not meta.is_file():
        return Path(cfg.train_data_dir) / "metadata.jsonl"
    return meta


def read_caption_file(path: str | os.PathLike, *, source: str | None = None) -> str:
    """The caption in a kohya sidecar: its first non-blank line, stripped (UTF-8, BOM
    dropped). Not UTF-8: :class:`ConfigError` naming the file, line and fix."""
    text = read_dataset_text(path, source=source, key="train_data_dir")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def caption_sidecar(image: Path, *, source: str | None = None,
                    suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> Path | None:
    """The caption file of ``image`` (``<stem>.txt`` or ``<stem>.caption``; ``suffixes``:
    kohya's ``caption_extension``), or None. Two present: :class:`ConfigError` (which one is
    meant is ambiguous)."""
    found = [image.with_suffix(s) for s in suffixes if image.with_suffix(s).is_file()]
    if len(found) > 1:
        raise ConfigError(f"{image} has two caption files, {found[0].name} and "
                          f"{found[1].name}; fix: keep one of them", file=source,
                          key="train_data_dir")
    return found[0] if found else None


def kohya_entries(data_dir: str | os.PathLike, *, source: str | None = None,
                  captions: bool = True, caption_extension: str | None = None) -> list[dict]:
    """The images of a kohya-layout folder, sorted by path, as ``{"image": Path, "caption":
    str, "caption_file": Path | None, "repeats": int, "concept": str | None}``.

    Images directly in ``data_dir`` count once; images in an ``N_concept`` sub-folder count N
    times (``concept`` is the folder name after ``N_``). Other sub-folders are not part of the
    dataset. When the dataset uses sidecar captions (any image has one), an image without
    one is a :class:`ConfigError` naming it; when none has, an image in a repeat folder is
    captioned with its concept name (kohya's class-token captions) and one outside them is
    an error. ``captions=False`` skips these checks and reading (for lint);
    ``caption_extension`` (e.g. ``.txt``) reads only sidecars with that suffix."""
    data = Path(data_dir)
    groups: list[tuple[Path, int, str | None]] = [(data, 1, None)]
    for sub in sorted(p for p in data.iterdir() if p.is_dir()):
        m = REPEAT_FOLDER.match(sub.name)
        if m:
            groups.append((sub, int(m.group(1)), m.group(2).strip()))
    out = []
    for folder, repeats, concept in groups:
        for img in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
            suffixes = (caption_extension,) if caption_extension else CAPTION_SUFFIXES
            side = (caption_sidecar(img, source=source, suffixes=suffixes) if captions
                    else None)
            out.append({"image": img, "caption": "", "caption_file": side,
                        "repeats": repeats, "concept": concept})
    if not captions:
        return out
    uses_sidecars = any(e["caption_file"] for e in out)
    for e in out:
        if e["caption_file"] is not None:
            e["caption"] = read_caption_file(e["caption_file"], source=source)
        elif uses_sidecars:
            rel = e["image"].relative_to(data).as_posix()
            raise ConfigError(f"{e['image']} has no caption file; this folder uses sidecar "
                              f"captions, so every image needs one; fix: write "
                              f"{Path(rel).with_suffix('.txt').as_posix()} (one line) or remove "
                              f"the image", file=source, key="train_data_dir")
        elif e["concept"] is not None:
            e["caption"] = e["concept"]
        else:
            raise ConfigError(f"{e['image']} has no caption: {data} has no metadata.csv, no "
                              f"metadata.jsonl and no .txt/.caption sidecars; fix: write a "
                              f"metadata.csv (file_name,text), a "
                              f"{e['image'].with_suffix('.txt').name} next to each image, or "
                              f"run `lora label {data} --model CLIP_DIR`",
                              file=source, key="train_data_dir")
    return out


def jsonl_image_rows(path: str | os.PathLike, *, source: str | None = None
                     ) -> list[tuple[int, dict]]:
    """``(line number, record)`` of a ``metadata.jsonl`` (each must be a JSON object)."""
    out = []
    for n, line in jsonl_lines(path, source=source):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"line {n} of {path} is not JSON ({exc.msg}); fix: one JSON "
                              f"object per line", file=source, key="metadata_path") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"line {n} of {path} is not a JSON object; fix: one "
                              f"{{\"file_name\": ..., \"text\": ...}} per line", file=source,
                              key="metadata_path")
        out.append((n, {k: (v if isinstance(v, str) or v is None else str(v))
                        for k, v in rec.items()}))
    return out


def metadata_rows(cfg) -> tuple[Path, list[str], list[tuple[int, dict]]]:
    """``(file, column names, (line, row) pairs)`` of a csv/jsonl image dataset."""
    meta = metadata_file(cfg)
    if meta is None:
        raise ValueError("a kohya-layout dataset has no metadata file")
    if image_layout(cfg) == "jsonl":
        rows = jsonl_image_rows(meta, source=cfg.source)
        cols = sorted({k for _, r in rows for k in r})
        return meta, cols, rows
    cols, rows = read_csv_rows(meta, source=cfg.source)
    return meta, cols, rows


def image_entries(cfg) -> list[dict]:
    """Every image entry of an image dataset, once each, as ``{"image": Path, "caption": str,
    "caption_file": Path | None, "repeats": int, "concept": str | None}``."""
    if image_layout(cfg) == "kohya":
        return kohya_entries(cfg.train_data_dir, source=cfg.source,
                             caption_extension=getattr(cfg, "caption_extension", None))
    _, _, rows = metadata_rows(cfg)
    return [{"image": Path(cfg.train_data_dir) / (row.get(cfg.image_column) or ""),
             "caption": row.get(cfg.caption_column) or "", "caption_file": None,
             "repeats": 1, "concept": None} for _, row in rows]


def read_image_rows(cfg) -> list[dict]:
    """The training rows of an image dataset as ``{"image": Path, "caption": str, ...}``:
    every entry of :func:`image_entries`, an ``N_concept`` folder's images N times each."""
    return [e for e in image_entries(cfg) for _ in range(e["repeats"])]


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
        meta = metadata_file(cfg)
        files = {meta.resolve()} if meta is not None else set()
        for e in image_entries(cfg):
            files.add(e["image"].resolve())
            if e["caption_file"] is not None:
                files.add(e["caption_file"].resolve())
    else:
        files = {p.resolve() for p in text_files(cfg)}
    return sorted(files)


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or somewhere below it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def dataset_paths(cfg) -> dict[str, Path]:
    """``{key: file}`` of every dataset file, keyed as :func:`dataset_digests` records them.

    Files inside train_data_dir (or, without one, the text file's folder) are keyed by their
    relative POSIX path. Files outside it (only accepted with ``allow_outside_dataset: true``)
    are keyed ``OUTSIDE_PREFIX + <absolute resolved path>``; a clash with a relative path
    (a sub-folder literally named ``outside:``) raises :class:`ConfigError` rather than
    merging two files under one key. An image dataset's captions file named by
    ``metadata_path`` outside train_data_dir keeps its file name as key (as it always has).
    """
    files = dataset_files(cfg)
    root = Path(cfg.train_data_dir).resolve() if cfg.train_data_dir else files[0].parent
    meta_file = metadata_file(cfg) if cfg.task == "image" else None
    meta = meta_file.resolve() if meta_file is not None else None
    out: dict[str, Path] = {}
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
        out[key] = f
    out.update(reg_dataset_paths(cfg))
    out.update(validation_paths(cfg))
    return dict(sorted(out.items()))


def dataset_digests(cfg) -> dict[str, str]:
    """``{key: sha256}`` of every dataset file, keyed as :func:`dataset_paths` says."""
    return {key: sha256_file(f) for key, f in dataset_paths(cfg).items()}


def reg_dataset_paths(cfg) -> dict[str, Path]:
    """``{REG_PREFIX + path in reg_data_dir: file}`` of the regularization images and their
    sidecar captions (:mod:`lora_kernel.training.reg`); {} without ``reg_data_dir``."""
    if not getattr(cfg, "reg_data_dir", None):
        return {}
    root = Path(cfg.reg_data_dir).resolve()
    files: set[Path] = set()
    for e in kohya_entries(root, source=cfg.source,
                           caption_extension=getattr(cfg, "caption_extension", None)):
        files.update(f.resolve() for f in (e["image"], e["caption_file"]) if f is not None)
    return {REG_PREFIX + f.relative_to(root).as_posix(): f for f in sorted(files)}


def reg_dataset_digests(cfg) -> dict[str, str]:
    """``{REG_PREFIX + path: sha256}`` of :func:`reg_dataset_paths`."""
    return {key: sha256_file(f) for key, f in reg_dataset_paths(cfg).items()}


def validation_config(cfg):
    """``cfg`` reading ``validation_dir`` as its image folder (any of the three layouts)."""
    from dataclasses import replace
    root = Path(cfg.validation_dir)
    return replace(cfg, train_data_dir=str(root), metadata_path=str(root / "metadata.csv"),
                   reg_data_dir=None, validation_dir=None, prior_loss_weight=None)


def validation_paths(cfg) -> dict[str, Path]:
    """``{VAL_PREFIX + path in validation_dir: file}`` of an image run's held-out images
    (and their captions file or sidecars); {} without ``validation_dir``."""
    if not getattr(cfg, "validation_dir", None) or cfg.task != "image":
        return {}
    held = validation_config(cfg)
    root = Path(held.train_data_dir).resolve()
    return {VAL_PREFIX + (f.relative_to(root).as_posix() if f.is_relative_to(root)
                          else OUTSIDE_PREFIX + str(f)): f
            for f in dataset_files(held)}


def dataset_version(cfg, digests: dict[str, str] | None = None) -> str:
    """A content-addressed dataset version id: ``ds-`` + the first 32 hex digits of
    :func:`listing_sha256` over the dataset's files.

    Renaming the folder keeps the id; changing, adding or removing any file changes it.
    """
    digests = digests if digests is not None else dataset_digests(cfg)
    return "ds-" + listing_sha256(digests)[:32]
