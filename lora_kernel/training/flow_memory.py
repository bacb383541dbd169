"""The memory a Flux.1 / SD3.5 LoRA run needs, from the diffusers folder's safetensors headers
and transformer config alone (no tensor is read): the part of
:func:`lora_kernel.training.models.estimate_training_memory` for transformer models::

    weights     = q x transformer parameters + w x (VAE + text encoders)
    activations = a x B x L x T x D x m  (+ with gradient_checkpointing: one block's maps)

q: bytes per frozen transformer weight (``quantization``: nf4 0.5625 — 4 bits plus one
fp32 absmax per 64 —, int8 and fp8 1, else the mixed-precision dtype's 2 or 4); w: that
dtype's bytes (the text encoders sit on the device while their outputs are cached, T5-XXL
alone is 9.5 GB in bf16). L: transformer blocks (Flux: double + single; SD3: joint), T:
tokens per image (``(R / 16)^2`` latent patches plus the T5 sequence, 512 / 256 tokens, plus
SD3's 77 CLIP tokens), D: ``num_attention_heads x attention_head_dim``, m: feature maps of
width D kept per token and block for the backward pass (a double-stream / joint block: per
stream the norms, q, k, v and their qk-norms, attention out and projection, the 4D MLP
input and activation, m = 2 x 20; a Flux single block: q, k, v, qk-norms, the 4D MLP input
and activation, the 5D concatenation, m = 21). With gradient_checkpointing each block keeps
only its input (2 streams: 2, else 1), plus one block's maps recomputed.
a: 2 bytes with mixed_precision bf16/fp16, else 4. Like the UNet estimate it is a lower
bound: the LoRA weights, their optimizer states and workspace are left out.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from pathlib import Path

from lora_kernel.training.families.detect import read_json
from lora_kernel.training.model_safety import read_safetensors_header

QUANT_BYTES = {"nf4": 0.5625, "int8": 1.0, "fp8": 1.0}


def _params(folder: Path) -> int:
    """Parameters in a component folder's safetensors files (headers only; a sharded
    checkpoint through its index, ``.fp16`` variants not counted twice)."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.name.count(".") == 1
                   or "-of-" in f.name)
    n = 0
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            n += count
    return n


def flow_memory(cfg, folder: Path, *, weight_bytes: int, vae_bytes: int) -> tuple[int, int]:
    """``(weights, activations)`` in bytes for a run of ``cfg`` on the transformer model in
    ``folder`` (see the module docstring)."""
    conf = read_json(folder / "transformer" / "config.json")
    q = QUANT_BYTES.get(cfg.quantization, weight_bytes)
    weights = int(q * _params(folder / "transformer"))
    weights += vae_bytes * _params(folder / "vae")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if (folder / part).is_dir():
            weights += weight_bytes * _params(folder / part)
    a = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    width = int(conf.get("num_attention_heads", 0)) * int(conf.get("attention_head_dim", 0))
    patches = (cfg.resolution // 16) ** 2
    if "num_single_layers" in conf:  # Flux: double-stream then single-stream blocks
        text = 512
        blocks = [(2, 40)] * int(conf.get("num_layers", 0))
        blocks += [(1, 21)] * int(conf.get("num_single_layers", 0))
    else:  # SD3: joint blocks over image and text tokens (CLIP 77 + T5 256)
        text = 77 + 256
        blocks = [(2, 40)] * int(conf.get("num_layers", 0))
    tokens = patches + text
    if cfg.gradient_checkpointing:
        kept = sum(streams for streams, _ in blocks) * tokens * width
        kept += max((m for _, m in blocks), default=0) * tokens * width
    else:
        kept = sum(m for _, m in blocks) * tokens * width
    return weights, a * cfg.batch_size * kept
