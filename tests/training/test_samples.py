"""Sample grids say what they show: a "base | LoRA" header over the two column groups, each
row's prompt in a left margin, and ``samples.json`` naming prompts, seeds and columns; the
bytes stay the same for the same images (no timestamps)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lora_kernel.training.image import labelled_grid

CELL = 32


def _cells(n_rows: int, n_cols: int) -> list[list[Image.Image]]:
    """Solid-colour cells, each distinct, none white or black."""
    return [[Image.new("RGB", (CELL, CELL), (40 + 50 * c, 90 + 60 * r, 120))
             for c in range(n_cols)] for r in range(n_rows)]


def _plain(rows: list[list[Image.Image]]) -> np.ndarray:
    """What the grid was before labels: the cells side by side, rows stacked."""
    return np.concatenate([np.concatenate([np.asarray(i) for i in r], axis=1) for r in rows])


def _dark(region: Image.Image) -> int:
    """How many pixels of ``region`` are text-dark."""
    return int((np.asarray(region.convert("L")) < 80).sum())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_header_and_prompt_margin_frame_the_unchanged_cells():
    rows = _cells(2, 4)  # 2 prompts x (2 seeds without, 2 seeds with the LoRA)
    grid, geo = labelled_grid(rows, ["a red circle", "a blue square"])
    head, margin = geo["header_height"], geo["margin_width"]
    assert head > 0 and margin > 0 and geo["cell"] == [CELL, CELL]
    assert grid.size == (margin + 4 * CELL, head + 2 * CELL)  # grew by the labels only
    # the images themselves are untouched, at the stated offsets
    assert np.array_equal(np.asarray(grid)[head:, margin:], _plain(rows))
    # a label over each column group, nothing over the margin's corner
    assert _dark(grid.crop((margin, 0, margin + 2 * CELL, head))) > 20      # "base"
    assert _dark(grid.crop((margin + 2 * CELL, 0, grid.width, head))) > 20  # "LoRA"
    assert _dark(grid.crop((0, 0, margin - 1, head))) == 0
    for r in range(2):  # each row's prompt, in its own band of the margin
        assert _dark(grid.crop((0, head + r * CELL, margin - 1, head + (r + 1) * CELL))) > 20
    # the two labels are different words
    left = np.asarray(grid.crop((margin, 0, margin + 2 * CELL, head)))
    right = np.asarray(grid.crop((margin + 2 * CELL, 0, grid.width, head)))
    assert not np.array_equal(left, right)


def test_long_or_foreign_prompts_are_truncated_to_the_margin():
    long = "an extraordinarily detailed photograph of " * 6
    grid, geo = labelled_grid(_cells(2, 2), [long, "café ☕ 猫\nnew line"])
    assert geo["margin_width"] <= 192  # a long prompt does not widen the grid without bound
    assert grid.width == geo["margin_width"] + 2 * CELL
    short, _ = labelled_grid(_cells(2, 2), ["a", "b"])
    assert short.width < grid.width  # and the rows stay one cell high, whatever the font:
    assert grid.height - geo["header_height"] == short.height - _["header_height"] == 2 * CELL


def test_same_images_same_bytes_and_bad_shapes_refused():
    rows = _cells(2, 2)
    first = _png(labelled_grid(rows, ["x", "y"])[0])
    assert first == _png(labelled_grid(_cells(2, 2), ["x", "y"])[0])
    assert first != _png(labelled_grid(rows, ["x", "z"])[0])  # the prompt is drawn
    with pytest.raises(ValueError, match="2 rows for 1 prompts"):
        labelled_grid(rows, ["x"])
    with pytest.raises(ValueError, match="split evenly"):
        labelled_grid(_cells(1, 3), ["x"])


def test_sample_grid_on_the_demo_model_writes_labels_and_samples_json(demo_home, tmp_path):
    """The real pipeline on the tiny demo model (no LoRA attached: both halves equal)."""
    import torch

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.image import sample_grid
    from lora_kernel.training.models import load_sd_components

    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(tmp_path / "out"), "sample_steps": 2,
                       "sample_seeds": [0, 1]})
    comps = load_sd_components(cfg.base_model)
    info = sample_grid(cfg, comps, tmp_path / "a", device=torch.device("cpu"))
    saved = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert saved == info
    assert saved["prompts"] == cfg.sample_prompts and saved["seeds"] == [0, 1]
    assert [(c["group"], c["lora"], c["seed"]) for c in saved["columns"]] == [
        ("base", False, 0), ("base", False, 1), ("LoRA", True, 0), ("LoRA", True, 1)]
    assert "header row" in saved["layout"] and "prompt" in saved["layout"]
    grid = Image.open(tmp_path / "a" / "grid.png")
    res = cfg.resolution
    assert grid.size == (saved["margin_width"] + 4 * res,
                         saved["header_height"] + len(cfg.sample_prompts) * res)
    assert _dark(grid.crop((0, saved["header_height"], saved["margin_width"] - 1,
                            grid.height))) > 20
    again = sample_grid(cfg, comps, tmp_path / "b", device=torch.device("cpu"))
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png"
                                                           ).read_bytes()
    assert again["mean_abs_diff"] == info["mean_abs_diff"] == 0.0


def test_chinese_prompts_are_drawn_as_their_characters_not_boxes():
    """Prompts differing in one Chinese character (猫 cat, 狗 dog) give different margins
    with Debian's CJK font; before, both were drawn as the same "?" marks. A Latin-only grid
    keeps the bitmap font (its bytes unchanged)."""
    from osdeps import missing

    from lora_kernel.training.fonts import cjk_font_file

    if cjk_font_file() is None:
        missing("a CJK font (Debian's fonts-droid-fallback)")
    grid, geo = labelled_grid(_cells(2, 2), ["一只猫在草地上", "一只狗在草地上"])
    head, margin = geo["header_height"], geo["margin_width"]
    bands = [np.asarray(grid.crop((0, head + r * CELL, margin - 1, head + (r + 1) * CELL))
                        .convert("L")) for r in range(2)]
    assert all((b < 128).sum() > 20 for b in bands)  # both prompts left ink
    assert (bands[0] != bands[1]).sum() > 10  # 猫 and 狗 are different glyphs
    assert np.array_equal(np.asarray(grid)[head:, margin:], _plain(_cells(2, 2)))
