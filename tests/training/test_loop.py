"""The shared training loop: exact resume, Ctrl-C saves a checkpoint, pickle-free files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lora_kernel.common.errors import ConfigError, TrainingInterrupted
from lora_kernel.training.checks import load_config
from lora_kernel.training.loop import latest_checkpoint
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow

# Everything random at once: dropout, flips, accumulation, warm-up + cosine schedule.
RANDOM_EVERYTHING = {"max_train_steps": 8, "save_steps": 0, "lora_dropout": 0.1,
                     "random_flip": True, "gradient_accumulation_steps": 2,
                     "lr_scheduler": "cosine", "lr_warmup_steps": 2}


def _max_diff(a_path, b_path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _run(demo_home, out, **kw):
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {**RANDOM_EVERYTHING, "output_dir": str(out)})
    return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None, **kw)


def test_interrupted_and_resumed_equals_uninterrupted(demo_home, tmp_path):
    whole = _run(demo_home, tmp_path / "whole")
    with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
        _run(demo_home, tmp_path / "split", interrupt_at_step=3)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert ckpt.name == "checkpoint-3"
    resumed = _run(demo_home, tmp_path / "split", resume=True)
    assert resumed.resumed_from == str(ckpt) and resumed.steps == 8
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5)
    assert _max_diff(whole.adapter_files["diffusers"], resumed.adapter_files["diffusers"]) < 1e-5


def test_checkpoints_hold_no_pickle_files(demo_home, tmp_path):
    with pytest.raises(TrainingInterrupted):
        _run(demo_home, tmp_path, interrupt_at_step=2)
    files = {p.name for p in latest_checkpoint(tmp_path).iterdir()}
    assert files == {"adapter_state.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "state.json"}


def test_resume_refuses_a_changed_config_and_accepts_a_longer_run(demo_home, tmp_path):
    with pytest.raises(TrainingInterrupted):
        _run(demo_home, tmp_path, interrupt_at_step=2)
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {**RANDOM_EVERYTHING, "output_dir": str(tmp_path), "learning_rate": 0.01})
    with pytest.raises(ConfigError, match="config changed in learning_rate"):
        train(cfg, resume=True, progress=False, home=demo_home, samples=False)
    longer = load_config(demo_home / "demo" / "image_lora.yaml",
                         {**RANDOM_EVERYTHING, "output_dir": str(tmp_path), "max_train_steps": 4})
    res = train(longer, resume=True, progress=False, home=demo_home, samples=False,
                log=lambda m: None)
    assert res.steps == 4


def test_resume_without_checkpoint_is_a_clear_error(demo_home, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint under"):
        _run(demo_home, tmp_path, resume=True)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(demo_home, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lora_kernel.cli", "train", "--config",
           str(demo_home / "demo" / "image_lora.yaml"), "--quiet", "--no-samples",
           "-p", "output_dir", str(out), "-p", "max_train_steps", "400", "-p", "save_steps", "2"]
    env = {**os.environ, "LORA_HOME": str(demo_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "checkpoint-2").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "--resume" in stderr
    ckpt = latest_checkpoint(out)
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 400
    assert not (out / "enclave_style.safetensors").exists()  # no final adapter yet



def _train(demo_home, out, resume=None, **changes):
    """``_run`` with config ``changes`` (e.g. save_steps, keep_checkpoints)."""
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {**RANDOM_EVERYTHING, "output_dir": str(out), **changes})
    return train(cfg, resume=resume, progress=False, home=demo_home, samples=False,
                 log=lambda m: None)


def _names(out):
    return sorted((p.name for p in (out / "checkpoints").iterdir()),
                  key=lambda n: int(n.split("-")[1]))


def test_keep_checkpoints_keeps_the_newest_n_and_zero_keeps_all(demo_home, tmp_path):
    _train(demo_home, tmp_path / "kept", save_steps=2, keep_checkpoints=2)
    assert _names(tmp_path / "kept") == ["checkpoint-6", "checkpoint-8"]
    _train(demo_home, tmp_path / "all", save_steps=2)  # the default, 0: every checkpoint stays
    assert _names(tmp_path / "all") == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                        "checkpoint-8"]
    resumed = _train(demo_home, tmp_path / "kept", resume=True, save_steps=2,
                     keep_checkpoints=2, max_train_steps=10)  # a pruned run resumes
    assert resumed.steps == 10
    assert _names(tmp_path / "kept") == ["checkpoint-8", "checkpoint-10"]


def test_resume_after_the_last_step_says_there_is_nothing_to_resume(demo_home, tmp_path):
    _train(demo_home, tmp_path, save_steps=4)
    with pytest.raises(ConfigError, match="nothing to resume.*step 8 of 8.*raise max_train_steps"):
        _train(demo_home, tmp_path, resume=True, save_steps=4)
    assert _train(demo_home, tmp_path, resume=True, save_steps=4, max_train_steps=9).steps == 9


def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_leaves_no_partial(
        demo_home, tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written: a ConfigError naming output_dir and the last
    complete checkpoint (resume from it), and no ``.partial`` folder; the checkpoint before the
    disk filled is intact and resumes."""
    import errno

    from lora_kernel.training import loop

    real = loop.save_file
    written = []

    def filling(tensors, path, *a, **k):
        if len(written) >= 3:  # the first checkpoint fits (3 files), the second does not
            real(tensors, path, *a, **k)  # the bytes land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        written.append(path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(loop, "save_file", filling)
    out = tmp_path / "out"
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {**RANDOM_EVERYTHING, "max_train_steps": 4, "save_steps": 2,
                       "output_dir": str(out)})
    with pytest.raises(ConfigError, match="no space left") as err:
        train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert "checkpoint-2" in str(err.value) and str(out) in str(err.value)
    assert "lora train --resume" in str(err.value)
    assert not list(out.rglob("*.partial"))
    assert latest_checkpoint(out).name == "checkpoint-2"
    monkeypatch.setattr(loop, "save_file", real)  # space again: the run resumes and ends
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None,
                resume=True)
    assert res.steps == 4 and res.resumed_from
