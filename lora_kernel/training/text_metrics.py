"""Whether a demo text LoRA learned its response pattern, not only its rows: the exact-match
rate of greedy completions on held-out demo prompts, without and with the LoRA.

* **The pattern**: the demo text data (``datasets/text/train.jsonl``, ``datasets/chat``)
  answers "what is the code for ``item``?" with the item's *code*, its spelling in capitals,
  a dash and its letter count (``apple`` -> ``APPLE-5``,
  :func:`lora_kernel.training.demo_assets.text_code`).
* **When**: the run's training data holds demo codes and a sample prompt asks for one
  (a user's own data about "the code for login" gets no measure).
* **Held-out prompts**: the run's first sample prompt that asks for a code (the run's own
  prompt format: ``Q: what is the code for apple? A:`` or a chat user turn), with its item
  replaced by each of :data:`~lora_kernel.training.demo_text_pretrain.HELD_OUT_ITEMS` that
  no training record names: words the pre-trained base knows (their capitals and letter
  counts) but the LoRA never saw a code of.
* **Exact match** (1 or 0 per prompt): the greedy completion (``max_new_tokens``, stopped at
  end of sequence), stripped of surrounding white space, equals the code. The rate is the
  share of held-out prompts that match.

The demo's bounds: the LoRA's rate at least ``EXACT_MATCH_FLOOR``, the base's at most
``BASE_CEILING`` (the base was pre-trained without the pattern, :mod:`demo_text_pretrain`).
``tests/training/test_text_metrics.py`` and ``bench/train_throughput.py`` hold the training
code to them.

Runs as: the user (the text task's sample completions, tests and the bench).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lora_kernel.training.demo_assets import TEXT_ITEMS, text_code
from lora_kernel.training.demo_text_pretrain import HELD_OUT_ITEMS

EXACT_MATCH_FLOOR = 0.8
BASE_CEILING = 0.1
CODE_QUESTION = re.compile(r"\bcode (?:for|of) ([A-Za-z]+)\b")


def code_prompt(prompts: Sequence[str]) -> str | None:
    """The first of ``prompts`` that asks for a demo code, or None (the measure does not
    apply)."""
    return next((p for p in prompts if CODE_QUESTION.search(p)), None)


def held_out_prompts(prompt: str, items: Sequence[str]) -> list[tuple[str, str]]:
    """``(item, prompt)`` for each item: ``prompt`` with its item replaced."""
    m = CODE_QUESTION.search(prompt)
    if m is None:
        raise ValueError(f"not a code prompt: {prompt!r}")
    return [(item, prompt[:m.start(1)] + item + prompt[m.end(1):]) for item in items]


def unseen_items(training_texts: Sequence[str], items: Sequence[str] = HELD_OUT_ITEMS
                 ) -> list[str]:
    """The ``items`` that no training text names (as a word, any case)."""
    words = {w.lower() for t in training_texts for w in re.findall(r"[A-Za-z]+", t)}
    return [it for it in items if it.lower() not in words]


def teaches_codes(training_texts: Sequence[str]) -> bool:
    """Whether the training data teaches demo codes (some record holds one, ``APPLE-5``):
    only then is the measure about what the run was meant to learn."""
    return any(text_code(item) in t for t in training_texts for item in TEXT_ITEMS)


def exact_match(completion: str, item: str) -> bool:
    """Whether ``completion`` is ``item``'s code (see the module docstring)."""
    return completion.strip() == text_code(item)


def measure_held_out(prompts: Sequence[str], training_texts: Sequence[str],
                     complete: Callable[[list[str]], list[dict]]) -> dict | None:
    """The exact-match measures of a run whose training data teaches demo codes and whose
    sample ``prompts`` ask for one; None otherwise, or when every held-out item is in
    ``training_texts``. ``complete`` returns, per prompt, ``{"prompt", "base", "lora"}``
    greedy completions."""
    prompt = code_prompt(prompts)
    items = unseen_items(training_texts)
    if prompt is None or not items or not teaches_codes(training_texts):
        return None
    pairs = held_out_prompts(prompt, items)
    rows = complete([p for _, p in pairs])
    out: dict = {"kind": "text_exact_match", "prompt": prompt, "items": items}
    for side in ("base", "lora"):
        hits = [exact_match(r[side], item) for (item, _), r in zip(pairs, rows, strict=True)]
        out[side] = {"exact_match": sum(hits) / len(hits), "prompts": len(hits)}
    out["rows"] = [{"item": item, "want": text_code(item), "base": r["base"], "lora": r["lora"]}
                   for (item, _), r in zip(pairs, rows, strict=True)]
    out.update({"exact_match_floor": EXACT_MATCH_FLOOR, "base_ceiling": BASE_CEILING,
                "definition": "exact_match: share of held-out demo prompts (items no training "
                              "record names) whose greedy completion is the item's code, e.g. "
                              "APPLE-5 (lora_kernel/training/text_metrics.py)"})
    return out


def learned(measures: dict) -> bool:
    """Whether the measures meet the demo's bounds."""
    return (measures["lora"]["exact_match"] >= measures["exact_match_floor"]
            and measures["base"]["exact_match"] <= measures["base_ceiling"])


def summary_line(measures: dict) -> str:
    """One line for the end of a run: the exact-match rates, base vs LoRA."""
    b, lo = measures["base"], measures["lora"]
    return (f"response pattern (exact match on {lo['prompts']} held-out prompts): base "
            f"{b['exact_match']:.0%} -> LoRA {lo['exact_match']:.0%} (LoRA floor "
            f"{measures['exact_match_floor']:.0%}, base ceiling {measures['base_ceiling']:.0%})")
