"""Which dtype each part of a training run lives in.

With ``mixed_precision: bf16`` or ``fp16`` the frozen base weights (UNet, text encoders, VAE;
the causal LM of the text task) are loaded in that dtype, which halves their memory and spares
autocast a cast of every weight at every step. The trainable LoRA weights stay in float32, as
in the diffusers training examples: their updates are far below a half-precision weight's
resolution, and the optimizer (which sees only them) keeps float32 states.

The VAE has its own key, ``vae_dtype``: ``auto`` follows the weights, except that a family
whose VAE overflows in fp16 (SDXL's produces inf/NaN latents) keeps it in float32 then.

Pure functions of the config (and the family), so the loaders, the memory estimate and the
training summary agree on one answer.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from typing import Any

# config value -> torch dtype name
DTYPE_NAMES = {"no": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
VAE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def weight_dtype_name(cfg) -> str:
    """The dtype name (``float32``, ``bfloat16``, ``float16``) of the frozen base weights."""
    return DTYPE_NAMES[cfg.mixed_precision]


def vae_dtype_name(cfg, *, vae_fp16_overflows: bool = False) -> str:
    """The VAE's dtype name: ``vae_dtype`` when set, else the weights' dtype, except float32
    for fp16 weights when the family's VAE overflows in fp16 (``vae_fp16_overflows``)."""
    choice = getattr(cfg, "vae_dtype", "auto")
    if choice != "auto":
        return DTYPE_NAMES[choice]
    name = weight_dtype_name(cfg)
    if name == "float16" and vae_fp16_overflows:
        return "float32"
    return name


def torch_dtype(name: str) -> Any:
    """``torch.<name>``."""
    import torch
    return getattr(torch, name)


def bytes_per_param(name: str) -> int:
    """Bytes of one parameter stored as ``name``."""
    return 4 if name == "float32" else 2


def keep_trainable_fp32(*modules) -> None:
    """Cast the trainable parameters (the LoRA weights: the only ones with ``requires_grad``)
    of ``modules`` to float32; frozen weights keep their dtype. peft creates a LoRA layer in
    its base layer's dtype, so after attaching LoRA to half-precision weights this is what
    keeps the trained weights, their gradients and the optimizer states in float32."""
    import torch
    for module in modules:
        if module is None:
            continue
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def trainable_dtype_name(named: dict) -> str:
    """The dtype name of the trainable parameters (``"float32"``; several joined by ``+``)."""
    names = sorted({str(p.dtype).removeprefix("torch.") for p in named.values()})
    return "+".join(names) if names else "none"
