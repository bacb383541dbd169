"""Held-out loss of image runs (lora_kernel.training.image_eval): ``validation_split`` holds
out whole images (with their repeats) chosen by the seed, ``validation_dir`` is a folder of
its own recorded as ``val:`` dataset files; the loss at fixed noise every ``eval_steps`` lands
in TensorBoard and the training summary; refusals paired with the configs that work."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from democonfig import write_config

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.image_eval import split_rows


def test_validation_split_holds_out_whole_images_chosen_by_the_seed():
    rows = [{"image": Path(f"{i}.png")} for i in range(10) for _ in range(3)]  # 3 repeats
    cfg = type("C", (), {"validation_split": 0.2, "seed": 1, "source": "c.yaml"})()
    train, held = split_rows(cfg, rows)
    assert len(held) == 2 and len(train) == 24  # 2 images, each once; the rest with repeats
    assert not {r["image"] for r in held} & {r["image"] for r in train}
    assert split_rows(cfg, rows) == (train, held)  # the seed decides
    cfg.validation_split = 0.95
    with pytest.raises(ConfigError, match="leaves none to train on"):
        split_rows(cfg, rows)


def _config(demo_home: Path, tmp: Path, **changes) -> Path:
    return write_config(demo_home, tmp, "image_lora.yaml", output_dir=str(tmp / "out"),
                        **changes)


def _held_dir(demo_home: Path, folder: Path, n: int = 3) -> Path:
    src = demo_home / "demo" / "datasets" / "image"
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copy(src / row["file_name"], folder / row["file_name"])
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["text"])
    return folder


@pytest.mark.parametrize(("changes", "key"), [
    ({"eval_path": "held.jsonl"}, "eval_path"),
    ({"validation_dir": "held", "validation_split": 0.1}, "validation_split"),
])
def test_held_out_keys_that_do_not_fit_an_image_run_are_refused(changes, key):
    from lora_kernel.training.config import config_from_mapping
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"base_model": "x", **changes})
    assert info.value.key == key and "fix:" in str(info.value)


def test_validation_dir_is_recorded_and_may_not_be_the_training_folder(demo_home, tmp_path):
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.data import dataset_digests
    held = _held_dir(demo_home, tmp_path / "held")
    cfg = load_config(_config(demo_home, tmp_path, validation_dir=str(held)))
    vals = sorted(k for k in dataset_digests(cfg) if k.startswith("val:"))
    assert len(vals) == 6 and vals[0].endswith(".png")  # 3 images + 3 captions
    inside = load_config  # the training folder itself: refused naming validation_dir
    with pytest.raises(ConfigError, match="training folder") as info:
        inside(_config(demo_home, tmp_path,
                       validation_dir=str(demo_home / "demo" / "datasets" / "image")))
    assert info.value.key == "validation_dir"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["split", "dir"])
def test_held_out_loss_every_eval_steps_in_tensorboard_and_the_summary(demo_home, tmp_path,
                                                                       how):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    extra = ({"validation_split": 0.25} if how == "split"
             else {"validation_dir": str(_held_dir(demo_home, tmp_path / "held"))})
    cfg = load_config(_config(demo_home, tmp_path, max_train_steps=4, eval_steps=2,
                              save_steps=0, batch_size=6, **extra))
    res = train(cfg, progress=False, home=tmp_path / "home", samples=False,
                log=lambda m: None)
    summary = json.loads(Path(res.summary_path).read_text())
    history = summary["held_out_loss"]
    assert [h["step"] for h in history] == [0, 2, 4]
    assert all(h["loss"] > 0 for h in history) and history[-1]["loss"] != history[0]["loss"]
    acc = EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 2, 4]
    if how == "split":  # 6 of 24 images held out: 18 train, 3 batches of 6 per epoch
        assert res.steps == 4 and summary["dataset_file_count"] == 25
