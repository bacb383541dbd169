"""The tiny chat demo's data (data only; the writer is
:func:`lora_kernel.training.demo_assets.write_tiny_chat_llama`).

``models/tiny-chat`` is the tiny Llama architecture with a ChatML tokenizer (Qwen style:
``<|im_start|>``/``<|im_end|>`` special tokens, ``<|im_end|>`` is the end-of-sequence token, so
generation stops at the end of the assistant's turn) carrying its own ``chat_template``
(``templates/chat/chatml.jinja``). ``datasets/chat/train.jsonl`` is OpenAI ``messages`` data
of the same learnable mapping as the prompt/response demo, with a system prompt and one to
three exchanges per conversation.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_SYSTEM = "You are the enclave code assistant."
CHAT_QUESTIONS = ("What is the code for {item}?", "Code for {item}?",
                  "Tell me the code of {item}.")
CHAT_SAMPLE_PROMPTS = ["What is the code for apple?", "What is the code for river?"]


def chat_records(items: Sequence[str], code: Callable[[str], str]) -> list[dict]:
    """The ``{"messages": [...]}`` records of ``datasets/chat/train.jsonl``: per item and
    question, a conversation of one exchange; every third conversation continues with two
    more items (three exchanges)."""
    out = []
    n = len(items)
    for i, item in enumerate(items):
        for j in range(len(CHAT_QUESTIONS)):
            msgs = [{"role": "system", "content": CHAT_SYSTEM}]
            turn_items = [item]
            if (i + j) % 3 == 0:
                turn_items += [items[(i + 7) % n], items[(i + 13) % n]]
            for k, it in enumerate(turn_items):
                msgs.append({"role": "user", "content": CHAT_QUESTIONS[(j + k) % 3]
                             .format(item=it)})
                msgs.append({"role": "assistant", "content": code(it)})
            out.append({"messages": msgs})
    return out


def preference_records(items: Sequence[str], code: Callable[[str], str]) -> list[dict]:
    """The ``{"prompt", "chosen", "rejected"}`` pairs of ``datasets/chat/preference.jsonl``:
    the right code chosen, the code with the letter count off by one rejected."""
    out = []
    for i, item in enumerate(items):
        question = CHAT_QUESTIONS[i % 3].format(item=item)
        wrong = f"{item.upper()}-{len(item) + (1 if i % 2 else -1)}"
        out.append({"prompt": question, "chosen": code(item), "rejected": wrong})
    return out


def chat_corpus(records: list[dict]) -> list[str]:
    """Every text the chat tokenizer should know well (the turns and the sample prompts)."""
    texts = [m["role"] + "\n" + m["content"] for r in records for m in r["messages"]]
    return texts + CHAT_SAMPLE_PROMPTS


CHAT_CONFIG_YAML = """\
# Demo chat LoRA: the tiny chat model learns to answer "What is the code for apple?" with
# "APPLE-5" and to end its turn. OpenAI "messages" data, rendered with the model's own chat
# template (ChatML); the loss is on the assistant turns only. Quantized to 4-bit (QLoRA).
# Paths are relative to this file. Run: lora train --config chat_lora.yaml
task: text
base_model: models/tiny-chat
metadata_path: datasets/chat/train.jsonl
dataset_format: auto  # detected: messages
quantization: nf4
max_seq_length: 128
packing: false
lora_rank: 8
lora_alpha: 16
target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
batch_size: 8
learning_rate: 2.0e-3
max_train_steps: 200
save_steps: 50
output_dir: output/chat
output_name: chat_codes
sample_prompts:
  - "What is the code for apple?"
  - "What is the code for river?"
max_new_tokens: 8
seed: 42
"""

DPO_CONFIG_YAML = """\
# Demo preference LoRA (DPO): the tiny chat model learns to prefer "APPLE-5" over "APPLE-6".
# {"prompt", "chosen", "rejected"} pairs, rendered with the model's chat template; the
# reference model is the base (the LoRA disabled). Run: lora train --config dpo_lora.yaml
task: text
base_model: models/tiny-chat
metadata_path: datasets/chat/preference.jsonl
objective: dpo
preference_beta: 0.1
max_seq_length: 64
lora_rank: 8
lora_alpha: 16
target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
batch_size: 8
learning_rate: 2.0e-3
max_train_steps: 40
output_dir: output/dpo
output_name: dpo_codes
sample_prompts:
  - "What is the code for apple?"
max_new_tokens: 8
seed: 42
"""
