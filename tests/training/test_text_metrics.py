"""lora_kernel.training.text_metrics and demo_text_pretrain: the pre-trained tiny LMs speak the
demo grammar (capitals, letter counts) without the code pattern; the exact-match measure
counts only the code; the demo text LoRA answers held-out prompts with their codes at the
stated floor while the base stays under the ceiling, and a run that learns nothing fails
that check."""
from __future__ import annotations

import pytest
import torch

from lora_kernel.training import demo_text_pretrain, style_metrics, text_metrics
from lora_kernel.training.demo_assets import TEXT_ITEMS, text_records


def test_exact_match_counts_only_the_code():
    assert text_metrics.exact_match(" LIME-4", "lime")
    assert text_metrics.exact_match("LIME-4\n", "lime")
    assert not text_metrics.exact_match(" LIME-5", "lime")
    assert not text_metrics.exact_match(" LIME", "lime")
    assert not text_metrics.exact_match(" LIME-4 and more", "lime")


def test_held_out_prompts_keep_the_runs_format_and_skip_trained_items():
    pairs = text_metrics.held_out_prompts("Q: what is the code for apple? A:", ["lime"])
    assert pairs == [("lime", "Q: what is the code for lime? A:")]
    chat = text_metrics.held_out_prompts("What is the code for river?", ["ember"])
    assert chat == [("ember", "What is the code for ember?")]
    assert text_metrics.code_prompt(["a red circle", "Tell me the code of fig."]) \
        == "Tell me the code of fig."
    assert text_metrics.code_prompt(["hello"]) is None
    texts = [r["prompt"] + r["response"] for r in text_records()]
    # the demo's held-out words are in no training record, the trained ones are
    assert text_metrics.unseen_items(texts) == list(demo_text_pretrain.HELD_OUT_ITEMS)
    assert text_metrics.unseen_items(texts, TEXT_ITEMS) == []
    assert text_metrics.unseen_items(texts + ["Q: code for Lime? A: LIME-4"]) \
        == [i for i in demo_text_pretrain.HELD_OUT_ITEMS if i != "lime"]


def test_measure_held_out_rates_base_and_lora_and_the_summary_names_them():
    def complete(prompts):
        rows = []
        for p in prompts:
            item = text_metrics.CODE_QUESTION.search(p).group(1)
            rows.append({"prompt": p, "base": f" {item.upper()}",
                         "lora": f" {item.upper()}-{len(item)}" if item != "ember" else "x"})
        return rows

    demo = [r["prompt"] + r["response"] for r in text_records()]
    m = text_metrics.measure_held_out(["Q: what is the code for apple? A:"], demo, complete)
    n = len(demo_text_pretrain.HELD_OUT_ITEMS)
    assert m["base"]["exact_match"] == 0.0
    assert m["lora"]["exact_match"] == pytest.approx((n - 1) / n)
    assert text_metrics.learned(m)
    line = style_metrics.summary_line(m)  # the one line every caller prints
    assert f"exact match on {n} held-out prompts" in line and "base 0%" in line
    assert text_metrics.measure_held_out(["a red circle"], demo, complete) is None
    # a user's own data that asks for codes is not the demo's pattern: no measure
    own = ["Q: what is the code for login? A: 4711"]
    assert text_metrics.measure_held_out(["Q: what is the code for login? A:"], own,
                                         complete) is None
    worse = {**m, "lora": {"exact_match": 0.5, "prompts": n}}
    assert not text_metrics.learned(worse)


def _greedy(folder, prompt: str, chat: bool) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("folder,chat,spell,count", [
    ("tiny-llama", False, "Q: spell {} in capitals. A:", "Q: how many letters are in {}? A:"),
    ("tiny-chat", True, "Spell {} in capitals.", "How many letters are in {}?"),
])
def test_the_pretrained_base_knows_the_grammar_of_held_out_words_but_not_the_code(
        demo_home, folder, chat, spell, count):
    path = demo_home / "demo" / "models" / folder
    for item in demo_text_pretrain.HELD_OUT_ITEMS[:4]:
        assert _greedy(path, spell.format(item), chat).strip() == item.upper()
        assert _greedy(path, count.format(item), chat).strip() == f"({len(item)})"
    code = "What is the code for {}?" if chat else "Q: what is the code for {}? A:"
    assert not any(text_metrics.exact_match(_greedy(path, code.format(i), chat), i)
                   for i in demo_text_pretrain.HELD_OUT_ITEMS[:4])


def test_a_random_base_does_not_know_the_grammar(demo_home, tmp_path):
    """The paired negative: the same architecture without the pre-training."""
    from lora_kernel.training.demo_assets import _text_corpus, write_tiny_llama
    folder = write_tiny_llama(tmp_path / "random", corpus=_text_corpus(), pretrain=False)
    hits = [_greedy(folder, f"Q: spell {i} in capitals. A:", False).strip() == i.upper()
            for i in demo_text_pretrain.HELD_OUT_ITEMS[:4]]
    assert not any(hits)


@pytest.fixture(scope="module")
def frozen_text_run(demo_home, tmp_path_factory):
    """The demo text config with learning_rate 1e-8 (it learns nothing; 0 is refused)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"output_dir": str(tmp_path_factory.mktemp("text-frozen")),
                       "save_steps": 0, "learning_rate": 1e-8, "max_train_steps": 10})
    return train(cfg, progress=False, home=demo_home, log=lambda m: None)


@pytest.mark.slow
def test_a_text_run_that_does_not_learn_fails_the_check(frozen_text_run):
    m = frozen_text_run.samples["measures"]
    assert m["base"]["exact_match"] <= text_metrics.BASE_CEILING
    assert not text_metrics.learned(m), m


@pytest.mark.slow
def test_the_runs_summary_file_and_notebook_table_show_the_measure(frozen_text_run):
    import json

    from lora_kernel.user.notebook import summary_view
    with open(frozen_text_run.summary_path, encoding="utf-8") as fh:
        recorded = json.load(fh)["samples"]["measures"]
    assert recorded["kind"] == "text_exact_match"
    assert recorded["items"] == list(demo_text_pretrain.HELD_OUT_ITEMS)
    html = summary_view(frozen_text_run).data
    assert "what the LoRA learned" in html and "exact match on 12 held-out prompts" in html
