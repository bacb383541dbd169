"""Held-out loss of image runs (``validation_split`` / ``validation_dir``, every
``eval_steps``): the images never trained on, their denoising loss measured at fixed noise,
timesteps and flips (a generator seeded apart from training, the same every time), so the
numbers of one run compare step to step; in TensorBoard (``eval/loss``), the training summary
(``held_out_loss``) and so the run record.

``validation_split`` holds out that fraction of the training folder's images, chosen by the
seed (an image in an ``N_concept`` folder with all its repeats, never trained on);
``validation_dir`` is a folder of its own (any image layout; its files are recorded as
``val:<path>``, :func:`lora_kernel.training.data.validation_paths`).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lora_kernel.common.errors import ConfigError

HELD_OUT_SEED = 15485863  # added to the run's seed: the held-out noise, apart from training


def split_rows(cfg, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(training rows, held-out rows)`` of ``validation_split``: that fraction of the
    distinct images (by path), chosen by the seed; a held-out image is held out with all its
    repeats and measured once."""
    images = sorted({str(r["image"]) for r in rows})
    k = max(1, round(len(images) * cfg.validation_split))
    if k >= len(images):
        raise ConfigError(f"validation_split {cfg.validation_split} of {len(images)} images "
                          f"leaves none to train on; fix: a smaller fraction, or "
                          f"validation_dir", file=cfg.source, key="validation_split")
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    held = {images[i] for i in torch.randperm(len(images), generator=gen)[:k].tolist()}
    train = [r for r in rows if str(r["image"]) not in held]
    seen: set[str] = set()
    out = []
    for r in rows:
        if str(r["image"]) in held and str(r["image"]) not in seen:
            seen.add(str(r["image"]))
            out.append(r)
    return train, out


def held_out_rows(cfg) -> tuple[list[dict], list[dict]]:
    """``(training rows, held-out rows)`` of an image config (no held-out rows without
    ``validation_split`` / ``validation_dir``)."""
    from lora_kernel.training.data import image_entries, read_image_rows, validation_config
    rows = read_image_rows(cfg)
    if getattr(cfg, "validation_dir", None):  # each held-out image once
        return rows, image_entries(validation_config(cfg))
    if getattr(cfg, "validation_split", 0):
        return split_rows(cfg, rows)
    return rows, []


def check_validation_dir(cfg, file: str) -> None:
    """``validation_dir``: a folder with images, not the training folder nor inside it."""
    if not getattr(cfg, "validation_dir", None):
        return
    from lora_kernel.training.data import image_entries, validation_config
    vdir = Path(cfg.validation_dir)
    if not vdir.is_dir():
        raise ConfigError(f"folder not found: {vdir}; fix: create it or correct the path",
                          file=file, key="validation_dir")
    train = Path(cfg.train_data_dir).resolve()
    if vdir.resolve() == train or vdir.resolve().is_relative_to(train):
        raise ConfigError(f"{vdir} is (inside) the training folder {train}: held-out images "
                          f"must not be trained on; fix: move them to a folder of their own, "
                          f"or use validation_split", file=file, key="validation_dir")
    if not image_entries(validation_config(cfg)):
        raise ConfigError(f"{vdir} has no images; fix: put held-out images with captions "
                          f"(metadata.csv or .txt sidecars) in it", file=file,
                          key="validation_dir")


class HeldOut:
    """The held-out examples of an :class:`~lora_kernel.training.image.ImageTask` (indices
    ``first`` .. end of its examples) and their loss history."""

    def __init__(self, task, first: int) -> None:
        self.task, self.first = task, first
        self.history: list[dict] = []
        self.before = self.loss()  # the LoRA as initialised: the base model's loss

    def batches(self) -> list[list[int]]:
        """The held-out indices in batches of ``batch_size`` (one bucket per batch)."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in range(self.first, len(self.task.examples)):
            by_bucket.setdefault(self.task.examples[i].bucket, []).append(i)
        b = self.task.cfg.batch_size
        return [idx[i:i + b] for bucket in sorted(by_bucket)
                for idx in [by_bucket[bucket]] for i in range(0, len(idx), b)]

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the held-out images at fixed noise (eval mode, captions as
        written); touches no RNG of training."""
        from lora_kernel.training.loop import autocast_context
        task, cfg = self.task, self.task.cfg
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + HELD_OUT_SEED)
        task.train_mode(False)
        total, count = 0.0, 0
        try:
            for batch in self.batches():
                with autocast_context(cfg, task.device):
                    total += task.loss(batch, gen).item() * len(batch)
                count += len(batch)
        finally:
            task.train_mode(True)
        return total / max(1, count)

    def after_step(self, step: int, n_steps: int, writer) -> None:
        """Every ``eval_steps`` and at the last step (the first entry: before training)."""
        eval_steps = self.task.cfg.eval_steps
        if not self.history:
            self.history.append({"step": 0, "loss": self.before})
            writer.add_scalar("eval/loss", self.before, 0)
        if (eval_steps and step % eval_steps == 0) or step == n_steps:
            value = self.loss()
            self.history.append({"step": step, "loss": value})
            writer.add_scalar("eval/loss", value, step)
