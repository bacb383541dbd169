"""Preference training (``objective: dpo | orpo``) on the demo chat model: the margin between
the chosen and the rejected answer's log-probability grows, the run is recorded like SFT runs,
and bad preference data is refused naming the line."""
from __future__ import annotations

import json

import pytest
import torch

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.text_pref import encode_pairs, sequence_logps
from lora_kernel.training.train import train


def _margin(model, tok, cfg, adapter: bool) -> float:
    """Mean over the pairs of log p(chosen) - log p(rejected)."""
    pairs = encode_pairs(cfg, tok)
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    model.eval()
    with torch.no_grad():
        if adapter:
            total, _ = sequence_logps(model, seqs, tok.pad_token_id, torch.device("cpu"))
        else:
            with model.disable_adapter():
                total, _ = sequence_logps(model, seqs, tok.pad_token_id, torch.device("cpu"))
    n = len(pairs)
    return float((total[:n] - total[n:]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_training_grows_the_chosen_vs_rejected_margin(demo_home, tmp_path,
                                                                  objective):
    cfg = load_config(demo_home / "demo" / "dpo_lora.yaml",
                      {"output_dir": str(tmp_path / "out"), "objective": objective,
                       "max_train_steps": 16, "max_new_tokens": 2})
    res = train(cfg, progress=False, home=demo_home, log=lambda m: None)
    model, tok = res.live["model"], res.live["tokenizer"]
    before, after = _margin(model, tok, cfg, False), _margin(model, tok, cfg, True)
    assert after > before + 1.0, (before, after)
    assert res.eval_loss_after < res.eval_loss_before
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["config"]["objective"] == objective
    assert summary["config"]["dataset_format"] == "preference"
    if objective == "dpo":  # the policy starts as the reference: the DPO loss is log 2
        assert abs(res.eval_loss_before - 0.6931) < 1e-3


def _pref(demo_home, tmp_path, rows, **changes):
    import yaml
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = demo_home / "demo"
    raw = yaml.safe_load((demo / "dpo_lora.yaml").read_text())
    raw.update({"base_model": str(demo / raw["base_model"]), "metadata_path": str(data),
                "output_dir": str(tmp_path / "out"), **changes})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


GOOD = {"prompt": "Code for fig?", "chosen": "FIG-3", "rejected": "FIG-4"}


def test_a_chosen_row_without_rejected_is_refused_naming_the_line(demo_home, tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: it has 'chosen' but no 'rejected'"):
        load_config(_pref(demo_home, tmp_path, [GOOD, {"prompt": "x", "chosen": "y"}]))
    assert load_config(_pref(demo_home, tmp_path, [GOOD, GOOD])).objective == "dpo"


def test_objective_and_data_must_agree(demo_home, tmp_path):
    with pytest.raises(ConfigError, match="set objective: dpo or orpo"):
        load_config(_pref(demo_home, tmp_path, [GOOD], objective="sft"))
    chat = demo_home / "demo" / "datasets" / "chat" / "train.jsonl"
    with pytest.raises(ConfigError, match="objective: dpo trains on preference pairs"):
        load_config(_pref(demo_home, tmp_path, [GOOD], metadata_path=str(chat)))
