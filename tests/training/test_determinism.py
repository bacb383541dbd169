"""Determinism on CPU: the same config and seed give a bit-identical adapter (tensor bytes and
per-step losses), also when the run is interrupted and resumed; the ``deterministic`` key."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lora_kernel.common.errors import ConfigError, TrainingInterrupted
from lora_kernel.training.checks import load_config
from lora_kernel.training.train import train

# Everything random at once, tiny: dropout, flips, buckets, accumulation, warm-up + cosine.
IMAGE = {"max_train_steps": 4, "save_steps": 0, "lora_dropout": 0.1, "random_flip": True,
         "enable_bucket": True, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
         "lr_warmup_steps": 1}
TEXT = {"max_train_steps": 3, "save_steps": 0, "lora_dropout": 0.1}


def _split(path: str | Path) -> tuple[dict, bytes]:
    """A safetensors file's header (metadata without ``output_dir``) and its data bytes."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    for key in list(meta):
        if "output_dir" in key:
            meta.pop(key)
    if isinstance(meta.get("lora_config"), str):
        cfg = json.loads(meta["lora_config"])
        cfg.pop("output_dir", None)
        meta["lora_config"] = cfg
    return {"tensors": header, "meta": meta}, raw[8 + n:]


def _adapter_files(res) -> list[Path]:
    out = Path(res.output_dir)
    return sorted(p.relative_to(out) for p in out.rglob("*.safetensors")
                  if "checkpoints" not in p.parts)


def assert_identical(a, b) -> None:
    """Same adapter files with byte-identical tensor data and headers; same losses."""
    files = _adapter_files(a)
    assert files and files == _adapter_files(b)
    for rel in files:
        (ha, da), (hb, db) = _split(Path(a.output_dir) / rel), _split(Path(b.output_dir) / rel)
        assert ha["tensors"] == hb["tensors"], rel
        assert da == db, f"{rel}: tensor bytes differ"
    assert a.losses == b.losses  # exactly, not approximately


def _image(demo_home, out, **kw):
    cfg = load_config(demo_home / "demo" / "image_lora.yaml", {**IMAGE, "output_dir": str(out)})
    return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None, **kw)


def _text(demo_home, out):
    cfg = load_config(demo_home / "demo" / "text_lora.yaml", {**TEXT, "output_dir": str(out)})
    return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)


def test_deterministic_key_is_validated(demo_home):
    path = demo_home / "demo" / "image_lora.yaml"
    assert load_config(path).deterministic is None
    assert load_config(path, {"deterministic": False}).deterministic is False
    with pytest.raises(ConfigError, match="true or false") as info:
        load_config(path, {"deterministic": "yes"})
    assert "deterministic" in str(info.value)


def test_determinism_defaults_on_for_cpu_off_for_cuda():
    import torch

    from lora_kernel.training.loop import determinism_wanted

    class Cfg:
        deterministic = None
    assert determinism_wanted(Cfg, torch.device("cpu"))
    assert not determinism_wanted(Cfg, torch.device("cuda"))
    Cfg.deterministic = True
    assert determinism_wanted(Cfg, torch.device("cuda"))


@pytest.mark.slow
def test_two_image_runs_give_identical_adapters(demo_home, tmp_path):
    assert_identical(_image(demo_home, tmp_path / "a"), _image(demo_home, tmp_path / "b"))


@pytest.mark.slow
def test_two_text_runs_give_identical_adapters(demo_home, tmp_path):
    assert_identical(_text(demo_home, tmp_path / "a"), _text(demo_home, tmp_path / "b"))


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(demo_home, tmp_path):
    whole = _image(demo_home, tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        _image(demo_home, tmp_path / "split", interrupt_at_step=2)
    resumed = _image(demo_home, tmp_path / "split", resume=True)
    assert resumed.steps == whole.steps == 4
    assert_identical(whole, resumed)


@pytest.mark.slow
def test_resumed_bf16_run_is_bit_identical_to_an_uninterrupted_one(demo_home, tmp_path):
    """Half-precision frozen weights change nothing about exact resume: the LoRA weights,
    optimizer states and RNGs in a checkpoint are float32 and restore exactly."""
    def run(out, **kw):
        cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                          {**IMAGE, "output_dir": str(out), "mixed_precision": "bf16"})
        return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None,
                     **kw)
    whole = run(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "split", interrupt_at_step=2)
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.base_weight_dtype == "bfloat16"
    assert_identical(whole, resumed)
