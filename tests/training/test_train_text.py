"""Text LoRA training on the tiny generated Llama: it learns the dataset's pattern, and the
saved PEFT adapter reloads with ``PeftModel.from_pretrained`` to identical logits."""
from __future__ import annotations

import json
import re

import pytest
import torch

from lora_kernel.training.checks import load_config
from lora_kernel.training.export import read_metadata
from lora_kernel.training.text import build_sequences, encode_records
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow
CODE = re.compile(r"^\s*[A-Z]+-\d\b")


@pytest.fixture(scope="module")
def text_run(demo_home, tmp_path_factory):
    """One text training run on the demo set, sampling every "what is the code" prompt."""
    cfg0 = load_config(demo_home / "demo" / "text_lora.yaml")
    with open(cfg0.metadata_path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    answers = {r["prompt"]: r["response"].strip() for r in records if "prompt" in r}
    prompts = [p for p in answers if p.startswith("Q: what is the code for")]
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"output_dir": str(tmp_path_factory.mktemp("text-run")),
                       "save_steps": 0, "sample_prompts": prompts})
    res = train(cfg, progress=False, home=demo_home, log=lambda m: None)
    return cfg, res, answers


def test_loss_falls_by_a_clear_margin(text_run):
    _, res, _ = text_run
    assert res.eval_loss_after < 0.85 * res.eval_loss_before, (
        res.eval_loss_before, res.eval_loss_after)


def test_lora_learns_the_pattern_the_base_model_lacks(text_run):
    _, res, answers = text_run
    rows = res.samples["rows"]
    assert len(rows) >= 8
    lora_format = sum(bool(CODE.match(r["lora"])) for r in rows)
    base_format = sum(bool(CODE.match(r["base"])) for r in rows)
    exact = sum(r["lora"].strip().startswith(answers[r["prompt"]]) for r in rows)
    base_exact = sum(r["base"].strip().startswith(answers[r["prompt"]]) for r in rows)
    assert lora_format >= 0.9 * len(rows) and base_format == 0
    # Chance is 1 in the number of words; the LoRA must beat it several times over.
    assert exact >= 0.25 * len(rows) and base_exact == 0, rows


def test_the_lora_answers_held_out_prompts_with_their_codes(text_run):
    """The pattern, not the rows: prompts about words no training record names (issue 27;
    the paired run that learns nothing is in test_text_metrics.py)."""
    from lora_kernel.training import text_metrics
    _, res, _ = text_run
    m = res.samples["measures"]
    assert m["lora"]["exact_match"] >= text_metrics.EXACT_MATCH_FLOOR, m["rows"]
    assert m["base"]["exact_match"] <= text_metrics.BASE_CEILING, m["rows"]
    with open(res.summary_path, encoding="utf-8") as fh:
        recorded = json.load(fh)["samples"]["measures"]
    assert recorded["lora"] == m["lora"] and recorded["items"] == m["items"]


def test_peft_adapter_reloads_to_identical_logits(text_run):
    from peft import PeftModel

    from lora_kernel.training.models import load_causal_lm
    cfg, res, _ = text_run
    trained = res.live["model"]
    tok = res.live["tokenizer"]
    base, _ = load_causal_lm(cfg.base_model)
    reloaded = PeftModel.from_pretrained(base, res.adapter_files["peft"])
    ids = tok("Q: what is the code for apple? A:", return_tensors="pt").input_ids
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        a = trained(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            c = reloaded(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3  # and the adapter does something


def test_adapter_folder_is_safetensors_with_provenance(text_run):
    from pathlib import Path
    _, res, _ = text_run
    folder = Path(res.adapter_files["peft"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors"] or \
        sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]
    meta = read_metadata(folder / "adapter_model.safetensors")
    assert meta["lora_enclave.base_model_sha256"] == res.base_model_sha256
    assert meta["lora_enclave.dataset_version"] == res.dataset_version
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"


def test_prompt_tokens_are_masked_and_packing_fills_sequences(demo_home):
    from lora_kernel.training.models import load_causal_lm
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"packing": True, "max_seq_length": 64})
    _, tok = load_causal_lm(cfg.base_model)
    records = encode_records(cfg, tok)
    ids, labels = records[0]
    prompt_len = len(tok(json.loads(open(cfg.metadata_path).readline())["prompt"],
                         add_special_tokens=False).input_ids)
    assert all(x == -100 for x in labels[:prompt_len + 1])  # bos + prompt
    assert labels[-1] == tok.eos_token_id and labels[prompt_len + 1] == ids[prompt_len + 1]
    packed = build_sequences(cfg, records, tok.pad_token_id)
    assert all(len(s[0]) <= 64 for s in packed) and len(packed) < len(records) / 2
    total = sum(len(i) for i, _ in records)
    assert sum(len(s[0]) for s in packed) == total


def test_plain_text_records_train_without_packing(demo_home, tmp_path):
    plain = demo_home / "demo" / "datasets" / "text" / "plain.jsonl"
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"metadata_path": str(plain), "packing": False, "max_train_steps": 20,
                       "output_dir": str(tmp_path), "save_steps": 0})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert res.steps == 20 and res.eval_loss_after < res.eval_loss_before
