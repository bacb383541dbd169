"""Image preprocessing: square crops, aspect-ratio buckets, bucket-pure batches, cache keys."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.training.checks import load_config
from lora_kernel.training.image import cache_key, load_examples, make_buckets, pick_bucket


def test_buckets_keep_area_and_step():
    buckets = make_buckets(64)
    assert (64, 64) in buckets
    for w, h in buckets:
        assert w % 8 == 0 and h % 8 == 0
        assert 0.75 * 64 * 64 <= w * h <= 64 * 64 * 1.1
        assert max(w / h, h / w) <= 2.0


def test_pick_bucket_follows_aspect_ratio():
    buckets = make_buckets(64)
    wide, tall, square = pick_bucket((200, 100), buckets), pick_bucket((100, 200), buckets), \
        pick_bucket((50, 50), buckets)
    assert wide[0] > wide[1] and tall[1] > tall[0] and square == (64, 64)


@pytest.fixture
def mixed_dataset(tmp_path: Path, demo_home: Path) -> Path:
    """A config over images of three aspect ratios, using the demo model."""
    data = tmp_path / "data"
    data.mkdir()
    rows = ["file_name,text"]
    for i, size in enumerate([(96, 48)] * 3 + [(48, 96)] * 3 + [(64, 64)] * 2):
        Image.new("RGB", size, (40 * i % 255, 90, 200)).save(data / f"{i}.png")
        rows.append(f"{i}.png,a shape in enclave style")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    shutil.copytree(demo_home / "demo" / "models" / "tiny-sd", tmp_path / "model")
    cfg = {"train_data_dir": "data", "base_model": "model", "resolution": 32,
           "enable_bucket": True, "batch_size": 2, "max_train_steps": 3, "lora_rank": 4,
           "learning_rate": 1e-3, "output_dir": "out"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bucketed_examples_and_batches_are_bucket_pure(mixed_dataset):
    cfg = load_config(mixed_dataset)
    examples = load_examples(cfg)
    sizes = {e.bucket for e in examples}
    assert len(sizes) == 3
    for e in examples:
        assert tuple(e.pixels.shape[1:]) == (e.bucket[1], e.bucket[0])
        assert -1.0 <= float(e.pixels.min()) and float(e.pixels.max()) <= 1.0


@pytest.mark.slow
def test_bucketed_training_runs_and_batches_never_mix_sizes(mixed_dataset, demo_home):
    from lora_kernel.training.image import ImageTask
    from lora_kernel.training.models import load_sd_components
    from lora_kernel.training.train import train
    cfg = load_config(mixed_dataset)
    task = ImageTask(cfg, load_sd_components(cfg.base_model), device=__import__("torch").device(
        "cpu"), cache_dir=None, dataset_version="ds-test", log=lambda m: None)
    for epoch in range(3):
        batches = task.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(8))
        for batch in batches:
            assert len({task.examples[i].bucket for i in batch}) == 1
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert res.steps == 3 and all(loss == loss for loss in res.losses)


def test_cache_key_changes_with_what_changes_latents(mixed_dataset):
    cfg = load_config(mixed_dataset)
    key = cache_key(cfg, "ds-a", "m" * 64)
    assert key == cache_key(load_config(mixed_dataset, {"learning_rate": 5e-4}), "ds-a", "m" * 64)
    assert key != cache_key(cfg, "ds-b", "m" * 64)
    assert key != cache_key(cfg, "ds-a", "n" * 64)
    assert key != cache_key(load_config(mixed_dataset, {"resolution": 64}), "ds-a", "m" * 64)
    assert key != cache_key(load_config(mixed_dataset, {"random_flip": True}), "ds-a", "m" * 64)


def test_a_16_bit_gradient_stays_a_gradient(tmp_path):
    """PIL's convert("RGB") clips a 16-bit image (mode I;16) to white; prepare_image scales it:
    the gradient keeps its order and spans the 8-bit range. An 8-bit image is unchanged."""
    import random

    import numpy as np

    from lora_kernel.training.data import rgb_image
    from lora_kernel.training.image import prepare_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)  # a 16-bit grayscale PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        clipped = np.asarray(im.convert("RGB"))[..., 0]
        assert (clipped[:, 8:] == 255).all()  # what PIL alone does: all white
        faithful = np.asarray(rgb_image(im))[..., 0]
    row = faithful[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert len(set(row.tolist())) > 50  # still a gradient, not two levels
    x = prepare_image(path, (64, 64), center=True, rng=random.Random(0))
    assert float(x[0, 0, 0]) == pytest.approx(-1.0) and float(x[0, 0, -1]) == pytest.approx(1.0)
    eight = tmp_path / "ramp8.png"
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").save(eight)
    with Image.open(eight) as im:
        assert (np.asarray(rgb_image(im)) == np.asarray(im.convert("RGB"))).all()


def test_an_animated_image_is_refused_naming_the_file_and_a_still_one_trains(tmp_path):
    import random

    from lora_kernel.common.errors import ConfigError
    from lora_kernel.training.image import prepare_image

    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "blink.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ConfigError, match="animated image of 2 frames") as err:
        prepare_image(gif, (32, 32), center=True, rng=random.Random(0))
    assert "blink.gif" in str(err.value) and "fix:" in str(err.value)
    still = tmp_path / "still.gif"
    frames[0].save(still)
    assert prepare_image(still, (32, 32), center=True, rng=random.Random(0)).shape == (3, 32, 32)
