"""Safe, local model loading.

Every model loads from a local path, never the network (``local_files_only=True``), from
safetensors only (``use_safetensors=True``), and never with custom code
(``trust_remote_code=False``). Before any library sees a path,
:func:`lora_kernel.training.model_safety.check_model_path` refuses what could run code when
loaded (the validator calls the same function: one refusal path, one exit code).

Image base models are a diffusers folder or one ``.safetensors`` file, in the LDM/A1111 key
layout or prefixed diffusers layout (:mod:`lora_kernel.training.single_file`). A single file carries
weights only; its configs come from ``config=`` (a diffusers folder without weights) or from
the configs bundled in ``lora_kernel/configs/`` (``tiny-sd``; ``sd15`` for SD1.x), picked by
the checkpoint's shapes. The bundled ``sd15`` has no tokenizer (CLIP's vocabulary cannot be
written offline): put the CLIP tokenizer folder (``vocab.json``, ``merges.txt``) next to the
checkpoint as ``tokenizer/`` or pass ``tokenizer=``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import path_sha256
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.model_safety import check_model_path

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


# -- digests ------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple, str] = {}


def model_sha256(path: str | os.PathLike) -> str:
    """The digest of a model: a file's sha256, or for a folder the sha256 over the sorted
    lines ``<relative posix path>\\0<file sha256>\\n`` of every file in it.

    Cached in memory per path and the (size, mtime) of every file, so a changed file is
    always re-hashed.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ConfigError(f"model not found: {p}", key="base_model")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stamp = tuple((f.as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (p.as_posix(), stamp)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    digest = path_sha256(p)
    _SHA_CACHE[key] = digest
    return digest


# -- Stable Diffusion ---------------------------------------------------------------------
@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that LoRA training and sampling need."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler, for training
    sample_scheduler: Any  # the model's own scheduler class (DDIM, PNDM, ...), for sampling
    source_path: Path
    sha256: str
    config_path: Path | None = None  # where the configs came from (a single file's bundle)


def _schedulers(config_dir: Path):
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cfg_file = config_dir / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} not found; fix: add the scheduler config",
                          key="base_model")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDIMScheduler
    return DDPMScheduler.from_config(cfg), cls.from_config(cfg)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_sd_components(path: str | os.PathLike, *, dtype=None, config: str | os.PathLike |
                       None = None, tokenizer: str | os.PathLike | None = None) -> SDComponents:
    """Load a Stable Diffusion model from a diffusers folder or a single ``.safetensors``.

    ``config`` (single file only): a diffusers folder with the configs (weights not needed);
    default: the bundled config matching the checkpoint. ``tokenizer``: a CLIP tokenizer
    folder overriding the model's. All modules are returned in eval mode on CPU in ``dtype``
    (default float32).
    """
    p = check_model_path(path)  # refuse before any ML library is even imported
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = dtype or torch.float32
    if p.is_dir():
        kw = dict(local_files_only=True, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(p, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(p, subfolder="text_encoder",
                                                     trust_remote_code=False, **kw)
        tok_dir = Path(tokenizer) if tokenizer else p / "tokenizer"
        cfg_dir = p
    else:
        unet, vae, text_encoder, cfg_dir = _load_single_file(p, config)
        tok_dir = Path(tokenizer) if tokenizer else _find_tokenizer(p, cfg_dir)
    if not (tok_dir / "vocab.json").is_file() and not (tok_dir / "tokenizer.json").is_file():
        raise ConfigError(f"no CLIP tokenizer in {tok_dir}; fix: copy the model's tokenizer "
                          f"folder (vocab.json, merges.txt) there", key="base_model")
    check_model_path(tok_dir)
    noise_scheduler, sample_scheduler = _schedulers(cfg_dir)
    for m in (unet, vae, text_encoder):
        if next(m.parameters()).dtype != dtype:
            m.to(dtype=dtype)
        m.eval()
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder,
                        tokenizer=_load_tokenizer(tok_dir), noise_scheduler=noise_scheduler,
                        sample_scheduler=sample_scheduler, source_path=p,
                        sha256=model_sha256(p), config_path=cfg_dir)


def bundled_config(name: str) -> Path:
    """The folder of a bundled config set (``tiny-sd``, ``sd15``)."""
    folder = BUNDLED_CONFIGS / name
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"no bundled config {name!r} (have: "
                          f"{', '.join(sorted(d.name for d in BUNDLED_CONFIGS.iterdir()))})",
                          key="base_model")
    return folder


def detect_bundled_config(path: str | os.PathLike) -> Path:
    """Pick the bundled config for a single-file checkpoint from its tensor shapes (read
    from the safetensors header; no tensor is loaded)."""
    from safetensors import safe_open

    from lora_kernel.training.single_file import LDM_UNET

    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        shapes = {}
        for key in (LDM_UNET + "input_blocks.0.0.weight", "unet.conv_in.weight"):
            if key in keys:
                shapes["conv_in"] = tuple(fh.get_slice(key).get_shape())
        for key in sorted(keys):
            if key.endswith("attn2.to_k.weight"):
                shapes["cross"] = tuple(fh.get_slice(key).get_shape())
                break
    known = {((32, 4, 3, 3), 32): "tiny-sd", ((320, 4, 3, 3), 768): "sd15"}
    arch = (shapes.get("conv_in"), (shapes.get("cross") or (0, 0))[1])
    if arch not in known:
        raise ConfigError(
            f"{path}: unknown architecture (UNet conv_in {arch[0]}, cross-attention width "
            f"{arch[1]}); bundled configs cover SD1.x and the demo's tiny-sd; fix: pass "
            f"config=<a diffusers folder with this model's configs>", key="base_model")
    return bundled_config(known[arch])


def _find_tokenizer(ckpt: Path, cfg_dir: Path) -> Path:
    for cand in (ckpt.parent / "tokenizer", ckpt.with_suffix("") / "tokenizer",
                 cfg_dir / "tokenizer"):
        if (cand / "vocab.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    raise ConfigError(
        f"{ckpt}: no CLIP tokenizer found (looked in {ckpt.parent / 'tokenizer'} and "
        f"{cfg_dir / 'tokenizer'}); the bundled '{cfg_dir.name}' configs cannot include "
        f"CLIP's vocabulary offline; fix: copy the model's tokenizer folder (vocab.json, "
        f"merges.txt, from any SD1.x diffusers model) next to the checkpoint as "
        f"'tokenizer/', or pass a config folder that has one", key="base_model")


def _load_single_file(p: Path, config):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_kernel.training.single_file import fit_clip_keys, split_checkpoint

    cfg_dir = check_model_path(config) if config else detect_bundled_config(p)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir / "vae"))
    te_cfg = CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"), local_files_only=True)
    text_encoder = CLIPTextModel(te_cfg)
    checkpoint = load_file(str(p))
    unet_sd, vae_sd, te_sd = split_checkpoint(checkpoint, unet.config, vae.config)
    te_sd = fit_clip_keys(te_sd, text_encoder)
    te_sd.pop("position_ids", None)
    te_sd.pop("text_model.position_ids", None)
    te_sd.pop("embeddings.position_ids", None)
    te_sd.pop("text_model.embeddings.position_ids", None)
    for name, model, sd in (("unet", unet, unet_sd), ("vae", vae, vae_sd),
                            ("text_encoder", text_encoder, te_sd)):
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{p}: the {name} weights do not match the configs in {cfg_dir} (missing "
                f"{len(missing)}, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. "
                f"{unexpected[:3]}); fix: pass config= with this model's configs",
                key="base_model")
    return unet, vae, text_encoder, cfg_dir


# -- causal LM ----------------------------------------------------------------------------
def load_causal_lm(path: str | os.PathLike, *, dtype=None):
    """``(model, tokenizer)`` of a local Hugging Face causal-LM folder (safetensors only, no
    custom code). If the tokenizer has no pad token, its eos token is used for padding."""
    p = check_model_path(path)  # refuse before any ML library is even imported
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not p.is_dir():
        raise ConfigError(f"{p}: a causal LM must be a model folder (config.json, "
                          f"*.safetensors, tokenizer files)", key="base_model")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                              trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                                 use_safetensors=True, trust_remote_code=False)
    dtype = dtype or torch.float32
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
