"""How the frozen causal LM of the text task is loaded: in float32, in half precision
(``mixed_precision: bf16 | fp16``), or quantized through bitsandbytes (``quantization: nf4 |
fp4 | int8``, QLoRA), and the bytes per weight each choice costs (for the memory estimate).

Quantized loading is ``transformers``' own (``BitsAndBytesConfig``: the 4-bit quant type,
double quantization, the compute dtype), followed by peft's ``prepare_model_for_kbit_training``
(the layers left unquantized, norms, embeddings and the output head, go to float32; input
gradients are enabled for gradient checkpointing). LoRA is then attached on top and its weights
stay float32. bitsandbytes 0.50 has CPU kernels, so this runs (slowly) without a GPU too.

A missing or unusable bitsandbytes is refused when the config is checked
(:func:`bitsandbytes_problem`), before anything loads.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from typing import Any

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Bytes per quantized weight: 4-bit values plus one absmax per block of 64 (fp32, or with
# double quantization an 8-bit value per block plus one fp32 per 256 blocks); int8 rows keep
# an fp32 scale each (negligible).
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0}
QUANT_BYTES_DOUBLE = 0.5 + 1 / 64 + 4 / (64 * 256)


def compute_dtype_name(cfg) -> str:
    """The dtype 4-bit layers compute in: ``bnb_4bit_compute_dtype``, or with ``auto`` the
    mixed-precision dtype (bfloat16 when mixed_precision is no)."""
    choice = getattr(cfg, "bnb_4bit_compute_dtype", "auto")
    if choice != "auto":
        return _DTYPES[choice]
    return "float16" if cfg.mixed_precision == "fp16" else "bfloat16"


def quantized_bytes_per_weight(cfg) -> float:
    """Bytes one quantized weight costs under ``cfg.quantization`` (not ``none``)."""
    if cfg.quantization in ("nf4", "fp4") and getattr(cfg, "bnb_4bit_use_double_quant", True):
        return QUANT_BYTES_DOUBLE
    return QUANT_BYTES[cfg.quantization]


def is_quantized_weight(name: str, shape: list[int]) -> bool:
    """Whether a checkpoint tensor becomes a bitsandbytes layer: the 2-D weights of the
    decoder layers' Linear modules (embeddings, norms and the output head are not)."""
    return (len(shape) == 2 and name.endswith(".weight") and ".layers." in name
            and "embed" not in name and "norm" not in name)


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize here (not installed, no backend for this machine),
    or None when it can."""
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes  # noqa: F401
        import torch
        from bitsandbytes.functional import quantize_4bit
        probe = torch.ones(64, dtype=torch.bfloat16,
                           device="cuda" if torch.cuda.is_available() else "cpu")
        quantize_4bit(probe, quant_type="nf4")
    except Exception as exc:  # any failure of the probe: report it as the reason
        return f"bitsandbytes cannot quantize on this machine ({type(exc).__name__}: {exc})"
    return None


def bnb_config(cfg) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of ``cfg.quantization`` (None for ``none``)."""
    if cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=bool(cfg.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype_name(cfg)),
        bnb_4bit_quant_storage=torch.uint8)


def base_dtype_label(cfg, weight_dtype: str) -> str:
    """What the training summary records as the frozen base's dtype: ``nf4`` (etc.) for a
    quantized model, else the torch dtype name."""
    return cfg.quantization if cfg.quantization != "none" else weight_dtype


def load_text_model(cfg, *, dtype, device) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``cfg.base_model``: in ``dtype``, or quantized per
    ``cfg.quantization`` onto ``device`` and prepared for k-bit training."""
    from lora_kernel.training.models import load_causal_lm
    quant = bnb_config(cfg)
    if quant is None:
        return load_causal_lm(cfg.base_model, dtype=dtype)
    from peft import prepare_model_for_kbit_training
    model, tokenizer = load_causal_lm(cfg.base_model, dtype=quant.bnb_4bit_compute_dtype
                                      if cfg.quantization != "int8" else dtype,
                                      quantization_config=quant, device=device)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
    return model, tokenizer
