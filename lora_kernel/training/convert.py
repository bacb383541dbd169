"""``lora convert``: a Stable Diffusion 1.x/2.x LoRA file between the formats people trade:
``kohya`` (A1111 / Forge / ComfyUI: ``lora_unet_*.lora_down/.lora_up/.alpha``), ``diffusers``
(``pipe.load_lora_weights``: ``unet.<module>.lora_A/B.weight``) and ``peft`` (a folder with
``adapter_model.safetensors`` and ``adapter_config.json`` for the UNet).

kohya names are turned into module paths by diffusers' own converter
(``_convert_non_diffusers_lora_to_diffusers``); each module's ``alpha / rank`` scale is baked
into its up weight, so every output applies the same update at strength 1. The reverse
direction writes kohya names with this platform's exporter (:mod:`lora_kernel.training.export`).
SDXL's two-text-encoder kohya files (``lora_te1_`` / ``lora_te2_``) are refused.

Runs as: the user (the CLI).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.errors import ConfigError

FORMATS = ("kohya", "diffusers", "peft")
TE_PROCESSOR_NAMES = {f".to_{p}_lora.": f".{p}_proj.lora_linear_layer." for p in "qkv"}
TE_PROCESSOR_NAMES[".to_out_lora."] = ".out_proj.lora_linear_layer."


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def detect_format(path: Path) -> str:
    """``kohya``, ``diffusers`` or ``peft`` from a LoRA file's (or PEFT folder's) keys."""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "peft"
    tensors, _ = _read(path)
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise ConfigError(f"{path} is an SDXL kohya LoRA (lora_te1_/lora_te2_); lora convert "
                          f"handles SD 1.x/2.x files; fix: use the diffusers-format file the "
                          f"run exported beside it", file=path)
    if keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    raise ConfigError(f"{path} is not a LoRA file in kohya or diffusers format (first key "
                      f"{keys[:1]}); fix: give a *.safetensors LoRA", file=path)


def kohya_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya tensors as diffusers-format ones, each module's alpha / rank baked in."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    baked = {}
    for key, t in tensors.items():
        if key.endswith(".lora_up.weight"):
            stem = key[:-len(".lora_up.weight")]
            rank = tensors[stem + ".lora_down.weight"].shape[0]
            alpha = float(tensors.get(stem + ".alpha", torch.tensor(float(rank))))
            baked[key] = t.float() * (alpha / rank)
        elif not key.endswith(".alpha"):
            baked[key] = t.float()
    sd, _alphas = _convert_non_diffusers_lora_to_diffusers(baked)
    unet = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    out = {"unet." + k: v for k, v in convert_unet_state_dict_to_peft(unet).items()}
    # transformers >= 5.6 flattened CLIPTextModel (no text_model level), as our exports are
    # and diffusers' converter names CLIP's projections in attention-processor style
    for key, value in sd.items():
        if key.startswith("text_encoder."):
            key = key.replace("text_encoder.text_model.", "text_encoder.", 1)
            for old, new in TE_PROCESSOR_NAMES.items():
                key = key.replace(old, new)
            out[key] = value
    return out


def diffusers_to_peft_parts(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A diffusers-format file's UNet and text-encoder parts in PEFT names
    (``<module>.lora_A.weight``)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    te = {k[len("text_encoder."):]: v for k, v in tensors.items()
          if k.startswith("text_encoder.")}
    return unet, (convert_state_dict_to_peft(te) if te else {})


def _alpha_of(meta: dict[str, str], rank: int) -> float:
    """The UNet LoRA alpha a diffusers file's ``lora_adapter_metadata`` records (else rank)."""
    try:
        info = json.loads(meta.get("lora_adapter_metadata", "{}"))
        return float(info.get("unet.lora_alpha") or rank)
    except (ValueError, TypeError):
        return float(rank)


def convert_lora(src: str | Path, dst: str | Path, to: str) -> dict:
    """Write ``src`` in format ``to`` at ``dst``; return ``{"from", "to", "modules"}``."""
    from lora_kernel.training.export import kohya_state_dict

    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}", key="--to")
    fmt = detect_format(src)
    tensors, meta = _read(src)
    keep = {k: v for k, v in meta.items() if k.startswith(("lora_enclave.", "ss_", "modelspec"))}
    keep["lora_enclave.converted_from"] = json.dumps({"file": src.name, "format": fmt})
    if fmt == "peft":
        tensors = {"unet." + k.removeprefix("base_model.model."): v for k, v in tensors.items()}
        cfg = json.loads((src / "adapter_config.json").read_text())
        rank = int(cfg.get("r", 8))
        meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha":
                                                     cfg.get("lora_alpha", rank)})}
        fmt = "diffusers"
    diff = kohya_to_diffusers(tensors) if fmt == "kohya" else tensors
    if fmt == "diffusers" and to != "diffusers":
        rank = next(v.shape[0] for k, v in diff.items() if k.endswith("lora_A.weight"))
        alpha = _alpha_of(meta, rank)
        diff = {k: (v * (alpha / rank) if ".lora_B." in k or "lora_linear_layer.up" in k
                    else v) for k, v in diff.items()}
    unet, te = diffusers_to_peft_parts(diff)
    modules = len([k for k in unet if k.endswith("lora_A.weight")])
    if to == "kohya":
        rank = next(v.shape[0] for k, v in unet.items() if k.endswith("lora_A.weight"))
        out = kohya_state_dict(unet, te or None, float(rank))
        _save(dst, out, keep)
    elif to == "diffusers":
        _save(dst, {k: v.contiguous() for k, v in diff.items()}, keep)
    else:
        if te:
            raise ConfigError(f"{src} has text-encoder LoRA weights; a PEFT folder holds one "
                              f"model's adapter, they would be lost; fix: convert --to "
                              f"diffusers or kohya", file=src, key="--to")
        from peft import LoraConfig
        rank = next(v.shape[0] for k, v in unet.items() if k.endswith("lora_A.weight"))
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in unet})
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets).to_dict()
        dst.mkdir(parents=True, exist_ok=True)
        _save(dst / "adapter_model.safetensors",
              {"base_model.model." + k: v.contiguous() for k, v in unet.items()}, keep)
        (dst / "adapter_config.json").write_text(json.dumps(config, indent=1, default=list))
    return {"from": fmt, "to": to, "modules": modules}


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**meta, "format": "pt"})
