"""The demo CLIP for ``lora label``: the tiny CLIP architecture of
:func:`lora_kernel.training.demo_assets.tiny_clip_model`, trained here for a few seconds with
CLIP's contrastive loss on drawn squares and circles against "a photo of red/green/blue", so
that zero-shot tagging of the demo images says their colour. Built by ``lora demo-assets``
into ``demo/models/tiny-clip`` (and into the hub's shared store by ``make hub``).

Deterministic: one thread, a fixed seed, fixed drawings; the same seed gives the same bytes.

Runs as: whoever builds the demo assets (the user, or the admin running ``make hub``).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "SHAPES", "draw_shape", "train_tiny_clip", "write_demo_clip"]

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230)}
SHAPES = ("square", "circle")
TEMPLATE = "a photo of {}"
STEPS = 60


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 48) -> Image.Image:
    """A ``colour`` ``shape`` of random size and place on a light grey ground."""
    im = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(im)
    r, cx, cy = rng.randint(12, 18), rng.randint(20, 28), rng.randint(20, 28)
    box = [cx - r, cy - r, cx + r, cy + r]
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return im


def train_tiny_clip(seed: int = 0, steps: int = STEPS):
    """The tiny CLIP trained to tell red, green and blue shapes apart; returns
    ``(model in eval mode, final contrastive loss)``."""
    import numpy as np
    import torch
    from transformers import CLIPTokenizer

    from lora_kernel.training.demo_assets import (
        CLIP_IMAGE_SIZE,
        CLIP_MEAN,
        CLIP_STD,
        tiny_clip_model,
        write_clip_tokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok"),
                                            local_files_only=True)
    model = tiny_clip_model(seed=seed)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def pixels(im: Image.Image) -> torch.Tensor:
        arr = np.asarray(im.resize((CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE),
                                   Image.Resampling.BICUBIC), dtype=np.float32)
        return (torch.from_numpy(arr / 255).permute(2, 0, 1) - mean) / std

    rng = random.Random(seed)
    bank = {c: [pixels(draw_shape(c, s, rng)) for s in SHAPES for _ in range(4)]
            for c in COLOURS}
    enc = tok([TEMPLATE.format(c) for c in COLOURS], padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: faster, and the same bytes on every run
    loss = torch.tensor(float("nan"))
    try:
        for _ in range(steps):
            pv = torch.stack([bank[c][rng.randrange(8)] for c in COLOURS])
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         pixel_values=pv, return_loss=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), float(loss.item())


def write_demo_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Train (:func:`train_tiny_clip`) and write the demo CLIP to ``folder``."""
    from lora_kernel.training.demo_assets import write_clip_folder

    model, _loss = train_tiny_clip(seed)
    return write_clip_folder(model, folder)
