"""Two simple image statistics that say whether a demo LoRA learned its style and whether the
images still show what the prompt asks for, computed over a "base | LoRA" sample grid.

* **Style: magenta stripe energy** (0 .. ~0.5). Each pixel's *magenta-ness* is
  ``max(0, min(R, B) - G) / 255`` (the demo style's magenta (230, 0, 200) scores 0.78; white,
  grey, black, red, green, blue, yellow, orange and cyan score 0 .. 0.12). The measure is the
  amplitude of the magenta map's 2-D Fourier component at the demo stripes' frequency
  (``STRIPE_PERIOD`` px along x and y: diagonal stripes), summed over that bin and its eight
  neighbours: ``2 * sqrt(sum |F(k)|^2) / (H * W)``. Flat images, and magenta blobs without
  stripes, score ~0; the demo dataset's images score ~0.3 (their shape covers part of the
  stripes).
* **Prompt adherence: dominant colour of the shape region** (1 or 0 per image). Each pixel is
  given the nearest of the palette's reference colours (the six demo colours, the scenes'
  backgrounds, the style's magenta, dark ground and white rim); the shape region is the
  pixels nearest one of the six demo colours (within ``COLOUR_RADIUS``), less the
  background (the reference colour most frequent on the image's border); an image adheres when
  that region covers at least ``MIN_SHAPE_FRACTION`` of it and its most frequent colour is the
  colour the prompt names. The grid's adherence is the fraction of images that adhere.

:func:`measure_grid` reports both for the base and the LoRA columns; the demo's floors
(``STYLE_GAIN_FLOOR``, ``ADHERENCE_FLOOR``) are what ``tests/training/test_style_learning.py``
and ``bench/train_quality.py`` hold the training code to.

Runs as: the user (the training loop's sample grid, tests and the bench).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_kernel.training.demo_assets import (
    COLOR_RGB,
    COLORS,
    STRIPE_PERIOD,
    STYLE,
    STYLE_DARK,
    STYLE_MAGENTA,
)

# the LoRA column's stripe energy must exceed the base column's by this much ...
STYLE_GAIN_FLOOR = 0.08
# ... while at least this fraction of the LoRA column's images show the prompted colour
ADHERENCE_FLOOR = 0.5
COLOUR_RADIUS = 110.0
MIN_SHAPE_FRACTION = 0.02
OTHER_REFERENCES = {
    "white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128),
    "magenta": STYLE_MAGENTA, "dark": STYLE_DARK,
}


def _as_uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr[..., :3]


def magenta_map(image) -> np.ndarray:
    """Per-pixel magenta-ness, 0..1 (see the module docstring)."""
    rgb = _as_uint8(image).astype(np.float32)
    return np.maximum(0.0, np.minimum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]) / 255.0


def stripe_energy(image, period: int = STRIPE_PERIOD) -> float:
    """The style measure of one image (see the module docstring)."""
    m = magenta_map(image)
    h, w = m.shape
    spec = np.fft.fft2(m) / (h * w)
    fy, fx = round(h / period), round(w / period)
    power = sum(abs(spec[(fy + dy) % h, (fx + dx) % w]) ** 2
                for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return float(2.0 * np.sqrt(power))


def dominant_colour(image) -> tuple[str | None, float]:
    """The most frequent demo colour of the shape region and the region's fraction of the
    image (``None`` when no pixel is near a demo colour). The background is the reference
    colour most frequent on the image's border, and is not part of the shape region."""
    arr = _as_uint8(image).astype(np.float32)
    rgb = arr.reshape(-1, 3)
    names = list(COLORS) + list(OTHER_REFERENCES)
    refs = np.array([COLOR_RGB[c] for c in COLORS] + list(OTHER_REFERENCES.values()),
                    dtype=np.float32)
    dist = np.linalg.norm(rgb[:, None, :] - refs[None, :, :], axis=-1)
    nearest = dist.argmin(axis=1)
    border = np.zeros(arr.shape[:2], bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    background = np.bincount(nearest[border.reshape(-1)], minlength=len(names)).argmax()
    in_shape = ((nearest < len(COLORS)) & (nearest != background)
                & (dist.min(axis=1) <= COLOUR_RADIUS))
    if not in_shape.any():
        return None, 0.0
    counts = np.bincount(nearest[in_shape], minlength=len(COLORS))
    return names[int(counts.argmax())], float(in_shape.mean())


def prompted_colour(prompt: str) -> str | None:
    """The first demo colour word in ``prompt``."""
    return next((w for w in prompt.lower().replace(",", " ").split() if w in COLORS), None)


def adheres(image, prompt: str) -> bool:
    """Whether ``image`` shows the colour ``prompt`` names (see the module docstring)."""
    want = prompted_colour(prompt)
    got, fraction = dominant_colour(image)
    return want is not None and got == want and fraction >= MIN_SHAPE_FRACTION


def measure_images(images: Sequence, prompts: Sequence[str]) -> dict:
    """Mean stripe energy and adherence rate of ``images`` (one prompt each)."""
    style = [stripe_energy(im) for im in images]
    scored = [(im, p) for im, p in zip(images, prompts, strict=True) if prompted_colour(p)]
    adh = [adheres(im, p) for im, p in scored]
    return {"stripe_energy": float(np.mean(style)) if style else 0.0,
            "adherence": float(np.mean(adh)) if adh else None, "images": len(style)}


def demo_style_prompts(prompts: Sequence[str]) -> bool:
    """Whether the measures apply: some prompt names the demo style (``enclave style``)."""
    return any(STYLE in p.lower() for p in prompts)


def measure_grid(rows: Sequence[Sequence], prompts: Sequence[str], n_seeds: int) -> dict:
    """The measures of a sample grid: ``rows[i]`` holds prompt ``i``'s images, ``n_seeds``
    base images then ``n_seeds`` LoRA images. Returns ``base`` and ``lora`` measures,
    ``style_gain`` (LoRA minus base stripe energy), the floors and a one-line definition."""
    base = measure_images([im for r in rows for im in r[:n_seeds]],
                          [p for p in prompts for _ in range(n_seeds)])
    lora = measure_images([im for r in rows for im in r[n_seeds:]],
                          [p for p in prompts for _ in range(n_seeds)])
    return {"base": base, "lora": lora,
            "style_gain": lora["stripe_energy"] - base["stripe_energy"],
            "style_gain_floor": STYLE_GAIN_FLOOR, "adherence_floor": ADHERENCE_FLOOR,
            "definition": "stripe_energy: Fourier amplitude of the magenta map at the style's "
                          f"stripe frequency ({STRIPE_PERIOD} px diagonals); adherence: share "
                          "of images whose shape region's dominant colour is the prompted one "
                          "(lora_kernel/training/style_metrics.py)"}


def summary_line(measures: dict) -> str:
    """One line for the end of a run: the style and adherence measures, base vs LoRA (a text
    run's measures: :func:`lora_kernel.training.text_metrics.summary_line`)."""
    if measures.get("kind") == "text_exact_match":
        from lora_kernel.training.text_metrics import summary_line as text_line
        return text_line(measures)
    b, lo = measures["base"], measures["lora"]

    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"
    return (f"style (magenta stripe energy): base {b['stripe_energy']:.3f} -> LoRA "
            f"{lo['stripe_energy']:.3f} (gain {measures['style_gain']:+.3f}, floor "
            f"{measures['style_gain_floor']:+.3f}); prompt adherence (shape colour): base "
            f"{pct(b['adherence'])}, LoRA {pct(lo['adherence'])} (floor "
            f"{measures['adherence_floor']:.0%})")


def image_dataset_measures(folder, period: int = STRIPE_PERIOD) -> float:
    """Mean stripe energy of the PNGs in ``folder`` (the demo dataset: the style's target)."""
    from pathlib import Path

    from PIL import Image

    vals = [stripe_energy(np.asarray(Image.open(p).convert("RGB")), period)
            for p in sorted(Path(folder).glob("*.png"))]
    return float(np.mean(vals)) if vals else 0.0

