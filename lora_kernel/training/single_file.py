"""Single-file Stable Diffusion checkpoints (``.safetensors``) <-> diffusers state dicts.

Two key layouts are understood:

* **LDM / A1111** (what kohya, A1111 and ComfyUI share): ``model.diffusion_model.*`` (UNet),
  ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP text encoder).
  Reading uses diffusers' own converters (``diffusers.loaders.single_file_utils``);
  writing uses :func:`diffusers_to_ldm`, the inverse for SD1.x-style UNets of any depth.
* **prefixed diffusers**: ``unet.*``, ``vae.*``, ``text_encoder.*`` with diffusers' names.

Only safetensors are read; nothing here ever unpickles.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer."
PREFIXED = ("unet.", "vae.", "text_encoder.")

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection"))
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out",
            "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "proj_out"))


def _sub(name: str, pairs) -> str:
    for new, old in pairs:
        name = re.sub(rf"(^|\.){re.escape(new)}\.", rf"\g<1>{old}.", name)
    return name


def unet_key_to_ldm(key: str, layers_per_block: int) -> str:
    """Map one diffusers UNet2DConditionModel key to its LDM name (SD1.x layout)."""
    n = layers_per_block
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * (n + 1) + n}.0.op.{rest.removeprefix('conv.')}"
        idx = 1 + i * (n + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_sub(rest, _UNET_RESNET)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_sub(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{i * (n + 1) + j}.0.{_sub(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{i * (n + 1) + j}.1.{rest}"
        return None  # upsamplers: position depends on attentions, see diffusers_to_ldm
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """Map one diffusers AutoencoderKL key to its LDM name."""
    for new, old in _VAE_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = m[1], m[2], m[3], m[4]
        if kind == "downsamplers":
            return f"encoder.down.{i}.downsample.{rest}"
        return f"encoder.down.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = num_up_blocks - 1 - int(m[1]), m[2], m[3], m[4]
        if kind == "upsamplers":
            return f"decoder.up.{i}.upsample.{rest}"
        return f"decoder.up.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, kind, j, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.mid.attn_1.{_sub(rest, _VAE_ATTN)}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def diffusers_to_ldm(unet: dict, vae: dict, text_encoder: dict, *, layers_per_block: int,
                     num_vae_up_blocks: int) -> dict:
    """One LDM/A1111 state dict from the three diffusers state dicts."""
    out = {}
    up_with_attn = {int(k.split(".")[1]) for k in unet
                    if re.match(r"up_blocks\.\d+\.attentions", k)}
    for key, value in unet.items():
        name = unet_key_to_ldm(key, layers_per_block)
        if name is None:  # up_blocks.{i}.upsamplers.0.conv.*
            i = int(key.split(".")[1])
            slot = 2 if i in up_with_attn else 1
            rest = key.split(".upsamplers.0.", 1)[1]
            name = f"output_blocks.{i * (layers_per_block + 1) + layers_per_block}.{slot}.{rest}"
        out[LDM_UNET + name] = value
    for key, value in vae.items():
        name = vae_key_to_ldm(key, num_vae_up_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[LDM_VAE + name] = value
    for key, value in text_encoder.items():
        # transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level that
        # every SD1.x checkpoint has; write the classic names.
        if not key.startswith("text_model."):
            key = "text_model." + key
        out[LDM_CLIP + key] = value
    return out


def fit_clip_keys(state_dict: dict, model) -> dict:
    """Add or strip the ``text_model.`` level of CLIP text-encoder keys to match ``model``
    (transformers >= 5.6 flattened ``CLIPTextModel``)."""
    wrapped = hasattr(model, "text_model")
    out = {}
    for key, value in state_dict.items():
        bare = key.removeprefix("text_model.")
        out[("text_model." + bare) if wrapped else bare] = value
    return out


def detect_layout(keys) -> str:
    """``"ldm"``, ``"prefixed"`` or ``"unknown"`` for a checkpoint's key names."""
    keys = list(keys)
    if any(k.startswith(LDM_UNET) for k in keys):
        return "ldm"
    if any(k.startswith("unet.") for k in keys):
        return "prefixed"
    return "unknown"


def split_checkpoint(checkpoint: dict, unet_config: dict,
                     vae_config: dict) -> tuple[dict, dict, dict]:
    """``(unet, vae, text_encoder)`` diffusers state dicts from a single-file checkpoint in
    either layout (LDM conversion by diffusers' own single-file utilities)."""
    layout = detect_layout(checkpoint)
    if layout == "prefixed":
        parts = []
        for prefix in PREFIXED:
            parts.append({k[len(prefix):]: v for k, v in checkpoint.items()
                          if k.startswith(prefix)})
        return tuple(parts)
    if layout != "ldm":
        raise KeyError("no UNet weights found (expected keys starting with "
                       f"{LDM_UNET!r} or 'unet.')")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(vae_config))
    text = convert_ldm_clip_checkpoint(checkpoint)
    return unet, vae, text


def write_single_file(folder: str | os.PathLike, out: str | os.PathLike, *,
                      layout: str = "ldm", metadata: dict | None = None) -> Path:
    """Write the diffusers SD folder ``folder`` as one ``.safetensors`` file ``out`` in the
    ``"ldm"`` (default) or ``"prefixed"`` layout. Keys are written sorted; the bytes are
    stable as long as ``metadata`` stays empty (safetensors orders a metadata map of more than
    one entry, ``format`` included, by hash)."""
    import json

    from safetensors.torch import load_file, save_file

    folder, out = Path(folder), Path(out)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    if layout == "ldm":
        sd = diffusers_to_ldm(unet, vae, text, layers_per_block=unet_cfg["layers_per_block"],
                              num_vae_up_blocks=len(vae_cfg["up_block_types"]))
    elif layout == "prefixed":
        sd = {f"{p}{k}": v for p, part in zip(PREFIXED, (unet, vae, text), strict=True)
              for k, v in part.items()}
    else:
        raise ValueError(f"layout must be 'ldm' or 'prefixed', got {layout!r}")
    sd = {k: sd[k].contiguous() for k in sorted(sd)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", **(metadata or {})})
    return out
