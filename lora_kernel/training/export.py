"""Adapter export: diffusers/PEFT and kohya/A1111 formats, ``.safetensors`` only.

Every file carries header metadata: the resolved config, base-model sha256, dataset
version id and package version (dataset file paths only when the config opts in), plus
the ``ss_*`` keys kohya's tools and the A1111 WebUI display.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.version import version_info

# Config keys holding dataset locations: recorded only with record_dataset_paths: true.
PATH_KEYS = ("train_data_dir", "metadata_path")
KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TE_PREFIX = "lora_te"


def adapter_metadata(cfg, *, base_model_sha256: str, dataset_version: str,
                     dataset_digests: dict[str, str] | None = None,
                     extra: dict | None = None) -> dict[str, str]:
    """The safetensors header metadata (all values strings) for an adapter of ``cfg``."""
    conf = cfg.to_dict()
    if not cfg.record_dataset_paths:
        for key in PATH_KEYS:
            conf.pop(key, None)
        conf["base_model"] = Path(conf["base_model"]).name
        if conf.get("init"):
            conf["init"] = Path(conf["init"]).name
        conf.pop("output_dir", None)
    info = version_info()
    meta = {
        "lora_enclave.config": json.dumps(conf, sort_keys=True),
        "lora_enclave.base_model_sha256": base_model_sha256,
        "lora_enclave.dataset_version": dataset_version,
        "lora_enclave.version": info["lora_enclave"],
        "lora_enclave.git_commit": info["git_commit"] or "",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_resolution": str(cfg.resolution),
        "ss_seed": str(cfg.seed),
        "ss_sd_model_hash": base_model_sha256[:10],
        "ss_new_sd_model_hash": base_model_sha256,
        "ss_dataset_version": dataset_version,
    }
    if getattr(cfg, "init", None):  # the adapter this one started from, by content
        from lora_kernel.common.digests import sha256_file
        meta["lora_enclave.init_sha256"] = sha256_file(cfg.init)
    if cfg.record_dataset_paths and dataset_digests:
        meta["lora_enclave.dataset_files"] = json.dumps(dataset_digests, sort_keys=True)
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _merge_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Re-write ``path`` in place with ``metadata`` added to its header (atomic)."""
    existing = read_metadata(path)
    tensors = load_file(str(path))
    merged = {**existing, **metadata, "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=merged)


# -- image (Stable Diffusion) ---------------------------------------------------------

def peft_state_dicts(unet, text_encoder=None) -> tuple[dict, dict | None]:
    """The PEFT LoRA state dicts of the UNet (and text encoder when it has a LoRA)."""
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(unet), text_encoder_state_dict(text_encoder)


def text_encoder_state_dict(text_encoder) -> dict | None:
    """The PEFT LoRA state dict of a text encoder, None when it is None or has no LoRA."""
    from peft import get_peft_model_state_dict
    if text_encoder is None or not getattr(text_encoder, "peft_config", None):
        return None
    return get_peft_model_state_dict(text_encoder)


def save_diffusers_lora(path: Path, unet, text_encoder, unet_config, te_config,
                        metadata: dict[str, str], *, text_encoder_2=None,
                        pipeline_class: str = "StableDiffusionPipeline",
                        denoiser: str = "unet") -> Path:
    """Write a diffusers/PEFT-format LoRA file (loadable by ``load_lora_weights`` of
    ``pipeline_class``; SDXL's second text encoder as ``text_encoder_2``). ``denoiser``:
    the component ``unet`` is saved as (``transformer`` for Flux and SD3.5)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    unet_sd, te_sd = peft_state_dicts(unet, text_encoder)
    kw: dict = {"text_encoder_lora_layers": (convert_state_dict_to_diffusers(te_sd)
                                             if te_sd else None),
                "text_encoder_lora_adapter_metadata": te_config.to_dict() if te_sd else None}
    te2_sd = text_encoder_state_dict(text_encoder_2)
    if te2_sd:
        kw.update(text_encoder_2_lora_layers=convert_state_dict_to_diffusers(te2_sd),
                  text_encoder_2_lora_adapter_metadata=te_config.to_dict())
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        # The UNet's keys stay in peft's names (lora_A / lora_B): diffusers' converter renames
        # only the attention projections, and its loader reads a file whose first key is not
        # renamed as all-peft, so a LoRA on convolutions too (SDXL's first level has no
        # attention) would silently lose its attention layers on reload.
        getattr(diffusers, pipeline_class).save_lora_weights(
            tmp, **{f"{denoiser}_lora_layers": unet_sd,
                    f"{denoiser}_lora_adapter_metadata": unet_config.to_dict()},
            weight_name=path.name, safe_serialization=True, **kw)
        written = Path(tmp) / path.name
        _merge_metadata(written, metadata)
        shutil.move(str(written), str(path))
    return path


def _kohya_name(prefix: str, module: str) -> str:
    """The kohya/A1111 name of ``module``: ``<prefix>_<dotted name with underscores>``.

    Text-encoder names always carry CLIP's ``text_model.`` level
    (``lora_te_text_model_encoder_layers_<i>_self_attn_q_proj``), the names AUTOMATIC1111 and
    ComfyUI look up: transformers >= 5.6 flattened ``CLIPTextModel``, so its module names
    (``encoder.layers.0...``) lack that level and would otherwise be dropped by those clients.
    """
    if prefix.startswith(KOHYA_TE_PREFIX) and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_state_dict(unet_sd: dict, te_sd: dict | None, alpha: float, *,
                     te2_sd: dict | None = None, family=None,
                     unet_config: dict | None = None) -> dict:
    """Convert PEFT LoRA state dicts to kohya/A1111 keys with the real ``alpha``.

    ``<module>.lora_A.weight`` becomes ``lora_unet_<module_with_underscores>.lora_down.weight``
    (``lora_te_text_model_`` for the text encoder, see :func:`_kohya_name`), ``lora_B``
    becomes ``lora_up``, and each module gets an ``.alpha`` scalar, so the WebUI's
    ``<lora:name:w>`` scales by ``w * alpha / rank``. ``family`` (default SD1.x) names the
    UNet modules (SDXL: the original layout's ``input_blocks_4_1_...``, from
    ``unet_config``) and the text encoders' prefixes (SDXL: ``lora_te1``, ``lora_te2``).
    """
    from lora_kernel.training.families import family_named
    family = family or family_named("sd15")
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
    te_prefixes = [t.kohya_prefix for t in family.text_encoder_parts]
    parts = [(KOHYA_UNET_PREFIX, unet_sd)] + list(zip(te_prefixes, (te_sd, te2_sd),
                                                      strict=False))
    own = family.kohya_state_dict(unet_sd, alpha, unet_config or {})
    if own is not None:  # the family names (and fuses) its denoiser's modules itself
        out.update(own)
        parts = parts[1:]
    for prefix, sd in parts:
        for key, tensor in (sd or {}).items():
            match = pattern.match(key)
            if not match:
                raise ValueError(f"unexpected LoRA key {key!r}: cannot convert to kohya format")
            module, which = match.groups()
            if prefix == KOHYA_UNET_PREFIX:
                module = family.kohya_unet_name(module, unet_config or {})
            name = _kohya_name(prefix, module)
            part = "lora_down" if which == "A" else "lora_up"
            out[f"{name}.{part}.weight"] = tensor.detach().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_kohya_lora(path: Path, unet, text_encoder, alpha: float,
                    metadata: dict[str, str], *, text_encoder_2=None, family=None) -> Path:
    """Write the kohya/A1111-format LoRA file (``lora_unet_*.lora_down/.lora_up/.alpha``;
    names per ``family``, see :func:`kohya_state_dict`)."""
    unet_sd, te_sd = peft_state_dicts(unet, text_encoder)
    te2_sd = text_encoder_state_dict(text_encoder_2)
    tensors = kohya_state_dict(unet_sd, te_sd, alpha, te2_sd=te2_sd, family=family,
                               unet_config=dict(unet.config))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt"})
    return Path(path)


def kohya_module_names(model: torch.nn.Module, prefix: str = KOHYA_UNET_PREFIX,
                       family=None) -> dict:
    """``{kohya module name: module}`` for every named module of ``model`` (``prefix``
    :data:`KOHYA_TE_PREFIX` for a CLIP text encoder gives the ``lora_te_text_model_`` names).
    With a ``family`` the UNet's Linear and Conv modules get that family's kohya names."""
    if family is None or prefix != KOHYA_UNET_PREFIX:
        return {_kohya_name(prefix, name): mod for name, mod in model.named_modules() if name}
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name:
            try:
                kohya = family.kohya_unet_name(name.removesuffix(".base_layer"),
                                               dict(model.config))
            except KeyError:
                continue
            out[_kohya_name(prefix, kohya)] = mod
    return out


# -- text (causal LM) ----------------------------------------------------------------

def save_peft_adapter(folder: Path, model, metadata: dict[str, str]) -> Path:
    """Save a PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)
    with our metadata in the safetensors header."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"PEFT did not write {weights}")
    _merge_metadata(weights, metadata)
    for pickle_file in folder.glob("*.bin"):
        pickle_file.unlink()
    return folder
