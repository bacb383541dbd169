"""Schema checks of the keys kohya sd-scripts / lora-scripts users bring (issue 24): the kohya
spellings of our own keys (aliases), the optimizer names and their packages, ``optimizer_args``
as kohya writes them (``["key=value", ...]``), and the ranges of the caption-habit keys.

:mod:`lora_kernel.training.config` calls these while building a
:class:`~lora_kernel.training.config.TrainConfig`; nothing here imports it (no cycle) and
nothing is read from disk. Every refusal is a :class:`ConfigError` naming the key and the fix.

Runs as: the user (in the kernel, the CLI and the pin step).
"""
from __future__ import annotations

import ast
import importlib.util
from collections.abc import Mapping
from typing import Any

from lora_kernel.common.errors import ConfigError

# kohya's spelling -> our key. Either is accepted; the canonical key is what is recorded.
KOHYA_ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "unet_lr": "learning_rate",
    "optimizer_type": "optimizer",
    "save_every_n_steps": "save_steps",
    "flip_aug": "random_flip",
    "network_weights": "init",
}

# optimizer -> (the module it needs, the pip distribution that ships it)
OPTIMIZERS = {
    "adamw": ("torch", "torch"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "lion8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adafactor": ("transformers", "transformers"),
}
# Optimizers kohya users name that need a package this platform does not ship: why and the fix.
NOT_SHIPPED = {
    "dadaptation": "dadaptation", "dadaptadam": "dadaptation", "dadaptlion": "dadaptation",
    "dadaptadagrad": "dadaptation", "dadaptadanip": "dadaptation", "dadaptsgd": "dadaptation",
    "dadaptadan": "dadaptation", "came": "came-pytorch", "adamwschedulefree": "schedulefree",
    "radamschedulefree": "schedulefree", "sgdschedulefree": "schedulefree",
    "pagedadamw8bit": "bitsandbytes (paged optimizers need CUDA)",
    "pagedlion8bit": "bitsandbytes (paged optimizers need CUDA)",
    "sgdnesterov": "(nothing: kohya's SGD variants are not offered here)",
    "sgdnesterov8bit": "(nothing: kohya's SGD variants are not offered here)",
}


def canonical_optimizer(name: str) -> str:
    """kohya's spelling of an optimizer (``AdamW8bit``, ``Lion``, ``AdaFactor``,
    ``bitsandbytes.optim.AdamW8bit``) as our name (``adamw8bit``)."""
    return str(name).rsplit(".", 1)[-1].replace("_", "").lower()


def resolve_aliases(raw: Mapping[str, Any], file: str) -> tuple[dict, list[str]]:
    """``raw`` with kohya spellings renamed to our keys, and one note per rename. Both
    spellings of one key: :class:`ConfigError` (which one is meant is ambiguous)."""
    out: dict[str, Any] = {}
    notes = []
    for key, value in raw.items():
        canon = KOHYA_ALIASES.get(str(key))
        if canon is None:
            if key in out:
                continue  # set by its alias first: the clash is reported below
            out[key] = value
            continue
        if canon in raw:
            raise ConfigError(f"is kohya's spelling of {canon}, which is set too; fix: keep "
                              f"one of them", file=file, key=str(key))
        out[canon] = value
        notes.append(f"{key} is kohya's spelling of {canon}; recorded as {canon}")
    return out, notes


def parse_optimizer_args(value: Any, file: str) -> dict:
    """kohya's ``optimizer_args`` (``["weight_decay=0.01", "betas=0.9,0.99"]``, or one
    string of them separated by spaces) as a dict of Python literals (``True``, numbers,
    lists); a value that is no literal stays text."""
    items = value.split() if isinstance(value, str) else list(value)
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"every item must be key=value, got {item!r}; fix: e.g. "
                              f"optimizer_args: [\"weight_decay=0.01\"]", file=file,
                              key="optimizer_args")
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = text
        if isinstance(parsed, tuple):  # lists survive the JSON of checkpoints and records
            parsed = list(parsed)
        out[key] = parsed
    return out


def lr_ceiling(optimizer: str) -> tuple[float, str]:
    """The learning rate's exclusive upper bound for ``optimizer`` and its typical values:
    Prodigy's LR multiplies its own estimate (kohya users set 1.0)."""
    if canonical_optimizer(optimizer) == "prodigy":
        return 10.0, "prodigy values are 0.5 .. 1.0 (it estimates the step size itself)"
    return 1.0, "LoRA values are 1e-5 .. 1e-3"


def optimizer_package_missing(name: str) -> str | None:
    """The pip package ``name`` needs when it is not installed, else None."""
    module, dist = OPTIMIZERS[name]
    return None if importlib.util.find_spec(module) is not None else dist


def check_habits(cfg) -> None:
    """Check the kohya-habit keys of a config being built (names, ranges, packages)."""
    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=cfg.source or "<config>", key=key)

    name = canonical_optimizer(cfg.optimizer)
    if name in NOT_SHIPPED:
        raise err("optimizer", f"{cfg.optimizer!r} needs {NOT_SHIPPED[name]}, which this "
                               f"platform does not ship; fix: use prodigy (D-Adaptation's "
                               f"successor, no LR to tune) or one of "
                               f"{', '.join(OPTIMIZERS)}")
    if name not in OPTIMIZERS:
        raise err("optimizer", f"unknown optimizer {cfg.optimizer!r}; fix: use one of "
                               f"{', '.join(OPTIMIZERS)}")
    missing = optimizer_package_missing(name)
    if missing:
        raise err("optimizer", f"{name} needs the package {missing}, which is not installed; "
                               f"fix: make setup (it is pinned), or use adamw")
    cfg.optimizer = name
    if name == "prodigy" and cfg.train_text_encoder:
        for key in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(cfg, key, None)
            if value is not None and value != cfg.learning_rate:
                raise err(key, f"prodigy takes one learning rate for every parameter group "
                               f"(it estimates the step size itself), got {value} beside "
                               f"learning_rate {cfg.learning_rate}; fix: remove {key} or set "
                               f"it to {cfg.learning_rate}")
    if not isinstance(cfg.optimizer_args, dict) or not all(
            isinstance(k, str) for k in cfg.optimizer_args):
        raise err("optimizer_args", "must map argument names to values")
    if cfg.lr_scheduler_num_cycles < 1:
        raise err("lr_scheduler_num_cycles", f"must be >= 1, got {cfg.lr_scheduler_num_cycles}")
    if cfg.lr_scheduler_power <= 0:
        raise err("lr_scheduler_power", f"must be > 0, got {cfg.lr_scheduler_power}")
    if not (0 <= cfg.min_lr < cfg.learning_rate):
        raise err("min_lr", f"must be in [0, learning_rate={cfg.learning_rate}), got "
                            f"{cfg.min_lr}; fix: e.g. min_lr: {cfg.learning_rate / 10:g}")
    if cfg.keep_tokens < 0:
        raise err("keep_tokens", f"must be >= 0, got {cfg.keep_tokens}")
    if not cfg.caption_separator.strip():
        raise err("caption_separator", "must not be empty or blank; fix: caption_separator: \",\"")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not (0 <= getattr(cfg, key) < 1):
            raise err(key, f"must be in [0, 1), got {getattr(cfg, key)}")
    if not (0 < cfg.multires_noise_discount <= 1):
        raise err("multires_noise_discount", f"must be in (0, 1], got "
                                             f"{cfg.multires_noise_discount}")
    from lora_kernel.training.reg import check_reg_keys
    check_reg_keys(cfg)
    from lora_kernel.training.adapters import check_adapter_keys
    check_adapter_keys(cfg)
    ext = cfg.caption_extension
    if ext is not None and (not ext.startswith(".") or "/" in ext or len(ext) < 2):
        raise err("caption_extension", f"must be a file suffix such as .txt, got {ext!r}")
