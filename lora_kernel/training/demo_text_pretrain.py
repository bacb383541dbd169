"""Pre-training of the tiny demo causal LMs (``models/tiny-llama``, ``models/tiny-chat``), so
that they speak the demo's small grammar and a text LoRA's effect is measurable against them.

A randomly initialised LM answers every prompt with noise, with or without a LoRA. Here the
tiny Llama learns, from a small grammar over the demo's words (the LoRA's items and the
held-out items, :data:`HELD_OUT_ITEMS`), two *facts* about each word, each asked on its own:

* its spelling in capitals: ``Q: spell apple in capitals. A: APPLE``
* its letter count: ``Q: how many letters are in apple? A: (5)``

(the chat model learns the same as ChatML conversations, one to three exchanges, with or
without the demo's system prompt). The base never sees the demo LoRA's response pattern, a
*code* (``Q: what is the code for apple? A: APPLE-5``: both facts joined by a dash): only a
LoRA trained on the demo text data can add it, and because the base knows the two facts of
words the LoRA never trained on, a LoRA that learned the pattern (not the rows) answers
held-out words too (:mod:`lora_kernel.training.text_metrics` measures it).

The result is cached by content through :mod:`lora_kernel.training.demo_pretrain`'s helpers
(the same cache folder, key and lock; the key also hashes this module's source and the
token ids of the grammar); the training runs on one CPU thread with deterministic
algorithms: ``LM_STEPS`` steps, about 15 s for the tiny Llama and 40 s for the chat model
(longer sequences) on an idle 2-core machine (37 s and 79 s at load 7). Half the steps for
the chat model cost its LoRA's held-out exact-match rate 92% -> 58% (measured once); half
the batch, or padding each batch only to its own length, saved little time (the per-step
overhead dominates), so both models get the same recipe.

Runs as: the user (``lora demo-assets`` and everything that builds the demo assets).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

# Words the pre-training knows and the demo LoRA never trains on (its held-out prompts).
HELD_OUT_ITEMS = ("lime", "cedar", "harbor", "comet", "pebble", "walnut", "saddle", "lagoon",
                  "compass", "dolphin", "meadow", "ember")
PLAIN_FACTS = ("Q: spell {item} in capitals. A: {upper}",
               "Q: how many letters are in {item}? A: ({n})")
CHAT_FACTS = (("Spell {item} in capitals.", "{upper}"),
              ("How many letters are in {item}?", "({n})"))
LM_STEPS = 500
LM_LR = 3e-3
LM_BATCH = 32
RECIPE_VERSION = 1


def _fill(template: str, item: str) -> str:
    return template.format(item=item, upper=item.upper(), n=len(item))


def grammar_texts(items) -> list[str]:
    """The plain LM's pre-training texts: every fact of every item."""
    return [_fill(t, item) for item in items for t in PLAIN_FACTS]


def grammar_conversations(items, system: str, seed: int = 0) -> list[list[dict]]:
    """The chat model's pre-training conversations: every fact of every item as one
    exchange, then as many more of one to three exchanges mixing items (half of them after
    ``system``)."""
    rng = random.Random(f"chat-grammar-{seed}")
    facts = [(_fill(q, item), _fill(a, item)) for item in items for q, a in CHAT_FACTS]
    out = []
    for k, first in enumerate(facts + rng.sample(facts, len(facts))):
        turns = [first] + [rng.choice(facts) for _ in range(k % 3)]
        msgs = [{"role": "system", "content": system}] if k % 2 else []
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def _ids_of_texts(tokenizer, texts) -> list[list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(tokenizer(t, add_special_tokens=True).input_ids) + eos for t in texts]


def _ids_of_conversations(tokenizer, conversations) -> list[list[int]]:
    return [list(tokenizer(tokenizer.apply_chat_template(c, tokenize=False),
                           add_special_tokens=False).input_ids) for c in conversations]


def train_lm(model, sequences: list[list[int]], pad_id: int, seed: int,
             steps: int = LM_STEPS) -> None:
    """Train ``model`` (in place) as a language model of ``sequences`` (loss on every
    token)."""
    import torch

    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), n), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        labels[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    torch.manual_seed(seed + 300)
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LM_LR, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    g = torch.Generator().manual_seed(seed + 301)
    for _ in range(steps):
        idx = torch.randint(0, len(sequences), (LM_BATCH,), generator=g)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def pretrain_tiny_lm(model, tokenizer, *, items, seed: int, system: str | None = None,
                     steps: int = LM_STEPS, use_cache: bool = True) -> None:
    """Pre-train the tiny causal LM ``model`` (in place) on the grammar of ``items``: plain
    texts, or with ``system`` (a chat model: the tokenizer's chat template) conversations;
    or load the cached result of the same recipe from the same initial weights."""
    from lora_kernel.training.demo_pretrain import cached_state, deterministic_cpu, recipe_key

    if system is None:
        sequences = _ids_of_texts(tokenizer, grammar_texts(items))
    else:
        sequences = _ids_of_conversations(tokenizer, grammar_conversations(items, system, seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    name = "tiny-lm" if system is None else "tiny-chat"

    def train() -> dict:
        with deterministic_cpu():
            train_lm(model, sequences, pad, seed, steps=steps)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    if use_cache:
        key = recipe_key(name, {"lm": model}, seed=seed, steps=steps,
                         source=hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                         recipe_lm=RECIPE_VERSION, sequences=sequences)
        state = cached_state(name, key, train)
    else:
        state = train()
    model.load_state_dict(state, strict=True)
    model.eval()
