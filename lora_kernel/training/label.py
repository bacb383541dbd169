"""Auto-labeling: CLIP zero-shot tagging over an editable tag vocabulary (and, optionally,
captions from a local BLIP-family model), written as ``metadata.csv`` (``file_name,text``) or
kohya ``.txt`` sidecars.

Local files only: models load with ``local_files_only=True`` from ``.safetensors`` weights,
after :func:`lora_kernel.training.model_safety.check_model_path` has refused pickles and
remote code. Labeling is resumable: images that already have a caption are skipped (unless
``overwrite``), and results are written after every batch, atomically (a temp file renamed into
place), so an interrupted run loses at most one batch.

Tag scores: each tag becomes the prompt ``template.format(tag)`` ("a photo of {}"); an image's
scores are the softmax over the whole vocabulary of CLIP's scaled cosine similarities. The
caption is the trigger word, then the generated caption (if any), then the ``top_k`` best
tags scoring at least ``threshold`` (always at least the best one), comma-separated.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.data import (
    CAPTION_SUFFIXES,
    is_image_file,
    kohya_entries,
    open_image,
    read_csv_rows,
    rgb_image,
)

logger = logging.getLogger(__name__)

REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
DEFAULT_VOCAB = REPO_TEMPLATES / "tags.txt"
DEFAULT_TEMPLATE = "a photo of {}"
FORMATS = ("csv", "txt")


def load_vocab(path: str | os.PathLike | None = None) -> list[str]:
    """Tags of a vocabulary file: one per line, ``#`` comments and blank lines skipped,
    duplicates dropped (first kept). Default: ``templates/tags.txt``."""
    from lora_kernel.training.data import read_dataset_text

    p = Path(path) if path else DEFAULT_VOCAB
    if not p.is_file():
        raise ConfigError(f"tag vocabulary not found: {p}; fix: give --vocab FILE (one tag per "
                          f"line; templates/tags.txt is an example)")
    tags: list[str] = []
    for line in read_dataset_text(p, key="vocab").splitlines():
        tag = line.split("#", 1)[0].strip()
        if tag and tag not in tags:
            tags.append(tag)
    if not tags:
        raise ConfigError(f"{p} holds no tags; fix: write one tag per line")
    return tags


def check_local_model(path: str | os.PathLike, what: str = "--model") -> Path:
    """A local model folder safe to load: exists, no pickle-only weights, no remote code
    (:class:`UnsafeModelError`, exit 3) and ``.safetensors`` weights present (else
    :class:`ConfigError`)."""
    from lora_kernel.training.model_safety import check_model_path

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{what}: model folder not found: {p}; fix: copy a Hugging Face model "
                          f"folder (config.json, *.safetensors, tokenizer and preprocessor "
                          f"files) here; nothing is downloaded", key=what.lstrip("-"))
    p = check_model_path(p)  # pickles and remote code: UnsafeModelError
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"{what}: {p} has no .safetensors weights; fix: convert the model to "
                          f"safetensors on a trusted machine and copy the folder here",
                          key=what.lstrip("-"))
    return p


def _device(device: str | None):
    import torch
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ClipTagger:
    """Zero-shot tags from a local CLIP model folder."""

    def __init__(self, model_dir: str | os.PathLike, tags: Sequence[str], *,
                 template: str = DEFAULT_TEMPLATE, device: str | None = None) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        path = check_local_model(model_dir)
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True,
                                               use_safetensors=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.tags = list(tags)
        if "{}" not in template:
            raise ConfigError(f"--template {template!r} has no {{}} for the tag; fix: e.g. "
                              f"'{DEFAULT_TEMPLATE}'")
        prompts = [template.format(t) for t in self.tags]
        with torch.inference_mode():
            feats = []
            for i in range(0, len(prompts), 256):
                enc = self.processor.tokenizer(prompts[i:i + 256], padding=True,
                                               truncation=True, return_tensors="pt")
                out = self.model.get_text_features(**enc.to(self.device))
                feats.append(getattr(out, "pooler_output", out))
            t = torch.cat(feats)
            self.text = t / t.norm(dim=-1, keepdim=True)

    def scores(self, images: Sequence) -> list[list[tuple[str, float]]]:
        """For each PIL image, every ``(tag, probability)``, best first."""
        import torch
        with torch.inference_mode():
            px = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=px.to(self.device))
            f = getattr(out, "pooler_output", out)
            f = f / f.norm(dim=-1, keepdim=True)
            probs = (self.model.logit_scale.exp() * f @ self.text.T).softmax(dim=-1).cpu()
        out_scores = []
        for row in probs.tolist():
            pairs = sorted(zip(self.tags, row, strict=True), key=lambda p: -p[1])
            out_scores.append([(t, float(s)) for t, s in pairs])
        return out_scores

    def tag(self, images: Sequence, *, threshold: float = 0.0, top_k: int = 8
            ) -> list[list[str]]:
        """For each image, its ``top_k`` best tags scoring at least ``threshold`` (at least
        the best one)."""
        out = []
        for pairs in self.scores(images):
            chosen = [t for t, s in pairs[:top_k] if s >= threshold] or [pairs[0][0]]
            out.append(chosen)
        return out


class Captioner:
    """Captions from a local BLIP-family model (``BlipForConditionalGeneration``)."""

    def __init__(self, model_dir: str | os.PathLike, *, device: str | None = None,
                 max_new_tokens: int = 30) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        path = check_local_model(model_dir, what="--caption-model")
        self.device = _device(device)
        self.model = BlipForConditionalGeneration.from_pretrained(
            path, local_files_only=True, use_safetensors=True).to(self.device).eval()
        self.processor = BlipProcessor.from_pretrained(path, local_files_only=True)
        self.max_new_tokens = max_new_tokens

    def caption(self, images: Sequence) -> list[str]:
        import torch
        with torch.inference_mode():
            enc = self.processor(images=list(images), return_tensors="pt").to(self.device)
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def compose_caption(tags: Sequence[str], *, trigger: str | None = None,
                    caption: str | None = None) -> str:
    """``trigger, caption, tag, tag, ...`` (empty parts and repeats dropped; trigger first)."""
    parts: list[str] = []
    for p in [trigger, caption, *tags]:
        p = (p or "").strip()
        if p and p not in parts:
            parts.append(p)
    return ", ".join(parts)


# -- which images, which are done ----------------------------------------------------------
def folder_images(folder: Path, fmt: str) -> list[Path]:
    """The images to label. ``txt``: those a kohya-layout dataset trains on (the folder and its
    ``N_concept`` folders); ``csv``: every image under the folder (hidden folders skipped)."""
    if fmt == "txt":
        return [e["image"] for e in kohya_entries(folder, captions=False)]
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(s.startswith(".") for s in p.relative_to(folder).parts))


class _CsvSink:
    """``metadata.csv`` kept in memory, rewritten atomically after each batch; rows the
    file already had (and their other columns) are kept in place."""

    def __init__(self, folder: Path, image_column: str, caption_column: str) -> None:
        self.path = folder / "metadata.csv"
        self.image_column, self.caption_column = image_column, caption_column
        self.cols, self.rows = [image_column, caption_column], []
        if self.path.is_file():
            cols, rows = read_csv_rows(self.path)
            self.cols = cols + [c for c in self.cols if c not in cols]
            self.rows = [dict(r) for _, r in rows]
        self.index = {r.get(image_column): r for r in self.rows}

    def done(self, rel: str) -> bool:
        row = self.index.get(rel)
        return bool(row and (row.get(self.caption_column) or "").strip())

    def put(self, rel: str, caption: str) -> None:
        row = self.index.get(rel)
        if row is None:
            row = {c: "" for c in self.cols}
            row[self.image_column] = rel
            self.rows.append(row)
            self.index[rel] = row
        row[self.caption_column] = caption

    def flush(self) -> None:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=self.cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: (r.get(c) or "") for c in self.cols})
        atomic_write(self.path, out.getvalue())


class _TxtSink:
    """One ``<stem>.txt`` per image, written atomically as soon as its batch is done."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.pending = folder, []

    def done(self, rel: str) -> bool:
        img = self.folder / rel
        return any(img.with_suffix(s).is_file() and img.with_suffix(s).read_bytes().strip()
                   for s in CAPTION_SUFFIXES)

    def put(self, rel: str, caption: str) -> None:
        self.pending.append((self.folder / rel, caption))

    def flush(self) -> None:
        for img, caption in self.pending:
            atomic_write(img.with_suffix(".txt"), caption + "\n")
        self.pending = []


def _check_format_fits(data: Path, fmt: str) -> None:
    """Refuse writing captions training would not read: sidecars next to a ``metadata.csv``
    (which wins), or a ``metadata.csv`` over a kohya folder (repeat folders and existing
    sidecars would silently stop counting)."""
    from lora_kernel.training.data import REPEAT_FOLDER

    meta = data / "metadata.csv"
    if fmt == "txt" and meta.is_file():
        raise ConfigError(f"{meta} exists and training reads it instead of .txt sidecars; fix: "
                          f"use --format csv, or remove {meta.name} to switch to sidecars")
    if fmt == "csv" and not meta.is_file():
        repeat = [p.name for p in data.iterdir() if p.is_dir() and REPEAT_FOLDER.match(p.name)]
        sidecars = [e["image"].name for e in kohya_entries(data, captions=False)
                    if any(e["image"].with_suffix(s).is_file() for s in CAPTION_SUFFIXES)]
        if repeat or sidecars:
            what = (f"repeat folders ({', '.join(sorted(repeat)[:3])})" if repeat else
                    f"caption sidecars ({', '.join(sidecars[:3])})")
            raise ConfigError(f"{data} is a kohya-layout dataset with {what}; a metadata.csv "
                              f"would replace that layout; fix: use --format txt")


@dataclass
class LabelResult:
    """What a labeling pass did: images ``labelled``, ``skipped`` (already captioned),
    ``failed`` (unreadable: ``(file, reason)``), where it wrote, and each new caption."""

    output: Path
    labelled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)


def label_folder(folder: str | os.PathLike, model: str | os.PathLike, *,
                 vocab: str | os.PathLike | Sequence[str] | None = None,
                 trigger: str | None = None, fmt: str = "csv", threshold: float = 0.02,
                 top_k: int = 8, batch_size: int = 16, overwrite: bool = False,
                 caption_model: str | os.PathLike | None = None,
                 template: str = DEFAULT_TEMPLATE, device: str | None = None,
                 progress: bool = True, image_column: str = "file_name",
                 caption_column: str = "text",
                 on_batch: Callable[[LabelResult], None] | None = None) -> LabelResult:
    """Tag (and optionally caption) every image of ``folder`` with a local CLIP model and write
    the captions (``fmt``: ``csv`` -> ``metadata.csv``, ``txt`` -> ``.txt`` sidecars).

    Images already captioned are skipped unless ``overwrite``; captions are written after
    every batch. Unreadable images are reported in :attr:`LabelResult.failed`, not fatal.
    """
    from tqdm.auto import tqdm

    from lora_kernel.common.offline import apply_offline_env

    apply_offline_env()
    data = Path(folder)
    if not data.is_dir():
        raise ConfigError(f"folder not found: {data}; fix: give the image folder to label")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if batch_size < 1 or top_k < 1 or not 0.0 <= threshold <= 1.0:
        raise ConfigError("--batch-size and --top-k must be at least 1, --threshold in [0, 1]")
    _check_format_fits(data, fmt)
    tags = list(vocab) if isinstance(vocab, (list, tuple)) else load_vocab(vocab)
    images = folder_images(data, fmt)
    if not images:
        raise ConfigError(f"{data} holds no images (PNG/JPEG/WebP/BMP) to label")
    sink: _CsvSink | _TxtSink = (_CsvSink(data, image_column, caption_column) if fmt == "csv"
                                 else _TxtSink(data))
    result = LabelResult(output=sink.path if isinstance(sink, _CsvSink) else data)
    todo = []
    for img in images:
        rel = img.relative_to(data).as_posix()
        if not overwrite and sink.done(rel):
            result.skipped.append(rel)
        else:
            todo.append((img, rel))
    if not todo:
        return result
    tagger = ClipTagger(model, tags, template=template, device=device)
    captioner = Captioner(caption_model, device=device) if caption_model else None
    bar = tqdm(total=len(todo), unit="img", desc="labeling", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch, pics = [], []
            for img, rel in todo[start:start + batch_size]:
                try:
                    with open_image(img) as im:
                        pics.append(rgb_image(im))
                    batch.append(rel)
                except (OSError, SyntaxError, ValueError, ConfigError) as exc:
                    result.failed.append((rel, str(exc)))
                    logger.warning("skipping %s: %s", rel, exc)
            if pics:
                chosen = tagger.tag(pics, threshold=threshold, top_k=top_k)
                caps = captioner.caption(pics) if captioner else [None] * len(pics)
                for rel, t, c in zip(batch, chosen, caps, strict=True):
                    text = compose_caption(t, trigger=trigger, caption=c)
                    sink.put(rel, text)
                    result.labelled.append(rel)
                    result.captions[rel] = text
                sink.flush()
            bar.update(len(todo[start:start + batch_size]))
            if on_batch is not None:
                on_batch(result)
    finally:
        bar.close()
    return result


# -- notebook helpers (notebooks/auto_label.ipynb) -----------------------------------------
def prepare_notebook(image_dir: str | os.PathLike = "", clip_model: str | os.PathLike = "",
                     home: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(image folder, CLIP folder)`` for the auto-label notebook. An empty ``image_dir``: a
    copy of the demo images, without captions, in ``<home>/label-demo/images`` (the demo
    dataset itself is never touched); an empty ``clip_model``: the demo CLIP of
    :func:`~lora_kernel.training.demo_assets.write_demo_clip` in
    ``<home>/demo/models/tiny-clip`` (it tells red, green and blue apart)."""
    import shutil

    from lora_kernel.common.paths import lora_home
    from lora_kernel.training.demo_assets import demo_dir, write_demo_clip, write_image_dataset

    root = lora_home(home)
    if image_dir:
        images = Path(image_dir)
    else:
        images = root / "label-demo" / "images"
        if not images.is_dir():
            src = demo_dir(home) / "datasets" / "image"
            if not src.is_dir():
                write_image_dataset(root / "label-demo" / "source")
                src = root / "label-demo" / "source"
            images.mkdir(parents=True)
            for p in sorted(src.iterdir()):
                if is_image_file(p):
                    shutil.copy2(p, images / p.name)
    if clip_model:
        model = Path(clip_model)
    else:
        model = demo_dir(home) / "models" / "tiny-clip"
        if not (model / "model.safetensors").is_file():
            write_demo_clip(model, seed=0)
    return images, model


def read_captions(folder: str | os.PathLike, fmt: str = "csv") -> dict[str, str]:
    """``{relative image path: caption}`` of every image of ``folder`` (``""``: none yet)."""
    data = Path(folder)
    out = {}
    sink = _CsvSink(data, "file_name", "text") if fmt == "csv" else None
    for img in folder_images(data, fmt):
        rel = img.relative_to(data).as_posix()
        if sink is not None:
            out[rel] = (sink.index.get(rel) or {}).get("text") or ""
        else:
            side = next((img.with_suffix(s) for s in CAPTION_SUFFIXES
                         if img.with_suffix(s).is_file()), None)
            out[rel] = side.read_text(encoding="utf-8-sig").strip() if side else ""
    return out


def write_captions(folder: str | os.PathLike, captions: dict[str, str], fmt: str = "csv"
                   ) -> None:
    """Write edited captions back (atomically), in ``fmt``."""
    data = Path(folder)
    sink: _CsvSink | _TxtSink = (_CsvSink(data, "file_name", "text") if fmt == "csv"
                                 else _TxtSink(data))
    for rel, text in captions.items():
        sink.put(rel, text.strip())
    sink.flush()


def preview(folder: str | os.PathLike, *, limit: int = 24, columns: int = 6):
    """A contact sheet (thumbnails with captions) of ``folder`` as an IPython image."""
    import tempfile

    from IPython.display import Image as IPImage

    from lora_kernel.training.datatools import contact_sheet
    with tempfile.TemporaryDirectory() as tmp:
        path = contact_sheet(folder, Path(tmp) / "sheet.png", columns=columns, limit=limit)
        return IPImage(data=path.read_bytes())


def caption_editor(folder: str | os.PathLike, fmt: str = "csv", *, limit: int = 48):
    """An ipywidgets editor: one thumbnail and Textarea per image, and a Save button that
    writes the edited captions back (``fmt``)."""
    import ipywidgets as w

    data = Path(folder)
    captions = read_captions(data, fmt)
    rows, areas = [], {}
    for rel in list(captions)[:limit]:
        buf = io.BytesIO()
        with open_image(data / rel) as im:
            t = rgb_image(im)
            t.thumbnail((96, 96))
            t.save(buf, format="PNG")
        areas[rel] = w.Textarea(value=captions[rel], layout=w.Layout(width="480px"))
        rows.append(w.HBox([w.Image(value=buf.getvalue(), format="png"),
                            w.VBox([w.Label(rel), areas[rel]])]))
    status = w.Label("")
    save = w.Button(description="Save captions", button_style="primary")

    def on_save(_):
        write_captions(data, {rel: a.value for rel, a in areas.items()}, fmt)
        status.value = f"saved {len(areas)} captions"

    save.on_click(on_save)
    return w.VBox([*rows, w.HBox([save, status])])
