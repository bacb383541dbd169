"""Evaluation while training (text): a held-out loss from ``validation_split`` or
``eval_path`` every ``eval_steps`` (TensorBoard ``eval/loss``, ``training_summary.json``),
never trained on, and sample completions every ``sample_every_n_steps``."""
from __future__ import annotations

import json

import pytest

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow


def _data(demo_home, tmp_path, lines=slice(0, 16)):
    rows = (demo_home / "demo" / "datasets" / "chat" / "train.jsonl").read_text().splitlines()
    path = tmp_path / f"chat-{lines.start}.jsonl"
    path.write_text("\n".join(rows[lines]) + "\n")
    return path


def test_validation_split_loss_is_logged_and_recorded_and_samples_written(demo_home, tmp_path):
    cfg = load_config(demo_home / "demo" / "chat_lora.yaml",
                      {"metadata_path": str(_data(demo_home, tmp_path)),
                       "quantization": "none", "output_dir": str(tmp_path / "out"),
                       "save_steps": 0, "max_train_steps": 6, "batch_size": 4,
                       "validation_split": 0.25, "eval_steps": 3, "sample_every_n_steps": 3,
                       "max_new_tokens": 2, "sample_prompts": ["What is the code for fig?"]})
    res = train(cfg, progress=False, home=demo_home, log=lambda m: None)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    history = summary["held_out_loss"]
    assert [h["step"] for h in history] == [0, 3, 6]
    assert history[-1]["loss"] < history[0]["loss"]
    assert res.steps == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 3, 6]
    assert (tmp_path / "out" / "samples" / "step-3" / "completions.json").is_file()
    assert (tmp_path / "out" / "samples" / "completions.json").is_file()


def test_eval_path_must_exist_and_match_the_training_format(demo_home, tmp_path):
    base = {"metadata_path": str(_data(demo_home, tmp_path)), "quantization": "none",
            "output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="file not found"):
        load_config(demo_home / "demo" / "chat_lora.yaml",
                    {**base, "eval_path": str(tmp_path / "missing.jsonl")})
    plain = demo_home / "demo" / "datasets" / "text" / "train.jsonl"
    with pytest.raises(ConfigError, match="is prompt_response data but the training data is "
                                          "messages"):
        load_config(demo_home / "demo" / "chat_lora.yaml", {**base, "eval_path": str(plain)})
    held = _data(demo_home, tmp_path, slice(16, 24))
    cfg = load_config(demo_home / "demo" / "chat_lora.yaml", {**base, "eval_path": str(held)})
    assert cfg.eval_path == str(held)
