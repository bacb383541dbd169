"""lora_kernel.training.style_metrics: the style measure tells striped from plain images and the
adherence measure reads the shape's colour; the demo LoRA raises the style measure over the
pre-trained base by the stated margin while the images keep the prompted colour, and the same
run with a zero learning rate fails that check."""
from __future__ import annotations

import numpy as np
import pytest

from lora_kernel.training import demo_assets, style_metrics
from lora_kernel.training.demo_pretrain import draw_scene


def _scene(color="red", shape="circle", background="white"):
    return np.asarray(draw_scene(demo_assets.COLOR_RGB[color], shape, "middle", background))


def test_the_style_measure_is_high_on_the_demo_style_and_near_zero_without_it():
    styled = [np.asarray(demo_assets.draw_image(c, s, i)) for i, (s, c) in enumerate(
        (s, c) for s in demo_assets.SHAPES for c in demo_assets.COLORS)]
    plain = [_scene(c, s, b) for c in demo_assets.COLORS for s in demo_assets.SHAPES
             for b in ("white", "black", "gray")]
    assert min(style_metrics.stripe_energy(im) for im in styled) > 0.2
    assert max(style_metrics.stripe_energy(im) for im in plain) < 0.02
    # a magenta image without stripes is not the style
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[...] = demo_assets.STYLE_MAGENTA
    assert style_metrics.stripe_energy(flat) < 0.02


def test_adherence_reads_the_shape_colour_on_plain_and_styled_images():
    for color in demo_assets.COLORS:
        for background in ("white", "black", "gray"):
            assert style_metrics.dominant_colour(_scene(color, "square", background))[0] == color
        styled = np.asarray(demo_assets.draw_image(color, "circle", 3))
        assert style_metrics.adheres(styled, f"a {color} circle in enclave style")
    assert not style_metrics.adheres(_scene("red"), "a blue circle")
    assert not style_metrics.adheres(np.full((64, 64, 3), 240, np.uint8), "a red circle")


def test_measure_grid_splits_base_and_lora_columns():
    plain = _scene("blue", "square")
    styled = np.asarray(demo_assets.draw_image("blue", "square", 0))
    m = style_metrics.measure_grid([[plain, styled]], ["a blue square in enclave style"], 1)
    assert m["base"]["stripe_energy"] < 0.02 < 0.2 < m["lora"]["stripe_energy"]
    assert m["base"]["adherence"] == m["lora"]["adherence"] == 1.0
    assert m["style_gain"] > style_metrics.STYLE_GAIN_FLOOR
    assert "style (magenta stripe energy)" in style_metrics.summary_line(m)
    assert style_metrics.demo_style_prompts(["a red circle in enclave style"])
    assert not style_metrics.demo_style_prompts(["a red circle"])


@pytest.fixture(scope="module")
def style_runs(demo_home, tmp_path_factory):
    """The demo image config trained twice: as shipped, and with learning_rate 1e-8 (it
    learns nothing; 0 is refused)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train

    out = {}
    for name, lr in (("trained", None), ("frozen", 1e-8)):
        over = {"output_dir": str(tmp_path_factory.mktemp(f"style-{name}")), "save_steps": 0}
        if lr is not None:
            over["learning_rate"] = lr
        cfg = load_config(demo_home / "demo" / "image_lora.yaml", over)
        out[name] = train(cfg, progress=False, home=demo_home, log=lambda m: None).samples
    return out


def assert_lora_learned_the_style(samples: dict) -> None:
    """The check the demo's run is held to (see style_metrics' module docstring)."""
    m = samples["measures"]
    assert m["style_gain"] >= style_metrics.STYLE_GAIN_FLOOR, m
    assert m["lora"]["adherence"] >= style_metrics.ADHERENCE_FLOOR, m


@pytest.mark.slow
def test_the_demo_lora_learns_the_style_and_keeps_the_prompted_colour(style_runs):
    samples = style_runs["trained"]
    assert_lora_learned_the_style(samples)
    # the base column shows the prompted colours without the style
    assert samples["measures"]["base"]["adherence"] >= style_metrics.ADHERENCE_FLOOR
    assert samples["measures"]["base"]["stripe_energy"] < 0.05


@pytest.mark.slow
def test_a_run_that_does_not_learn_fails_the_check(style_runs):
    with pytest.raises(AssertionError):
        assert_lora_learned_the_style(style_runs["frozen"])
