"""The optimizers and LR schedules kohya users train with, built from a config: ``optimizer``
(adamw, adamw8bit, lion, lion8bit, prodigy, adafactor) with ``optimizer_args``, and
``lr_scheduler`` with ``lr_scheduler_num_cycles``, ``lr_scheduler_power`` and ``min_lr``.

The packages are the pinned ones: torch's AdamW, bitsandbytes' AdamW8bit / Lion8bit (its CPU
backend too), lion-pytorch's Lion, prodigyopt's Prodigy and transformers' Adafactor. Their
states checkpoint through the loop's pickle-free format (tensors in safetensors, the rest in
JSON), so a resumed run continues bit for bit on CPU.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from lora_kernel.common.errors import ConfigError

# Defaults kohya applies (or users always set) per optimizer, before optimizer_args.
ADAFACTOR_DEFAULTS = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def optimizer_class(name: str) -> type:
    """The optimizer class behind one of our optimizer names."""
    if name == "adamw":
        return torch.optim.AdamW
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
    if name == "lion":
        from lion_pytorch import Lion
        return Lion
    if name == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_kwargs(cfg, cls: type, *, fused: bool = False) -> dict:
    """The keyword arguments of ``cls`` for ``cfg``: its learning rate and weight decay, the
    optimizer's kohya defaults, then ``optimizer_args`` (lists as tuples: ``betas``). An
    argument ``cls`` does not take is a :class:`ConfigError` naming it."""
    kwargs: dict = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adafactor":
        kwargs.update(ADAFACTOR_DEFAULTS)
    if fused and cfg.optimizer == "adamw":
        kwargs["fused"] = True
    for key, value in cfg.optimizer_args.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    accepted = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key not in accepted:
            known = sorted(k for k in accepted if k not in ("self", "params"))
            raise ConfigError(f"{cfg.optimizer} takes no argument {key!r}; fix: use one of "
                              f"{', '.join(known)}", file=cfg.source, key="optimizer_args")
    if cfg.optimizer == "adafactor" and kwargs.get("relative_step"):
        raise ConfigError("adafactor with relative_step=True sets its own learning rate, "
                          "which the schedules here do not drive; fix: relative_step=False "
                          "(kohya's usual Adafactor settings) or optimizer: prodigy",
                          file=cfg.source, key="optimizer_args")
    return kwargs


def build_optimizer(cfg, param_groups: list[dict], *, fused: bool = False
                    ) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``param_groups`` (each group keeps its own lr)."""
    cls = optimizer_class(cfg.optimizer)
    return cls(param_groups, **optimizer_kwargs(cfg, cls, fused=fused))


def _floor(fn: Callable[[int], float], ratio: float, warmup: int) -> Callable[[int], float]:
    """``fn`` decaying to ``ratio`` instead of 0 after ``warmup`` steps."""
    def lr_lambda(step: int) -> float:
        value = fn(step)
        return value if step < warmup else ratio + (1.0 - ratio) * value
    return lr_lambda


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, n_steps: int):
    """The LR schedule of ``cfg`` (diffusers' schedules; ``min_lr`` lifts a decaying one's
    floor from 0 to ``min_lr`` / ``learning_rate`` of each group's peak)."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=n_steps,
                              num_cycles=cfg.lr_scheduler_num_cycles,
                              power=cfg.lr_scheduler_power)
    if not cfg.min_lr or cfg.lr_scheduler.startswith("constant"):
        return scheduler
    ratio = cfg.min_lr / cfg.learning_rate
    fns = [_floor(fn, ratio, cfg.lr_warmup_steps) for fn in scheduler.lr_lambdas]
    for group in optimizer.param_groups:  # undo the first schedule's step
        group["lr"] = group["initial_lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)


# -- pickle-free optimizer state -------------------------------------------------------------
NESTED = "/"  # "<param id>.<key>/<sub key>": a tensor inside a dict-valued state entry


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict()["state"]`` as tensors for safetensors and scalars for
    JSON, keyed ``"<param id>.<key>"``; a dict of tensors (bitsandbytes' quantization state
    ``__bnb_optimizer_quant_state__``) keyed ``"<param id>.<key>/<sub key>"``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict = {}
    for pid, entries in state.items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, dict) and value and all(
                    torch.is_tensor(v) for v in value.values()):
                for sub, tensor in value.items():
                    tensors[f"{pid}.{key}{NESTED}{sub}"] = tensor.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, scalars


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    """:func:`flatten_optimizer_state` undone: the ``state`` of ``load_state_dict``."""
    state: dict = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        pid, name = key.split(".", 1)
        entries = state.setdefault(int(pid), {})
        if NESTED in name:
            name, sub = name.split(NESTED, 1)
            entries.setdefault(name, {})[sub] = value
        else:
            entries[name] = value
    return state
