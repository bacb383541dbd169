"""Model safety: the one refusal path for what could run code when a model is loaded.

:func:`check_model_path` refuses, with :class:`UnsafeModelError` (exit code 3), before any
library sees the path and without unpickling anything:

* pickle formats (``.ckpt .bin .pt .pth .pkl .pickle``), as a file or in a model folder
  without a safetensors alternative next to it;
* configs that ask for code (``auto_map``, ``trust_remote_code``, ``custom_pipeline``, or a
  ``model_index.json`` component from a library other than diffusers / transformers).

The config validator (:mod:`lora_kernel.training.config`) and the loaders
(:mod:`lora_kernel.training.models`) both call it, so a pickle gets the same answer from
``lora config``, ``lora run`` and ``lora train``. Standard library only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lora_kernel.common.errors import ConfigError, UnsafeModelError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipeline")
SAFE_LIBRARIES = ("diffusers", "transformers", None)
# JSON files scanned for code requests (large data files such as vocabularies are skipped).
_MAX_CONFIG_BYTES = 4 << 20
_DATA_JSON = ("vocab.json", "tokenizer.json")

_CONVERT_HINT = ("convert it to .safetensors on a trusted machine (e.g. load it there and "
                 "save_pretrained(..., safe_serialization=True)) and copy only the "
                 ".safetensors files and configs here")
_CODE_HINT = ("remove the {key!r} entry and use a built-in transformers/diffusers architecture "
              "(model_type / _class_name); custom modelling code never runs here")


# -- refusal ------------------------------------------------------------------------------
def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` resolved if it is safe to load, else raise.

    Raises :class:`UnsafeModelError` for pickle files and remote-code configs, and
    :class:`ConfigError` (key ``base_model``) for a missing path or an unsupported file.
    Nothing is loaded or unpickled here; only file names and small JSON configs are read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model not found: {p}; fix: point base_model at a local model "
                          f"folder or .safetensors file (`lora demo-assets` builds tiny ones)",
                          key="base_model")
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeModelError(
                f"{p}: refusing to load a pickle file ({p.suffix}): unpickling can run "
                f"arbitrary code; fix: {_CONVERT_HINT}")
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(f"unsupported model file {p.name}; fix: use a .safetensors "
                              f"file or a model folder", key="base_model")
        return p
    _check_folder_pickles(p)
    for cfg in sorted(p.rglob("*.json")):
        _check_config_file(cfg)
    return p


def _check_folder_pickles(folder: Path) -> None:
    by_dir: dict[Path, list[Path]] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            by_dir.setdefault(f.parent, []).append(f)
    for files in by_dir.values():
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix.lower() == ".safetensors" for f in files):
            names = ", ".join(f.relative_to(folder).as_posix() for f in pickles)
            raise UnsafeModelError(
                f"{folder}: refusing to load pickle weights ({names}) with no .safetensors "
                f"alternative: unpickling can run arbitrary code; fix: {_CONVERT_HINT}")


def _check_config_file(cfg: Path) -> None:
    if cfg.name in _DATA_JSON or cfg.stat().st_size > _MAX_CONFIG_BYTES:
        return
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg} is not valid JSON ({exc}); fix: repair or remove it",
                          key="base_model") from None
    if not isinstance(data, dict):
        return
    for key in CODE_KEYS:
        if key in data and data[key] not in (None, False, {}, ""):
            raise UnsafeModelError(f"{cfg}: asks for custom code ({key!r}); fix: "
                                   + _CODE_HINT.format(key=key))
    if cfg.name == "model_index.json":
        for name, value in data.items():
            if (not name.startswith("_") and isinstance(value, list) and len(value) == 2
                    and value[0] not in SAFE_LIBRARIES):
                raise UnsafeModelError(
                    f"{cfg}: component {name!r} comes from {value[0]!r}, which would import "
                    f"code from the model folder; fix: use diffusers/transformers classes")
