"""Adapter options of the text task: DoRA, rsLoRA and ``target_modules: all-linear`` reach peft
(and the saved adapter), and ``init_adapter`` continues an earlier adapter, pinned by sha256."""
from __future__ import annotations

import json
import math

import pytest

from lora_kernel.common.digests import path_sha256
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.export import read_metadata
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow


def _cfg(demo_home, tmp_path, name, **changes):
    lines = (demo_home / "demo" / "datasets" / "chat" / "train.jsonl").read_text().splitlines()
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines[:8]) + "\n")
    return load_config(demo_home / "demo" / "chat_lora.yaml",
                       {"metadata_path": str(data), "quantization": "none",
                        "output_dir": str(tmp_path / name), "save_steps": 0,
                        "max_train_steps": 4, "batch_size": 4, **changes})


def test_dora_rslora_all_linear_reach_peft_and_the_saved_adapter(demo_home, tmp_path):
    cfg = _cfg(demo_home, tmp_path, "dora", use_dora=True, use_rslora=True,
               target_modules="all-linear")
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    model = res.live["model"]
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}  # every Linear but the output head
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(layer.scaling["default"], cfg.alpha / math.sqrt(cfg.lora_rank))
    conf = json.loads((tmp_path / "dora" / cfg.output_name / "adapter_config.json").read_text())
    assert conf["use_dora"] and conf["use_rslora"]
    assert res.eval_loss_after < res.eval_loss_before


def test_init_adapter_continues_the_earlier_adapter_and_pins_it(demo_home, tmp_path):
    first = _cfg(demo_home, tmp_path, "first")
    a = train(first, progress=False, home=demo_home, samples=False, log=lambda m: None)
    folder = tmp_path / "first" / first.output_name
    # a LoRA of another rank cannot continue it (the paired refusal)
    with pytest.raises(ConfigError, match="lora_rank"):
        _cfg(demo_home, tmp_path, "second", init_adapter=str(folder), lora_rank=4)
    second = _cfg(demo_home, tmp_path, "second", init_adapter=str(folder))
    b = train(second, progress=False, home=demo_home, samples=False, log=lambda m: None)
    # it starts where the first ended (same data, same evaluation) and goes on learning
    assert math.isclose(b.eval_loss_before, a.eval_loss_after, rel_tol=1e-4)
    assert b.eval_loss_after < b.eval_loss_before
    meta = read_metadata(tmp_path / "second" / second.output_name / "adapter_model.safetensors")
    assert meta["lora_enclave.init_adapter_sha256"] == path_sha256(folder)
    summary = json.loads((tmp_path / "second" / "training_summary.json").read_text())
    assert summary["init_adapter_sha256"] == path_sha256(folder)
