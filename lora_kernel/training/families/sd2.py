"""Stable Diffusion 2.x: SD1.x's UNet and pipeline with an OpenCLIP ViT-H text encoder
(1024 wide) and, for the 768 px models, v-prediction (the scheduler's ``prediction_type``,
which :meth:`ModelFamily.training_target` follows). kohya marks its adapters ``sd_v2``.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from lora_kernel.training.families.base import TextEncoderPart
from lora_kernel.training.families.sd15 import SD15Family


class SD2Family(SD15Family):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    kohya_base_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2/lora"
    bundled_configs = {}  # a single file needs config= (a diffusers folder with its configs)
    text_encoder_parts = (TextEncoderPart("text_encoder", "CLIPTextModel", "lora_te",
                                          "text_encoder_lr", "cond_stage_model.model.",
                                          "open_clip"),)

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "ss_v2": "True"}
