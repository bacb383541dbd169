"""Will this run fit the machine's GPU? What ``lora config`` says before training starts: the
memory estimate (:func:`lora_kernel.training.models.estimate_training_memory`, a lower bound)
against each NVIDIA GPU's total and free memory, read through NVML (``pynvml``: no CUDA
context is created, so asking costs nothing and works in a kernel without torch imported).

Runs as: the user (their kernel, ``lora config``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    name: str
    total: int  # bytes
    free: int  # bytes


def nvml_gpus() -> list[Gpu]:
    """The GPUs NVML sees (those ``CUDA_VISIBLE_DEVICES`` hides included: the spawner sets
    it, NVML ignores it); [] without pynvml, a driver or a GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no library, no driver: NVML's errors are its own class tree
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(Gpu(i, name.decode() if isinstance(name, bytes) else str(name),
                           int(mem.total), int(mem.free)))
        return out
    finally:
        pynvml.nvmlShutdown()


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def fit_summary(cfg, gpus: list[Gpu] | None = None) -> str:
    """One line for ``lora config``: the estimate and, per GPU, whether it fits its free and
    total memory (with the settings that would shrink it when it fits none)."""
    from lora_kernel.training.models import estimate_training_memory
    est = estimate_training_memory(cfg)
    gpus = nvml_gpus() if gpus is None else gpus
    what = cfg.quantization if getattr(cfg, "quantization", "none") != "none" else (
        "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision)
    line = (f"memory estimate (lower bound) {_gib(est.device)}: weights {_gib(est.weights)} "
            f"in {what} + activations {_gib(est.activations)}")
    if not gpus:
        return line + "; no GPU seen through NVML: training runs on the CPU"
    verdicts = []
    for gpu in gpus:
        if est.device <= gpu.free:
            verdict = "fits"
        elif est.device <= gpu.total:
            verdict = f"fits its total but not the {_gib(gpu.free)} free now"
        else:
            verdict = "does NOT fit"
        verdicts.append(f"GPU {gpu.index} {gpu.name} ({_gib(gpu.total)}) {verdict}")
    line += "; " + "; ".join(verdicts)
    if all(est.device > g.total for g in gpus):
        hints = []
        if cfg.task == "text" and getattr(cfg, "quantization", "none") == "none":
            hints.append("quantization: nf4")
        if cfg.mixed_precision == "no":
            hints.append("mixed_precision: bf16")
        if not cfg.gradient_checkpointing:
            hints.append("gradient_checkpointing: true")
        if hints:
            line += "; to shrink it: " + ", ".join(hints)
    return line
