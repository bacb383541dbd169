"""Memory of QLoRA vs half precision vs float32 on a full-size language model (issue 23), from
the estimate ``lora config`` prints and ``lora train`` refuses by
(:func:`lora_kernel.training.models.estimate_text_memory`), for a Llama-3-8B-layout model
built on the meta device (no weight exists; nothing is downloaded): hidden 4096, 32 layers,
32 heads / 8 KV heads, intermediate 14336, vocab 128256, untied output head.

Rows: fp32, bf16 and nf4 (bitsandbytes 4-bit NormalFloat, double quantization, bf16 compute
and mixed precision) frozen weights, each with gradient checkpointing, batch 1, 2048 tokens,
LoRA on q_proj/v_proj; the ratio to bf16 and whether it fits a 24 GiB card (RTX 3090/4090).
The estimate is a lower bound (LoRA weights, optimizer states, the CUDA context and allocator
slack are left out; a real run needs about 1-2 GiB more).

    .venv/bin/python bench/llm_memory.py [--seq 2048] [--batch 1] [--json out.json]

Runs as: whoever benchmarks (a developer, CI); reads nothing but the code.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, tie_word_embeddings=False)
ROWS = {"fp32": {"mixed_precision": "no"}, "bf16": {"mixed_precision": "bf16"},
        "nf4": {"mixed_precision": "bf16", "quantization": "nf4"}}
CARD = 24 * 2 ** 30


def meta_tensors(arch: dict) -> list[tuple[str, list[int]]]:
    """``(name, shape)`` of every weight of a Llama of ``arch``, built on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**arch))
    return [(n, list(t.shape)) for n, t in model.state_dict().items()]


def run(seq: int, batch: int) -> list[dict]:
    from lora_kernel.training.config import config_from_mapping
    from lora_kernel.training.models import estimate_text_memory
    tensors = meta_tensors(LLAMA3_8B)
    params = sum(math.prod(s) for _, s in tensors)
    out = []
    for name, keys in ROWS.items():
        cfg = config_from_mapping({"task": "text", "base_model": "llama-3-8b-layout",
                                   "max_seq_length": seq, "batch_size": batch,
                                   "gradient_checkpointing": True, **keys})
        est = estimate_text_memory(cfg, tensors, LLAMA3_8B)
        out.append({"row": name, "params": params, "weights": est.weights,
                    "activations": est.activations, "device": est.device})
    bf16 = next(r["device"] for r in out if r["row"] == "bf16")
    for r in out:
        r["vs_bf16"] = r["device"] / bf16
        r["fits_24gib"] = r["device"] <= CARD
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    rows = run(a.seq, a.batch)
    print(f"Llama-3-8B layout ({rows[0]['params'] / 1e9:.2f} B parameters, meta device), "
          f"batch {a.batch}, {a.seq} tokens, gradient checkpointing")
    print("| frozen weights | weights GiB | activations GiB | total GiB | vs bf16 | fits 24 GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['weights'] / 2**30:.1f} | {r['activations'] / 2**30:.1f} | "
              f"{r['device'] / 2**30:.1f} | {r['vs_bf16']:.2f} | "
              f"{'yes' if r['fits_24gib'] else 'no'} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
