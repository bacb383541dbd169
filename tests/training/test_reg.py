"""Regularization images (lora_kernel.training.reg): kohya's balancing of reg against training
images, the reg set as dataset files with its own version (``reg:`` digests, re-verified
where the config says they are), the refusals (``prior_loss_weight`` without ``reg_data_dir``,
a reg folder that is or sits in the training folder) each paired with the config that works,
and ``prior_loss_weight`` scaling the reg examples' loss in the image task."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from democonfig import write_config

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.reg import balanced_reg_rows, reg_version


def _entries(*repeats: int) -> list[dict]:
    return [{"image": Path(f"{i}.png"), "repeats": r} for i, r in enumerate(repeats)]


def test_reg_rows_are_balanced_to_the_training_rows_as_kohya_does():
    # fewer: each with its repeats first, then one more repeat each in order until they match
    rows = balanced_reg_rows(_entries(1, 1), 5)
    assert [r["image"].name for r in rows] == ["0.png"] * 3 + ["1.png"] * 2
    # more: the surplus is never trained
    rows = balanced_reg_rows(_entries(2, 2, 2), 3)
    assert [r["image"].name for r in rows] == ["0.png", "0.png", "1.png", "1.png"]
    assert balanced_reg_rows([], 4) == [] and balanced_reg_rows(_entries(1), 0) == []


def _reg_folder(demo_home: Path, where: Path, n: int = 2) -> Path:
    """``where/1_shape/`` with ``n`` demo images and no captions (the class is the caption)."""
    folder = where / "1_shape"
    folder.mkdir(parents=True)
    images = sorted((demo_home / "demo" / "datasets" / "image").glob("*.png"))[:n]
    for img in images:
        shutil.copy(img, folder / img.name)
    return where


def _config(demo_home: Path, tmp: Path, **changes) -> Path:
    return write_config(demo_home, tmp, "image_lora.yaml", output_dir=str(tmp / "out"),
                        **changes)


def test_prior_loss_weight_without_reg_data_dir_is_refused(demo_home, tmp_path):
    from lora_kernel.training.checks import load_config
    with pytest.raises(ConfigError, match="no reg_data_dir is set") as info:
        load_config(_config(demo_home, tmp_path, prior_loss_weight=0.5))
    assert info.value.key == "prior_loss_weight" and "fix: set reg_data_dir" in str(info.value)


def test_reg_images_are_dataset_files_with_their_own_version(demo_home, tmp_path,
                                                             monkeypatch):
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.data import dataset_digests, dataset_version
    reg = _reg_folder(demo_home, tmp_path / "reg")
    plain = load_config(_config(demo_home, tmp_path))
    cfg = load_config(_config(demo_home, tmp_path, reg_data_dir=str(reg),
                              prior_loss_weight=0.5))
    digests = dataset_digests(cfg)
    regs = sorted(k for k in digests if k.startswith("reg:"))
    assert len(regs) == 2 and regs[0].startswith("reg:1_shape/")
    assert {k: v for k, v in digests.items() if not k.startswith("reg:")} == \
        dataset_digests(plain)
    before, reg_before = dataset_version(cfg, digests), reg_version(digests)
    assert reg_before and reg_before != before and reg_version(dataset_digests(plain)) is None
    img = next((reg / "1_shape").glob("*.png"))
    shutil.copy(sorted((demo_home / "demo" / "datasets" / "image").glob("*.png"))[5], img)
    after = dataset_digests(cfg)
    assert dataset_version(cfg, after) != before and reg_version(after) != reg_before
    # verify --inputs re-hashes reg files where the config says they are
    from lora_kernel.provenance import inputs
    manifest_summary = {"config": cfg.to_dict(), "dataset_digests": digests,
                        "base_model_sha256": None}
    monkeypatch.setattr(inputs, "summary", lambda m: m)  # the manifest's summary, given
    problems = inputs.verify_inputs(manifest_summary, "r1")
    assert [p.where for p in problems] == [str(img)]


@pytest.mark.parametrize("inside", [False, True], ids=["is-training-folder", "inside-it"])
def test_a_reg_folder_that_is_or_sits_in_the_training_folder_is_refused(demo_home, tmp_path,
                                                                        inside):
    from lora_kernel.training.checks import load_config
    train = tmp_path / "train"
    shutil.copytree(demo_home / "demo" / "datasets" / "image", train)
    reg = _reg_folder(demo_home, train / "reg") if inside else train
    path = _config(demo_home, tmp_path, train_data_dir=str(train),
                   metadata_path=str(train / "metadata.csv"), reg_data_dir=str(reg))
    with pytest.raises(ConfigError, match="training folder") as info:
        load_config(path)
    assert info.value.key == "reg_data_dir" and "fix: move the class images" in str(info.value)


@pytest.mark.slow
def test_prior_loss_weight_scales_the_reg_examples_loss(demo_home, tmp_path):
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.image import ImageTask
    from lora_kernel.training.models import load_sd_components
    reg = _reg_folder(demo_home, tmp_path / "reg")
    losses = {}
    for weight in (1.0, 0.25):
        cfg = load_config(_config(demo_home, tmp_path, reg_data_dir=str(reg),
                                  prior_loss_weight=weight, cache_latents=False))
        comps = load_sd_components(cfg.base_model)
        task = ImageTask(cfg, comps, device=torch.device("cpu"), cache_dir=None,
                         dataset_version="v")
        from lora_kernel.training.data import read_image_rows
        n_train = len(read_image_rows(cfg))
        assert len(task.examples) == 2 * n_train  # reg balanced to the training rows
        reg_idx = [i for i, e in enumerate(task.examples) if e.weight != 1.0 or i >= n_train]
        assert reg_idx == list(range(n_train, 2 * n_train))
        assert {task.examples[i].caption for i in reg_idx} == {"shape"}  # the class name
        # every epoch interleaves reg and training images in its shuffled batches
        assert any(min(b) < n_train <= max(b) for b in task.epoch_batches(0))
        task.train_mode(False)
        with torch.no_grad():
            losses[weight] = [
                float(task.loss(b, torch.Generator().manual_seed(3)))
                for b in ([0, 1], [n_train, n_train + 1])]
    assert losses[0.25][0] == losses[1.0][0]  # training images: weight 1
    assert losses[0.25][1] == pytest.approx(losses[1.0][1] * 0.25, rel=1e-5)


@pytest.mark.slow
def test_a_run_with_reg_images_records_their_own_version(demo_home, demo_subset, tmp_path):
    import json

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.data import dataset_digests
    from lora_kernel.training.train import train
    reg = _reg_folder(demo_home, tmp_path / "reg")
    cfg = load_config(_config(demo_home, tmp_path, reg_data_dir=str(reg), prior_loss_weight=0.5,
                              max_train_steps=2, save_steps=0, **demo_subset(4)))
    res = train(cfg, progress=False, home=tmp_path / "home", samples=False,
                log=lambda m: None)
    summary = json.loads(Path(res.summary_path).read_text())
    digests = dataset_digests(cfg)
    assert summary["reg_dataset_version"] == reg_version(digests)
    assert summary["dataset_version"] == res.dataset_version != summary["reg_dataset_version"]
    assert summary["dataset_file_count"] == 5 + 2  # 4 images + metadata.csv, 2 reg images
    assert summary["config"]["prior_loss_weight"] == 0.5
