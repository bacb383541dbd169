"""The LoRA attached to the causal LM of the text task, with the options users ask for:
``use_dora`` (weight-decomposed LoRA), ``use_rslora`` (rank-stabilised scaling alpha/sqrt(r)),
``target_modules: all-linear`` (every Linear layer but the output head, peft's own rule), and
``init_adapter`` (continue from an existing PEFT adapter folder; its sha256 is recorded in the
new adapter's metadata and the training summary).

An ``init_adapter`` is checked before any model loads (:func:`check_init_adapter`): a PEFT
folder (``adapter_config.json`` + ``adapter_model.safetensors``, no pickles) of a LoRA with
this config's ``lora_rank``.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError

ALL_LINEAR = "all-linear"


def is_all_linear(targets: list[str]) -> bool:
    """Whether ``target_modules`` asks for every Linear layer."""
    return list(targets) == [ALL_LINEAR]


def lora_config(cfg) -> Any:
    """The peft ``LoraConfig`` of a fresh text LoRA."""
    from peft import LoraConfig, TaskType
    targets: Any = ALL_LINEAR if is_all_linear(cfg.targets) else cfg.targets
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_rank, lora_alpha=cfg.alpha,
                      target_modules=targets, lora_dropout=cfg.lora_dropout, bias="none",
                      use_dora=bool(cfg.use_dora), use_rslora=bool(cfg.use_rslora))


def attach(cfg, model) -> Any:
    """``model`` with its LoRA: a fresh one (:func:`lora_config`), or ``init_adapter`` loaded
    trainable."""
    from peft import PeftModel, get_peft_model
    if cfg.init_adapter:
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    return get_peft_model(model, lora_config(cfg))


def check_init_adapter(cfg, file: str) -> None:
    """Refuse an ``init_adapter`` that is not a safetensors PEFT LoRA folder of ``lora_rank``."""
    if not cfg.init_adapter:
        return
    folder = Path(cfg.init_adapter)
    conf_path = folder / "adapter_config.json"
    fix = "fix: point init_adapter at a PEFT adapter folder (an earlier text run's <output_name>/)"
    if not conf_path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json); "
                          f"{fix}", file=file, key="init_adapter")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{folder} has no adapter_model.safetensors (only safetensors "
                          f"adapters load here); {fix}", file=file, key="init_adapter")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{conf_path} is not JSON ({exc}); {fix}", file=file,
                          key="init_adapter") from None
    if conf.get("peft_type") != "LORA" or conf.get("r") != cfg.lora_rank:
        raise ConfigError(f"{folder} is a {conf.get('peft_type')} adapter of rank "
                          f"{conf.get('r')}, this config trains a LoRA of lora_rank "
                          f"{cfg.lora_rank}; fix: set lora_rank: {conf.get('r')} or start "
                          f"without init_adapter", file=file, key="init_adapter")


def init_adapter_sha256(cfg) -> str | None:
    """The content digest of ``init_adapter`` (every file of the folder), or None."""
    if not cfg.init_adapter:
        return None
    from lora_kernel.common.digests import path_sha256
    return path_sha256(cfg.init_adapter)
