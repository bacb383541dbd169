"""The chat model trained in nf4 by ``lora run`` (a sealed record), then ``lora merge``: refused
until approved, then a transformers folder that ``AutoModelForCausalLM.from_pretrained`` loads
and whose greedy output is the adapter-on-base output, sealed as a ``derived`` record pinning
the run and the base model. (Refusals' exit codes: ``tests/exit_cases/llm.py``.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from lora_kernel.provenance.records import load_manifest, summary, verify_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_record(demo_home, tmp_path_factory, lora_kernel_prefix):
    """``lora run`` of the demo chat config (nf4, messages data; 12 steps on 24
    conversations) in its own state directory; returns (state, run id, record)."""
    tmp = tmp_path_factory.mktemp("chat-run")
    state, home = tmp / "state", tmp / "home"
    state.mkdir()
    home.mkdir()
    demo = demo_home / "demo"
    lines = (demo / "datasets" / "chat" / "train.jsonl").read_text().splitlines()
    data = tmp / "chat.jsonl"
    data.write_text("\n".join(lines[:24]) + "\n")
    raw = yaml.safe_load((demo / "chat_lora.yaml").read_text())
    raw.update({"base_model": str(demo / raw["base_model"]), "metadata_path": str(data),
                "max_train_steps": 12, "save_steps": 0, "max_new_tokens": 4,
                "sample_prompts": ["What is the code for apple?"]})
    config = tmp / "chat.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, LORA_STATE=str(state), LORA_HOME=str(home),
               JUPYTER_PATH=str(lora_kernel_prefix / "share" / "jupyter"))
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "run", "--config",
                          str(config), "--home", str(home)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    record = re.search(r"^record: (.+)$", res.stdout, re.M).group(1)
    from pathlib import Path
    return state, Path(record).name, Path(record)


def test_lora_run_seals_the_nf4_chat_run_with_its_format(chat_record):
    _, _, record = chat_record
    assert verify_record(record) == []
    manifest = load_manifest(record)
    config = manifest["predicate"]["buildDefinition"]["externalParameters"]["config"]
    assert config["dataset_format"] == "messages" and config["quantization"] == "nf4"
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["base_weight_dtype"] == "nf4"
    assert extra["eval_loss_after"] < 0.7 * extra["eval_loss_before"]


def test_merge_is_refused_until_approved_then_matches_the_adapter_on_base(
        chat_record, tmp_path, monkeypatch, actor):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kernel.cli import main as cli
    from lora_kernel.training.models import load_causal_lm
    from lora_kernel.training.text_data import chat_prompt_ids
    from lora_kernel.trusted.review import approve

    state, run_id, record = chat_record
    monkeypatch.setenv("LORA_STATE", str(state))
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text("reviewers_group: no-such-group-xyz\nmembers: [bob]\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    dest = tmp_path / "merged"
    assert cli.main(["merge", run_id, "--to", str(dest)]) == 6  # pending review
    assert not dest.exists()
    approve(run_id, "ok", actor=actor("bob"), state=state)
    assert cli.main(["merge", run_id, "--to", str(dest)]) == 0

    # a plain transformers folder of safetensors
    names = sorted(p.name for p in dest.iterdir())
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    merged = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    assert tok.chat_template  # the chat template travels with the merged model
    base_dir = load_manifest(record)["predicate"]["buildDefinition"]["externalParameters"][
        "config"]["base_model"]
    base, _ = load_causal_lm(base_dir)
    adapter = next(p.parent for p in (record / "adapter").rglob("adapter_config.json"))
    on_base = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([chat_prompt_ids("What is the code for apple?", tok, tok.chat_template)])
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        a = merged.generate(input_ids=ids, **gen)
        b = on_base.generate(input_ids=ids, **gen)
        with on_base.disable_adapter():
            plain = on_base.generate(input_ids=ids, **gen)
    assert a.tolist() == b.tolist()
    assert a.tolist() != plain.tolist()  # the merge carries what was trained

    # the derived record pins the source run and the base model, and verifies
    derived = [p for p in (state / "runs").iterdir() if p.is_dir() and p.name != run_id
               and not p.name.startswith(".")]
    assert len(derived) == 1 and verify_record(derived[0]) == []
    s = summary(load_manifest(derived[0]))
    src = summary(load_manifest(record))
    assert s["kind"] == "derived" and s["derived_from"]["run_id"] == run_id
    assert s["base_model_sha256"] == src["base_model_sha256"]
    deps = {d["name"]: d for d in load_manifest(derived[0])["predicate"]["buildDefinition"][
        "resolvedDependencies"]}
    assert deps["source_run"]["uri"] == f"lora-run:{run_id}"
    merged_files = {p.name for p in (derived[0] / "adapter" / "merged").iterdir()}
    assert merged_files == set(names)
    extra = load_manifest(derived[0])["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["tool"] == "merge" and extra["measured"]["max_abs_logit_diff"] < 1e-3
