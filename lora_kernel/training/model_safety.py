"""Model safety: the one refusal path for what could run code when a model is loaded, and for
a base model that cannot be what the config says it is.

:func:`check_model_path` refuses, with :class:`UnsafeModelError` (exit code 3), before any
library sees the path and without unpickling anything:

* pickle formats (``.ckpt .bin .pt .pth .pkl .pickle``), as a file or in a model folder
  without a safetensors alternative next to it, and a pickle or torch zip file renamed to
  ``.safetensors`` (recognised by its first bytes);
* configs that ask for code (``auto_map``, ``trust_remote_code``, ``custom_pipeline``, or a
  ``model_index.json`` component from a library other than diffusers / transformers).

It refuses with :class:`ConfigError` (exit code 2, key ``base_model``) a missing path, an
empty or corrupt ``.safetensors`` file (only the 8-byte header length and the JSON header are
read: :func:`read_safetensors_header`), and, given the config's ``task``, a model of the wrong
kind: an empty folder, a folder without weights, a text model for ``task: image`` or a Stable
Diffusion model for ``task: text``.

The config validator (:mod:`lora_kernel.training.config`) and the loaders
(:mod:`lora_kernel.training.models`) both call it, so a pickle gets the same answer from
``lora config``, ``lora run`` and ``lora train``. Standard library only.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import os
import struct
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
# safetensors: 8-byte little-endian header length, then that many bytes of JSON. The format
# itself refuses headers over 100 MB.
SAFETENSORS_MAX_HEADER = 100_000_000
_TORCH_ZIP = b"PK\x03\x04"
_IMAGE_FIX = "point base_model at a diffusers folder or a .safetensors checkpoint"
_TEXT_FIX = ("point base_model at a Hugging Face causal-LM folder (config.json, *.safetensors, "
             "tokenizer files)")
# Key prefixes of a single-file Stable Diffusion checkpoint (LDM/A1111 or prefixed diffusers;
# see lora_kernel.training.single_file) and typical ones of a text model's weights.
_SD_PREFIXES = ("model.diffusion_model.", "unet.")
_FLOW_MARKERS = ("double_blocks.", "joint_blocks.")  # Flux / SD3 transformers, bare
_LM_MARKERS = ("lm_head.", "embed_tokens.", ".layers.", "transformer.h.", "gpt_neox.")


# -- refusal ------------------------------------------------------------------------------
def check_model_path(path: str | os.PathLike, task: str | None = None) -> Path:
    """Return ``path`` resolved if it is safe to load, else raise.

    Raises :class:`UnsafeModelError` for pickle files (also renamed to ``.safetensors``) and
    remote-code configs, and :class:`ConfigError` (key ``base_model``) for a missing path, an
    unsupported, empty or corrupt file and, when ``task`` (``"image"`` / ``"text"``) is given,
    a model that is not of that kind (:func:`check_model_kind`). Nothing is loaded or
    unpickled here; only file names, small JSON configs and safetensors headers are read.
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
        read_safetensors_header(p)
    else:
        _check_folder_pickles(p)
        for cfg in sorted(p.rglob("*.json")):
            _check_config_file(cfg)
        for weights in sorted(p.rglob("*.safetensors")):
            read_safetensors_header(weights)
    if task is not None:
        check_model_kind(p, task)
    return p


# -- safetensors headers --------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a ``.safetensors`` file: ``{tensor name: {"dtype", "shape",
    "data_offsets"}}`` plus an optional ``"__metadata__"``. Only the 8-byte little-endian
    header length and the header itself are read, never a tensor.

    Raises :class:`UnsafeModelError` for a pickle (protocol 2+) or torch zip file renamed to
    ``.safetensors``, and :class:`ConfigError` (key ``base_model``) for an empty file or one
    that is not a well-formed safetensors file (truncated, random bytes, offsets past the
    end).
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise ConfigError(f"{p} is empty (0 bytes); fix: copy the model file again (an "
                          f"interrupted copy or download leaves an empty file)", key="base_model")
    with open(p, "rb") as fh:
        head = fh.read(8)
        if (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) or \
                head.startswith(_TORCH_ZIP):
            kind = "torch zip" if head.startswith(_TORCH_ZIP) else f"pickle protocol {head[1]}"
            raise UnsafeModelError(
                f"{p}: this is a pickle/torch file renamed to .safetensors (it starts like a "
                f"{kind} file); refusing to load it: unpickling can run arbitrary code; "
                f"fix: {_CONVERT_HINT}")
        if len(head) < 8:
            raise _corrupt(p, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER or n > size - 8:
            raise _corrupt(p, f"its header length field says {n} bytes, the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(p, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(p, "its header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) for o in info["data_offsets"]))
        if not ok:
            raise _corrupt(p, f"the header entry of tensor {name!r} is malformed")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise _corrupt(p, f"tensor {name!r} lies at bytes {begin}..{end} of a "
                              f"{data_size}-byte data section (truncated file?)")
    return header


def _corrupt(p: Path, why: str) -> ConfigError:
    return ConfigError(f"{p} is not a valid .safetensors file ({why}); fix: copy the file "
                       f"again or re-export it with safetensors (a truncated download or a "
                       f"file of another format renamed to .safetensors looks like this)",
                       key="base_model")


# -- what kind of model ---------------------------------------------------------------------
def check_model_kind(path: Path, task: str) -> None:
    """Refuse (:class:`ConfigError`, key ``base_model``) a model that cannot serve ``task``.

    ``task: image`` needs a diffusers folder (``model_index.json`` or ``unet/``, with
    ``unet/ vae/ text_encoder/`` weights) or a single ``.safetensors`` checkpoint holding UNet
    weights (``model.diffusion_model.*`` or ``unet.*``). ``task: text`` needs a Hugging Face
    folder with ``config.json`` and ``*.safetensors`` weights. Empty folders, folders with a
    config but no weights, text models given to ``task: image`` and Stable Diffusion models
    given to ``task: text`` are refused with the fix. Only names, small JSON files and
    safetensors headers are read.
    """
    if path.is_file():
        keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
        sd = any(k.startswith(_SD_PREFIXES) or k.startswith(_FLOW_MARKERS) for k in keys)
        lm = next((k for k in keys if any(m in k for m in _LM_MARKERS)), None)
        if task == "text":
            what = "a Stable Diffusion checkpoint" if sd else "a single weights file"
            raise ConfigError(f"{path} is {what}; a text model must be a model folder; fix: "
                              f"set task: image to train an image LoRA on it, or {_TEXT_FIX}",
                              key="base_model")
        if not sd and lm:
            raise ConfigError(f"{path} holds a text model's weights (e.g. {lm!r}), not a Stable "
                              f"Diffusion checkpoint; fix: set task: text and point base_model "
                              f"at that model's folder, or {_IMAGE_FIX}", key="base_model")
        if not sd:
            raise no_layout_error(path, keys)
        return
    names = sorted(f.name for f in path.iterdir())
    if not names:
        fix = _IMAGE_FIX if task == "image" else _TEXT_FIX
        raise ConfigError(f"model folder {path} is empty; fix: copy the model into it, or "
                          f"{fix}", key="base_model")
    diffusers = (path / "model_index.json").is_file() or (path / "unet").is_dir()
    if task == "image":
        if not diffusers:
            arch = _architecture(path / "config.json")
            if arch:
                raise ConfigError(f"{path} is a text model ({arch}), not a Stable Diffusion "
                                  f"model; fix: set task: text to train a text LoRA on it, or "
                                  f"{_IMAGE_FIX}", key="base_model")
            raise ConfigError(f"{path} is not a diffusers folder (no model_index.json or unet/; "
                              f"it holds {_listing(names)}); fix: {_IMAGE_FIX}", key="base_model")
        denoiser = "transformer" if (path / "transformer").is_dir() else "unet"
        for part in (denoiser, "vae", *_text_encoders(path)):
            if not any((path / part).glob("*.safetensors")):
                raise ConfigError(f"{path} has no {part} weights ({part}/*.safetensors); fix: "
                                  f"copy the model's {part}/ folder with its .safetensors "
                                  f"file, or {_IMAGE_FIX}", key="base_model")
        return
    if diffusers:
        raise ConfigError(f"{path} is a Stable Diffusion (diffusers) model, not a text model; "
                          f"fix: set task: image to train an image LoRA on it, or {_TEXT_FIX}",
                          key="base_model")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json, so it is not a Hugging Face model folder "
                          f"(it holds {_listing(names)}); fix: {_TEXT_FIX}", key="base_model")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no weights (*.safetensors), only {_listing(names)}; fix: "
                          f"copy the model's .safetensors files and tokenizer files next to "
                          f"its config.json", key="base_model")


def no_layout_error(path: Path, keys: list[str]) -> ConfigError:
    """The refusal of a checkpoint whose tensor names fit no layout a loader reads."""
    shown = ", ".join(repr(k) for k in sorted(keys)[:3]) or "none"
    return ConfigError(
        f"{path}: its tensor names fit no known checkpoint layout (first: {shown}); known: the "
        f"original layout of SD1.x/SD2 ('model.diffusion_model.', 'cond_stage_model.') and "
        f"SDXL ('model.diffusion_model.', 'conditioner.embedders.0/1.'), and prefixed "
        f"diffusers names ('unet.', 'vae.', 'text_encoder.'); fix: {_IMAGE_FIX}",
        key="base_model")


def _text_encoders(folder: Path) -> list[str]:
    """The text-encoder components a diffusers folder's ``model_index.json`` names
    (``text_encoder``, and SDXL's / Flux's ``text_encoder_2``, SD3.5's ``text_encoder_3``);
    ``text_encoder`` without an index."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["text_encoder"]
    if not isinstance(index, dict):
        return ["text_encoder"]
    names = [k for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
             if isinstance(index.get(k), list) and index[k] and index[k][0]]
    return names or ["text_encoder"]


def _architecture(config: Path) -> str | None:
    """The architecture a Hugging Face ``config.json`` names (``architectures[0]`` or
    ``model_type``), or None."""
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    archs = data.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = data.get("model_type")
    return f"model_type {model_type}" if isinstance(model_type, str) else None


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


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
