"""Which model family a base model is, read before anything loads.

A diffusers folder says it in ``model_index.json`` (the pipeline class) and its UNet and
scheduler configs; a single ``.safetensors`` checkpoint in its tensor names and shapes (read
from the header only). Families we train are returned by name (``sd15``, ``sd2``, ``sdxl``,
``flux``, ``sd3``: a transformer-only Flux / SD3.5 file in BFL, SAI or ComfyUI layout is
recognised by its ``double_blocks.`` / ``joint_blocks.``); a family we recognise but do not
train (a Flux control or fill model, an SDXL refiner, an inpainting UNet, a
video model) and a checkpoint whose keys fit no known layout are refused with a
:class:`ConfigError` naming what was found and what is supported. No torch, no model code:
names, small JSON files and safetensors headers only.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.single_file import SDXL_TE1, SDXL_TE2

SUPPORTED = {"sd15": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
             "sdxl": "Stable Diffusion XL (base)", "flux": "Flux.1 (dev, schnell)",
             "sd3": "Stable Diffusion 3 / 3.5"}
# pipeline class in model_index.json -> flow-matching family trained here
FLOW_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
# single-file key markers of the flow-matching families (BFL / SAI / ComfyUI layouts)
FLOW_KEYS = (("double_blocks.", "flux"), ("joint_blocks.", "sd3"))

# pipeline class in model_index.json -> (family, what it is) for the families not trained here
_UNSUPPORTED_PIPELINES = {
    "FluxControlPipeline": "a Flux control model (flux-control)",
    "FluxFillPipeline": "a Flux inpainting model (flux-fill)",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner (sdxl-refiner)",
    "StableDiffusionInpaintPipeline": "an inpainting model (sd15-inpainting)",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model (sdxl-inpainting)",
    "StableVideoDiffusionPipeline": "a video model (Stable Video Diffusion)",
    "AnimateDiffPipeline": "a video model (AnimateDiff)",
    "TextToVideoSDPipeline": "a video model (text-to-video)",
}
# single-file key markers of families not trained here (checked before the supported ones)
_UNSUPPORTED_KEYS = (
    ("time_stack.", "a video model (Stable Video Diffusion)"),
    ("temporal_transformer_blocks.", "a video model"),
    ("motion_modules.", "a video model (AnimateDiff)"),
)
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
SDXL_REFINER_TE = "conditioner.embedders.0.model."
SD2_TE = "cond_stage_model.model."
SUPPORTED_LIST = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())


def _unsupported(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} is {what}, a model family this platform does not train yet; "
                       f"supported: {SUPPORTED_LIST}; fix: point base_model at a model of a "
                       f"supported family", key="base_model")


def read_json(path: Path) -> dict:
    """A JSON object file's content; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_family(path: Path) -> str | None:
    """The family of a diffusers folder, None when it has neither ``model_index.json`` nor
    ``unet/config.json`` (other checks then say what the folder is)."""
    index = read_json(path / "model_index.json")
    unet = read_json(path / "unet" / "config.json")
    if not index and not unet:
        return None
    pipeline = str(index.get("_class_name") or "")
    if pipeline in FLOW_PIPELINES:
        return FLOW_PIPELINES[pipeline]
    if pipeline in _UNSUPPORTED_PIPELINES and not _sdxl_base_as_img2img(pipeline, index):
        raise _unsupported(path, _UNSUPPORTED_PIPELINES[pipeline])
    if "Video" in pipeline or (pipeline and "unet" not in index and not unet):
        raise _unsupported(path, f"a {pipeline} model (no UNet)")
    if unet.get("in_channels") == 9:
        raise _unsupported(path, "an inpainting model (sd15-inpainting / sdxl-inpainting: "
                                 "its UNet takes 9 input channels)")
    if pipeline.startswith("StableDiffusionXL") or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    te = read_json(path / "text_encoder" / "config.json")
    if (unet.get("cross_attention_dim") == 1024 or te.get("hidden_size") == 1024
            or scheduler.get("prediction_type") == "v_prediction"):
        return "sd2"
    return "sd15"


def _sdxl_base_as_img2img(pipeline: str, index: dict) -> bool:
    """An SDXL *base* saved under the img2img pipeline class (both text encoders present) is
    SDXL; the refiner has only ``text_encoder_2`` and asks for an aesthetic score."""
    return (pipeline == "StableDiffusionXLImg2ImgPipeline"
            and bool((index.get("text_encoder") or [None])[0])
            and not index.get("requires_aesthetics_score"))


def refuse_unsupported(path: str | Path) -> None:
    """Refuse (:class:`ConfigError`) a base model of a family not trained here, naming it,
    before any other check reads more of it: a diffusers folder by its ``model_index.json``
    and configs, a ``.safetensors`` file by its header (a pickle renamed to .safetensors is
    an ``UnsafeModelError`` there). Anything else is left to the other checks."""
    from lora_kernel.training.model_safety import read_safetensors_header

    p = Path(path)
    if p.is_dir():
        folder_family(p)
    elif p.is_file() and p.suffix == ".safetensors":
        _unsupported_keys(p, read_safetensors_header(p))


def _unsupported_keys(path: Path, header: dict) -> None:
    """Refuse a single file whose keys or shapes are those of a family not trained here."""
    keys = [k for k in header if k != "__metadata__"]
    for marker, what in _UNSUPPORTED_KEYS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise _unsupported(path, what)
    conv_in = header.get(LDM_CONV_IN) or header.get("unet.conv_in.weight") or {}
    shape = conv_in.get("shape") if isinstance(conv_in, dict) else None
    if shape and len(shape) == 4 and shape[1] == 9:
        raise _unsupported(path, "an inpainting model (its UNet takes 9 input channels)")
    if any(k.startswith("model.diffusion_model.") for k in keys) \
            and not any(k.startswith((SDXL_TE1, SDXL_TE2)) for k in keys):
        if any(k.startswith(SDXL_REFINER_TE) for k in keys):
            raise _unsupported(path, "an SDXL refiner (sdxl-refiner: one OpenCLIP-bigG text "
                                     "encoder, no CLIP-L)")
        if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):
            raise _unsupported(path, "an SDXL-style UNet without its text encoders")


def keys_family(path: Path, header: dict) -> str:
    """The family of a single-file checkpoint from its safetensors ``header``."""
    from lora_kernel.training.model_safety import no_layout_error

    _unsupported_keys(path, header)
    keys = [k for k in header if k != "__metadata__"]
    for marker, family in FLOW_KEYS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            return family
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("model.diffusion_model."):
        if has(SDXL_TE2) or has(SDXL_TE1):
            return "sdxl"
        return "sd2" if has(SD2_TE) else "sd15"
    if has("unet."):
        if has("unet.add_embedding.") or has("text_encoder_2."):
            return "sdxl"
        cross = next((header[k]["shape"] for k in sorted(keys)
                      if k.endswith("attn2.to_k.weight")), None)
        return "sd2" if cross and cross[-1] == 1024 else "sd15"
    raise no_layout_error(path, keys)


def detect_family(path: str | Path) -> str | None:
    """The family name of the image base model at ``path`` (``sd15``, ``sd2``, ``sdxl``);
    None for a folder that is no diffusers model at all. Raises :class:`ConfigError` for a
    family not trained here and for a checkpoint whose keys fit no known layout."""
    from lora_kernel.training.model_safety import read_safetensors_header

    p = Path(path)
    if p.is_dir():
        return folder_family(p)
    return keys_family(p, read_safetensors_header(p))
