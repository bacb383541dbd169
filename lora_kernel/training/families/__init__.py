"""Model families: one module per family (:mod:`.sd15`, :mod:`.sd2`, :mod:`.sdxl`, and the
flow-matching transformers :mod:`.flux` and :mod:`.sd3` on :mod:`.flow`) behind
the small interface of :class:`.base.ModelFamily`; :mod:`.detect` tells which family a base
model is (and refuses the families not trained here) before anything loads.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from pathlib import Path

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.families.base import ModelFamily, PromptEmbeds, TextEncoderPart
from lora_kernel.training.families.detect import SUPPORTED, detect_family  # noqa: F401
from lora_kernel.training.families.flux import FluxFamily
from lora_kernel.training.families.sd2 import SD2Family
from lora_kernel.training.families.sd3 import SD3Family
from lora_kernel.training.families.sd15 import SD15Family
from lora_kernel.training.families.sdxl import SDXLFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15Family(), SD2Family(),
                                                         SDXLFamily(), FluxFamily(),
                                                         SD3Family())}

__all__ = ["FAMILIES", "ModelFamily", "PromptEmbeds", "TextEncoderPart", "family_of",
           "family_named"]


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``sd15``, ``sd2``, ``sdxl``, ``flux``, ``sd3``)."""
    return FAMILIES[name]


def family_of(path: str | Path) -> ModelFamily:
    """The family of the image base model at ``path`` (see :func:`.detect.detect_family`);
    a folder that is no diffusers model is a :class:`ConfigError`."""
    name = detect_family(path)
    if name is None:
        raise ConfigError(f"{path} is not a diffusers folder (no model_index.json, "
                          f"unet/config.json or transformer/config.json)", key="base_model")
    return FAMILIES[name]
