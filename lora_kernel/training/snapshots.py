"""Feedback during training, as kohya users expect it: a *loadable* adapter (kohya and
diffusers format, named by epoch or step) every ``save_every_n_epochs`` epochs and every
``save_steps`` steps, besides the resume checkpoint; and sample images with the fixed prompts
and seeds every ``sample_every_n_steps`` steps / ``sample_every_n_epochs`` epochs, into
TensorBoard (``samples/grid``) and ``samples/step-N/``.

Everything goes under ``<output_dir>/snapshots/`` (adapters and ``snapshots.json``: per
snapshot its step, epoch, and each file's name and sha256) and ``<output_dir>/samples/``.
Sampling runs with the RNG state forked and the trained modules put back in train mode, so
a run with samples trains the same adapter as one without.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.digests import sha256_file

SNAPSHOT_DIR = "snapshots"
INDEX = "snapshots.json"


def snapshot_stem(output_name: str, step: int, epoch: int | None) -> str:
    """``<output_name>-e0002`` for an epoch's snapshot, ``<output_name>-s000120`` for a
    step's (kohya names its per-epoch files ``<output_name>-000002``)."""
    return f"{output_name}-e{epoch:04d}" if epoch is not None else f"{output_name}-s{step:06d}"


@dataclass
class Snapshots:
    """The snapshot hook of one run: ``export(folder, stem, step, epoch)`` writes the
    adapters and returns ``{format: path}``; ``sample(folder)`` renders the sample grid and
    returns its ``samples.json`` info (None: no samples)."""

    cfg: object
    out: Path
    export: Callable[[Path, str, int, int | None], dict[str, str]]
    sample: Callable[[Path], dict] | None = None
    task: object | None = None
    entries: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        index = self.out / SNAPSHOT_DIR / INDEX
        if index.is_file():  # a resumed run keeps the snapshots it made before
            self.entries = json.loads(index.read_text())["snapshots"]

    @property
    def wanted(self) -> bool:
        """Whether the config asks for any snapshot or sample during training."""
        c = self.cfg
        return bool(getattr(c, "save_every_n_epochs", 0) or c.save_steps
                    or getattr(c, "sample_every_n_steps", 0)
                    or getattr(c, "sample_every_n_epochs", 0))

    def after_step(self, step: int, epochs_before: int, epochs_after: int) -> None:
        """Called by the loop after optimizer step ``step``; ``epochs_after`` >
        ``epochs_before`` when the step finished an epoch."""
        c = self.cfg
        epoch = epochs_after if epochs_after > epochs_before else None
        n_epochs = getattr(c, "save_every_n_epochs", 0)
        by_epoch = bool(epoch and n_epochs and epoch % n_epochs == 0)
        by_step = bool(c.save_steps and step % c.save_steps == 0)
        if by_epoch or by_step:
            self.save(step, epoch if by_epoch else None, epochs_after)
        s_steps, s_epochs = (getattr(c, "sample_every_n_steps", 0),
                             getattr(c, "sample_every_n_epochs", 0))
        if self.sample is not None and ((s_steps and step % s_steps == 0)
                                        or (epoch and s_epochs and epoch % s_epochs == 0)):
            self.draw(step)

    def save(self, step: int, epoch: int | None, epochs_done: int) -> dict:
        """Write a loadable adapter at ``step`` and list it (with sha256) in the index."""
        folder = self.out / SNAPSHOT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        files = self.export(folder, snapshot_stem(self.cfg.output_name, step, epoch), step,
                            epoch)
        entry = {"step": step, "epoch": epoch if epoch is not None else epochs_done,
                 "by": "epoch" if epoch is not None else "step",
                 "files": {fmt: {"name": Path(p).name, "sha256": sha256_file(p)}
                           for fmt, p in sorted(files.items())}}
        self.entries = [e for e in self.entries if e["step"] != step] + [entry]
        self.entries.sort(key=lambda e: e["step"])
        atomic_write(folder / INDEX, json.dumps({"snapshots": self.entries}, indent=1) + "\n")
        return entry

    def draw(self, step: int) -> dict:
        """Render the sample grid at ``step`` into ``samples/step-N/`` and TensorBoard."""
        assert self.sample is not None
        with torch.random.fork_rng(devices=[]):
            info = self.sample(self.out / "samples" / f"step-{step:06d}")
        if self.task is not None:
            self.task.train_mode(True)  # sampling put the text encoders in eval mode
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter
        with Image.open(info["grid"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        writer = SummaryWriter(log_dir=str(self.out / "tb"))
        try:
            writer.add_image("samples/grid", pixels, step, dataformats="HWC")
        finally:
            writer.close()
        return info


def snapshot_for_step(index: dict, step: int) -> dict | None:
    """The snapshot of ``index`` (a ``snapshots.json``) saved at ``step``, or None."""
    return next((e for e in index.get("snapshots", []) if e["step"] == step), None)
