"""Dataset tools behind ``lora data``: lint a folder, print its version id, diff two datasets,
and draw a contact sheet.

Every tool reads a folder the way training does (:mod:`lora_kernel.training.data`: the
``metadata.csv`` / ``metadata.jsonl`` / kohya layouts), so ``lora data version DIR`` prints the
id a run's manifest will record for ``train_data_dir: DIR``.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.data import (
    CAPTION_SUFFIXES,
    METADATA_NAMES,
    REPEAT_FOLDER,
    ImageTooLarge,
    dataset_digests,
    dataset_version,
    image_entries,
    image_layout,
    is_image_file,
    kohya_entries,
    metadata_rows,
    open_image,
    rgb_image,
)

DEFAULT_MIN_SIZE = 256  # short side, pixels: below it SD-1.x training upsamples a lot
NEAR_DUPLICATE_BITS = 6  # dHash Hamming distance (of 64) at or below which images look alike
NEAR_DUPLICATE_COLOUR = 32  # largest |RGB difference| of 8x8 thumbnails (0-255) still "alike"
EXIF_ORIENTATION = 0x0112


# -- which dataset a folder is -------------------------------------------------------------
def folder_config(folder: str | os.PathLike):
    """A :class:`TrainConfig` training on ``folder`` with default keys (image when the folder
    holds images or a metadata file, else text), paths not checked."""
    from lora_kernel.training.checks import validate_config

    data = Path(folder).resolve()
    if not data.is_dir():
        raise ConfigError(f"dataset folder not found: {data}; fix: give a folder of images "
                          f"(or .jsonl files)")
    images = any(is_image_file(p) for p in data.rglob("*")) or any(
        (data / n).is_file() for n in METADATA_NAMES)
    task = "image" if images or not any(data.glob("*.jsonl")) else "text"
    # base_model is required by the validator but never used here
    return validate_config({"task": task, "train_data_dir": str(data), "base_model": str(data)},
                           source=str(data),
                           base_dir=data, check_paths=False)


def folder_digests(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of the files training on ``folder`` would use."""
    cfg = folder_config(folder)
    if cfg.task == "text" and not any(Path(cfg.train_data_dir).glob("*.jsonl")):
        raise ConfigError(f"{folder} holds no images and no .jsonl files; fix: point at a "
                          f"dataset folder")
    return dataset_digests(cfg)


def folder_version(folder: str | os.PathLike) -> str:
    """The content-addressed dataset version id (``ds-...``) of ``folder``, as manifests
    record it."""
    return dataset_version(None, folder_digests(folder))


def dataset_ref_digests(ref: str, *, state: str | os.PathLike | None = None
                        ) -> tuple[str, dict[str, str]]:
    """``(label, digests)`` of a dataset folder, of the dataset a run's record pins (a run
    id in ``state``'s ``runs/``), or of a dataset version the snapshot store holds (``ds-…``)."""
    path = Path(ref)
    if path.is_dir():
        return str(path), folder_digests(path)
    if ref.startswith("ds-") and "/" not in ref:
        from lora_kernel.provenance.datasets import dataset_version

        return ref, dict(dataset_version(ref, state).get("files") or {})
    from lora_kernel.common.paths import runs_dir
    from lora_kernel.provenance.records import load_manifest, summary

    record = runs_dir(state) / ref
    if "/" not in ref and (record / "manifest.json").is_file():
        s = summary(load_manifest(record))
        if not s["dataset_digests"]:
            raise ConfigError(f"run {ref} pins no dataset (not a training run)")
        return f"run {ref}", dict(s["dataset_digests"])
    raise ConfigError(f"{ref} is neither a dataset folder nor a run id in {runs_dir(state)}; "
                      f"fix: give a folder, a run id from `lora audit list` or a dataset "
                      f"version from `lora data versions`")


@dataclass
class DatasetDiff:
    """Files ``added`` (only in B), ``removed`` (only in A) and ``changed`` (other bytes)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        """``+ path`` / ``- path`` / ``M path`` lines, sorted by path."""
        out = [(p, "+") for p in self.added] + [(p, "-") for p in self.removed]
        out += [(p, "M") for p in self.changed]
        return [f"{mark} {p}" for p, mark in sorted(out)]


def diff_digests(a: dict[str, str], b: dict[str, str]) -> DatasetDiff:
    """What changed from dataset digests ``a`` to ``b``."""
    return DatasetDiff(added=sorted(set(b) - set(a)), removed=sorted(set(a) - set(b)),
                       changed=sorted(k for k in set(a) & set(b) if a[k] != b[k]))


# -- perceptual hashes ---------------------------------------------------------------------
def dhash(im: Image.Image, size: int = 8) -> int:
    """Difference hash: ``size*size`` bits, 1 where a pixel of the grey ``(size+1) x size``
    thumbnail is brighter than its right neighbour. Robust to rescaling and recompression."""
    g = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS),
                   dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def ahash(im: Image.Image, size: int = 8) -> int:
    """Average hash: 1 where a pixel of the grey ``size x size`` thumbnail is above the mean."""
    g = np.asarray(im.convert("L").resize((size, size), Image.Resampling.LANCZOS),
                   dtype=np.float32)
    bits = (g > g.mean()).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _colour_thumb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)


# -- lint --------------------------------------------------------------------------------
@dataclass
class Finding:
    """One problem: ``level`` "error" or "warning", the ``check`` that found it, the file
    (relative to the folder) and what to do."""

    level: str
    check: str
    path: str
    message: str


@dataclass
class LintReport:
    folder: Path
    layout: str
    images: int = 0
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, check: str, path: str, message: str) -> None:
        self.findings.append(Finding(level, check, path, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> str:
        """The summary table (one row per check that found something) and every finding."""
        counts: dict[tuple[str, str], int] = {}
        for f in self.findings:
            counts[(f.check, f.level)] = counts.get((f.check, f.level), 0) + 1
        lines = [f"{self.folder}: {self.images} images, layout {self.layout}",
                 f"{'check':<18} {'level':<8} {'files':>5}"]
        lines += [f"{c:<18} {lv:<8} {n:>5}" for (c, lv), n in sorted(counts.items())]
        if not counts:
            lines.append(f"{'(none)':<18} {'':<8} {0:>5}")
        lines.append("")
        for f in sorted(self.findings, key=lambda f: (f.level != "error", f.path, f.check)):
            lines.append(f"{f.level}: {f.path}: [{f.check}] {f.message}")
        lines.append(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def _caption_problems(text: str) -> str | None:
    """A hint when decoded caption text looks garbled (mojibake, replacement or control
    characters), else None."""
    if "\ufffd" in text:
        return "holds U+FFFD replacement characters (text was decoded wrongly before)"
    if any(m in text for m in ("Ã©", "Ã¨", "Ã¤", "Ã¶", "Ã¼", "â€", "Ã±")):
        return "looks double-encoded (mojibake such as 'Ã©'); fix: re-save it as plain UTF-8"
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return "holds control characters"
    return None


def _read_caption(report: LintReport, path: Path, rel: str) -> str | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        report.add("error", "caption-encoding", rel,
                   f"line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); fix: save it as "
                   f"UTF-8 (iconv -f cp1252 -t utf-8)")
        return None
    hint = _caption_problems(text)
    if hint:
        report.add("warning", "caption-encoding", rel, hint)
    return text.strip()


def lint(folder: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE,
         near_bits: int = NEAR_DUPLICATE_BITS, max_image_pixels: int | None = None
         ) -> LintReport:
    """Check a dataset folder for everything that trains badly or not at all.

    Errors (the dataset cannot train as it is): unreadable or truncated images, images larger
    than ``max_image_pixels``, a missing caption where the layout needs one, a caption or
    metadata file that is not UTF-8 (or does not parse), a metadata row naming a missing file.
    Warnings: empty captions, exact and near duplicates, images with a short side below
    ``min_size``, colour modes other than RGB, EXIF rotation, garbled caption text, files that
    are not part of the dataset (stray files, captions without an image, images the metadata
    does not list).
    """
    cfg = folder_config(folder)
    data = Path(cfg.train_data_dir)
    if cfg.task != "image":
        raise ConfigError(f"{data} holds no images: `lora data lint` checks image datasets "
                          f"(text datasets are checked by `lora config`)")
    layout = image_layout(cfg)
    report = LintReport(folder=data, layout=layout)
    all_files = sorted(p for p in data.rglob("*") if p.is_file()
                       and not any(part.startswith(".") and part not in (".", "..")
                                   for part in p.relative_to(data).parts[:-1]))
    # captions, per layout; `listed` are the images the dataset trains on
    if layout == "kohya":
        listed, used = _lint_kohya_captions(report, data)
    else:
        listed, used = _lint_metadata(report, cfg, data, layout)
    used.update(listed)
    report.images = len({p.resolve() for p in listed})
    # images: readable, size, mode, EXIF, duplicates (listed images and stray images alike)
    images = [p for p in all_files if is_image_file(p)]
    hashes = _lint_images(report, data, images, max_image_pixels or cfg.max_image_pixels,
                          min_size)
    _lint_near_duplicates(report, data, hashes, near_bits)
    _lint_stray_files(report, data, all_files, used, layout)
    return report


def _lint_kohya_captions(report: LintReport, data: Path) -> tuple[list[Path], set[Path]]:
    """Captions of a kohya layout (sidecar files): ambiguous, empty or missing ones. Returns
    the images the dataset trains on and the caption files it uses."""
    def rel(p: Path) -> str:
        return p.relative_to(data).as_posix()

    listed: list[Path] = []
    used: set[Path] = set()
    entries = kohya_entries(data, captions=False)
    sidecars = {}
    for e in entries:
        found = [e["image"].with_suffix(s) for s in CAPTION_SUFFIXES
                 if e["image"].with_suffix(s).is_file()]
        if len(found) > 1:
            report.add("error", "caption-ambiguous", rel(e["image"]),
                       f"two caption files ({', '.join(f.name for f in found)}); fix: keep "
                       f"one")
        sidecars[e["image"]] = found[0] if found else None
    uses_sidecars = any(sidecars.values())
    for e in entries:
        img, side = e["image"], sidecars[e["image"]]
        listed.append(img)
        if side is not None:
            used.add(side)
            text = _read_caption(report, side, rel(side))
            if text == "":
                report.add("warning", "caption-empty", rel(side),
                           "empty caption (the image trains unconditioned)")
        elif uses_sidecars or e["concept"] is None:
            report.add("error", "caption-missing", rel(img),
                       f"no caption file; fix: write {Path(rel(img)).with_suffix('.txt')} "
                       f"(or run `lora label`)")
    if not entries:
        report.add("error", "empty", ".", "no images directly in the folder or in "
                                          "N_concept folders, and no metadata.csv")
    return listed, used


def _lint_metadata(report: LintReport, cfg, data: Path, layout: str
                   ) -> tuple[list[Path], set[Path]]:
    """The metadata file of a csv/jsonl layout: unreadable, without the image column, rows
    naming no or missing images, images listed twice, empty or garbled captions. Returns the
    images the dataset trains on and the files it uses (the metadata file)."""
    def rel(p: Path) -> str:
        return p.relative_to(data).as_posix()

    listed: list[Path] = []
    try:
        meta, cols, rows = metadata_rows(cfg)
    except ConfigError as exc:
        meta = Path(cfg.metadata_path) if layout == "csv" else data / "metadata.jsonl"
        report.add("error", "caption-encoding" if "UTF-8" in str(exc) else "metadata",
                   rel(meta), exc.detail)
        rows, cols = [], []
    if rows and cfg.image_column not in cols:
        report.add("error", "metadata", rel(meta), f"no {cfg.image_column!r} column "
                                                   f"(columns: {cols})")
        rows = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        name = row.get(cfg.image_column) or ""
        where = f"line {line}"
        if not name:
            report.add("error", "metadata", rel(meta), f"{where} names no image")
            continue
        img = data / name
        if not img.is_file():
            report.add("error", "missing-image", rel(meta),
                       f"{where} names {name!r}, which does not exist; fix: add the image "
                       f"or remove the row")
            continue
        listed.append(img)
        if img.resolve() in seen:
            report.add("warning", "listed-twice", name,
                       f"{where} lists it again (first at line {seen[img.resolve()]})")
        seen.setdefault(img.resolve(), line)
        caption = row.get(cfg.caption_column)
        if caption is None or not caption.strip():
            report.add("warning", "caption-empty", name,
                       f"{where} of {meta.name}: empty caption")
        else:
            hint = _caption_problems(caption)
            if hint:
                report.add("warning", "caption-encoding", name, f"{where}: caption {hint}")
    return listed, {meta}


def _lint_images(report: LintReport, data: Path, images: list[Path], limit: int,
                 min_size: int) -> list[tuple[Path, int, np.ndarray]]:
    """Each image: decodable, not too large, short side, colour mode, EXIF rotation, exact
    duplicates. Returns the distinct decodable images with their dHash and colour thumb."""
    by_sha: dict[str, Path] = {}
    hashes: list[tuple[Path, int, np.ndarray]] = []
    for img in images:
        r = img.relative_to(data).as_posix()
        try:
            with open_image(img, limit) as im:
                im.load()  # decodes everything: a truncated file fails here
                size, mode = im.size, im.mode
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
                rgb = im.convert("RGB")
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            report.add("error", "image-too-large", r, f"{getattr(exc, 'detail', exc)}; fix: "
                                                      f"downscale it")
            continue
        except (OSError, SyntaxError, ValueError) as exc:
            check = "image-truncated" if "truncated" in str(exc).lower() else "image-unreadable"
            report.add("error", check, r, f"cannot be decoded ({exc}); fix: re-export it as "
                                          f"PNG/JPEG or remove it")
            continue
        if min(size) < min_size:
            report.add("warning", "too-small", r, f"{size[0]}x{size[1]}, short side below "
                                                  f"{min_size} px (upscaled when training)")
        if mode != "RGB":
            alpha = "; transparency becomes black" if "A" in mode or mode == "P" else ""
            report.add("warning", "colour-mode", r,
                       f"mode {mode}, not RGB (training converts it{alpha})")
        if orientation not in (1, None):
            report.add("warning", "exif-rotation", r,
                       f"EXIF orientation {orientation}: viewers rotate it, training does not; "
                       f"fix: save it rotated (PIL ImageOps.exif_transpose)")
        digest = hashlib.sha256(img.read_bytes()).hexdigest()
        if digest in by_sha:
            report.add("warning", "duplicate", r,
                       f"same bytes as {by_sha[digest].relative_to(data).as_posix()}")
            continue
        by_sha[digest] = img
        hashes.append((img, dhash(rgb), _colour_thumb(rgb)))
    return hashes


def _lint_near_duplicates(report: LintReport, data: Path,
                          hashes: list[tuple[Path, int, np.ndarray]], near_bits: int) -> None:
    """Pairs whose grey structure is alike (dHash) and with no region of another colour (a
    same-shape, other-colour subject on a shared background is not a duplicate)."""
    for i, (a, ha, ca) in enumerate(hashes):
        for b, hb, cb in hashes[i + 1:]:
            if hamming(ha, hb) <= near_bits and float(np.abs(ca - cb).max()) <= \
                    NEAR_DUPLICATE_COLOUR:
                report.add("warning", "near-duplicate", b.relative_to(data).as_posix(),
                           f"looks like {a.relative_to(data).as_posix()} (dHash distance "
                           f"{hamming(ha, hb)})")


def _lint_stray_files(report: LintReport, data: Path, all_files: list[Path], used: set[Path],
                      layout: str) -> None:
    """Files that are not part of the dataset: unlisted images, captions without an image,
    unused metadata files, anything else."""
    for p in all_files:
        if p in used or p.resolve() in {u.resolve() for u in used}:
            continue
        r = p.relative_to(data).as_posix()
        if is_image_file(p):
            why = ("not listed in the metadata file" if layout != "kohya" else
                   "in a folder that is not an N_concept repeat folder")
            report.add("warning", "not-in-dataset", r, f"image {why}: it does not train")
        elif p.suffix.lower() in CAPTION_SUFFIXES and layout == "kohya" and any(
                p.with_suffix(s).is_file() for s in (".png", ".jpg", ".jpeg", ".webp", ".bmp")):
            continue  # the caption of an image outside the dataset (reported above)
        elif p.suffix.lower() in CAPTION_SUFFIXES and layout == "kohya":
            report.add("warning", "stray-file", r, "caption file without an image")
        elif p.name in METADATA_NAMES:
            report.add("warning", "stray-file", r, f"not used (the layout is {layout})")
        else:
            report.add("warning", "stray-file", r, "not an image, caption or metadata file")


# -- contact sheet -----------------------------------------------------------------------
SHEET_THUMB = 128
SHEET_PAD = 6
SHEET_LINE = 12  # pixels per caption line (PIL's default bitmap font)
SHEET_CAPTION_LINES = 3


def sheet_entries(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(image, caption)`` of every dataset entry (every image file when the folder does not
    validate, with the problem as caption)."""
    cfg = folder_config(folder)
    try:
        return [(e["image"], e["caption"] + (f" (x{e['repeats']})" if e["repeats"] > 1 else ""))
                for e in image_entries(cfg)]
    except ConfigError:
        data = Path(cfg.train_data_dir)
        return [(p, "(no caption)") for p in sorted(data.rglob("*")) if is_image_file(p)]


def sheet_size(n: int, columns: int, thumb: int = SHEET_THUMB) -> tuple[int, int]:
    """Pixel size of a contact sheet of ``n`` images in ``columns`` columns."""
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    return cols * (thumb + 2 * SHEET_PAD), rows * (thumb + 2 * SHEET_PAD
                                                  + SHEET_CAPTION_LINES * SHEET_LINE)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in ``font``: broken at spaces where
    there are any, else between characters (Chinese and Japanese captions have no spaces)."""
    lines: list[str] = []
    line = ""
    for token in (text.split(" ") if " " in text.strip() else list(text)):
        joined = f"{line} {token}" if line and " " in text.strip() else line + token
        if line and font.getlength(joined) > width:
            lines.append(line)
            line = token
        else:
            line = joined
    return [*lines, line] if line else lines


def contact_sheet(folder: str | os.PathLike, out: str | os.PathLike, *, columns: int = 6,
                  thumb: int = SHEET_THUMB, limit: int = 200) -> Path:
    """Write a PNG contact sheet of the dataset: thumbnails (aspect kept) with their captions
    under them (wrapped, at most 3 lines), at most ``limit`` images. Returns ``out``."""
    from PIL import ImageDraw

    from lora_kernel.training.fonts import caption_font

    entries = sheet_entries(folder)[:limit]
    if not entries:
        raise ConfigError(f"{folder} holds no images; nothing to draw")
    w, h = sheet_size(len(entries), columns, thumb)
    cols = max(1, min(columns, len(entries)))
    cell_w, cell_h = w // cols, thumb + 2 * SHEET_PAD + SHEET_CAPTION_LINES * SHEET_LINE
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = caption_font(SHEET_LINE - 2)  # CJK captions too (Debian's fonts, not fetched)
    for i, (img, caption) in enumerate(entries):
        x, y = (i % cols) * cell_w + SHEET_PAD, (i // cols) * cell_h + SHEET_PAD
        try:
            with open_image(img) as im:
                t = rgb_image(im)
                t.thumbnail((thumb, thumb))
            sheet.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))
        except (OSError, SyntaxError, ValueError, ImageTooLarge):
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=(200, 0, 0))
            draw.text((x + 4, y + 4), "unreadable", fill=(200, 0, 0), font=font)
        lines = _wrap(caption, font, thumb)[:SHEET_CAPTION_LINES] or [""]
        for k, line in enumerate(lines):
            draw.text((x, y + thumb + 2 + k * SHEET_LINE), line, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


__all__ = ["DatasetDiff", "Finding", "LintReport", "REPEAT_FOLDER", "ahash", "contact_sheet",
           "dataset_ref_digests", "dhash", "diff_digests", "folder_config", "folder_digests",
           "folder_version", "hamming", "lint", "sheet_size"]
