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


def quantized_model_bytes(cfg, tensors) -> int:
    """Bytes of the frozen weights of a model loaded per ``cfg.quantization`` (not none), from
    its checkpoint's ``(name, shape)`` pairs: the decoder layers' Linear weights at
    :func:`quantized_bytes_per_weight`; the rest (embeddings, output head, norms) as
    :func:`prepare_unquantized` leaves them: in the mixed-precision dtype, or float32."""
    q = quantized_bytes_per_weight(cfg)
    other = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    total = 0.0
    for name, shape in tensors:
        count = 1
        for d in shape:
            count *= int(d)
        total += count * (q if is_quantized_weight(name, list(shape)) else other)
    return int(total)


def prepare_unquantized(cfg, model) -> Any:
    """peft's ``prepare_model_for_kbit_training`` (freezes the base, float32 for every layer
    not quantized, input gradients for gradient checkpointing); then, with mixed_precision
    bf16/fp16, the input embeddings and output head go back to that dtype: in float32 they
    would cost 4 bytes x ~1B parameters on a Llama-3-8B, more than its 4-bit layers, and
    autocast computes them in half precision anyway."""
    import torch
    from peft import prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
    if cfg.mixed_precision in ("bf16", "fp16"):
        half = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to(half)
    return model
