"""Single-file Stable Diffusion checkpoints (``.safetensors``) <-> diffusers state dicts.

Two key layouts are understood:

* **LDM / A1111** (what kohya, A1111 and ComfyUI share): ``model.diffusion_model.*`` (UNet),
  ``first_stage_model.*`` (VAE), and per family the text encoders: SD1.x
  ``cond_stage_model.transformer.*`` (CLIP), SD2 ``cond_stage_model.model.*`` (OpenCLIP),
  SDXL ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP-bigG, fused ``in_proj``, ``text_projection``).
  Reading uses diffusers' own converters (``diffusers.loaders.single_file_utils``);
  writing uses :func:`diffusers_to_ldm`, the inverse for SD-style UNets of any depth (SDXL's
  ``add_embedding`` is LDM's ``label_emb``).
* **prefixed diffusers**: ``unet.*``, ``vae.*``, ``text_encoder.*`` (``text_encoder_2.*``)
  with diffusers' names.

A text encoder is described by ``(name, ldm_prefix, ldm_format)``: its diffusers component
name, its prefix in the LDM layout and ``"clip"`` (Hugging Face CLIP names) or
``"open_clip"`` (OpenCLIP names).

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

SD15_TEXT_ENCODERS = (("text_encoder", LDM_CLIP, "clip"),)
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SDXL_TEXT_ENCODERS = (("text_encoder", SDXL_TE1, "clip"),
                      ("text_encoder_2", SDXL_TE2, "open_clip"))

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
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


def unet_key_to_ldm(key: str, layers_per_block: int,
                    up_block_types: list[str] | None = None) -> str:
    """Map one diffusers UNet2DConditionModel key to its LDM name (SD1.x / SDXL layout). An
    upsampler's LDM position depends on whether its up block has attentions: None unless
    ``up_block_types`` (the UNet config's) says."""
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
        if up_block_types is None:
            return None  # upsamplers: position depends on attentions, see diffusers_to_ldm
        slot = 2 if "CrossAttn" in up_block_types[i] else 1
        return f"output_blocks.{i * (n + 1) + n}.{slot}.{rest}"
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
                     num_vae_up_blocks: int,
                     text_encoders: tuple = SD15_TEXT_ENCODERS,
                     text_encoder_2: dict | None = None) -> dict:
    """One LDM/A1111 state dict from the diffusers state dicts (``text_encoders`` describes
    ``text_encoder`` and, for SDXL, ``text_encoder_2``)."""
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
    for (_, prefix, fmt), sd in zip(text_encoders, (text_encoder, text_encoder_2),
                                    strict=False):
        out.update(clip_to_open_clip(sd, prefix) if fmt == "open_clip"
                   else clip_to_ldm(sd, prefix))
    return out


def clip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """A CLIP text encoder's diffusers state dict under ``prefix`` with Hugging Face names."""
    out = {}
    for key, value in state_dict.items():
        # transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level that
        # every SD1.x checkpoint has; write the classic names.
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight",
                  "final_layer_norm.bias": "ln_final.bias"}


def clip_to_open_clip(state_dict: dict, prefix: str) -> dict:
    """A CLIP text encoder (with projection) in OpenCLIP's names under ``prefix``: the inverse
    of diffusers' ``convert_open_clip_checkpoint`` (q/k/v fused into ``attn.in_proj_*``,
    ``text_projection`` transposed, ``positional_embedding`` a bare tensor)."""
    import torch

    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()
          if not k.endswith("position_ids")}
    out = {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key):
            i, kind = m[1], m[2]
            parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif re.match(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", key):
            continue  # fused with q above
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", key):
            name = _sub_plain(m[2], _OPEN_CLIP_LAYER)
            out[f"{prefix}transformer.resblocks.{m[1]}.{name}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text-encoder key {key!r}")
    return out


def _sub_plain(name: str, pairs) -> str:
    for new, old in pairs:
        if name.startswith(new + "."):
            return old + name[len(new):]
    return name


def fit_clip_keys(state_dict: dict, model) -> dict:
    """Add or strip the ``text_model.`` level of CLIP text-encoder keys to match ``model``
    (transformers >= 5.6 flattened ``CLIPTextModel``)."""
    wrapped = hasattr(model, "text_model")
    out = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection."):  # CLIPTextModelWithProjection's own level
            out[key] = value
            continue
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


def split_checkpoint(checkpoint: dict, unet_config: dict, vae_config: dict,
                     text_encoders: tuple = SD15_TEXT_ENCODERS,
                     text_models: tuple = ()) -> tuple[dict, ...]:
    """``(unet, vae, text_encoder[, text_encoder_2])`` diffusers state dicts from a single-file
    checkpoint in either layout (LDM conversion by diffusers' own single-file utilities;
    ``text_models``, the empty text-encoder modules, size OpenCLIP's fused projections)."""
    layout = detect_layout(checkpoint)
    if layout == "prefixed":
        parts = []
        for prefix in ("unet.", "vae.", *(f"{name}." for name, _, _ in text_encoders)):
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
        convert_open_clip_checkpoint,
    )
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(vae_config))
    texts = []
    for i, (_, prefix, fmt) in enumerate(text_encoders):
        if fmt == "open_clip":
            texts.append(convert_open_clip_checkpoint(text_models[i], checkpoint, prefix=prefix))
        else:
            texts.append(convert_ldm_clip_checkpoint(
                {k: v for k, v in checkpoint.items() if k.startswith(prefix)},
                remove_prefix=prefix))
    return (unet, vae, *texts)


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
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    parts = SDXL_TEXT_ENCODERS if index.get("text_encoder_2") else SD15_TEXT_ENCODERS
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    texts = [load_file(folder / name / "model.safetensors") for name, _, _ in parts]
    if layout == "ldm":
        sd = diffusers_to_ldm(unet, vae, texts[0], layers_per_block=unet_cfg["layers_per_block"],
                              num_vae_up_blocks=len(vae_cfg["up_block_types"]),
                              text_encoders=parts,
                              text_encoder_2=texts[1] if len(texts) > 1 else None)
    elif layout == "prefixed":
        prefixes = ("unet.", "vae.", *(f"{name}." for name, _, _ in parts))
        sd = {f"{p}{k}": v for p, part in zip(prefixes, (unet, vae, *texts), strict=True)
              for k, v in part.items()}
    else:
        raise ValueError(f"layout must be 'ldm' or 'prefixed', got {layout!r}")
    sd = {k: sd[k].contiguous() for k in sorted(sd)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", **(metadata or {})})
    return out
