"""Stable Diffusion 1.x: one CLIP ViT-L text encoder (its last hidden state conditions the
UNet), epsilon prediction, 512 px; kohya names the UNet's modules by their diffusers names.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from lora_kernel.training.families.base import ModelFamily, PromptEmbeds, TextEncoderPart


class SD15Family(ModelFamily):
    name = "sd15"
    title = "Stable Diffusion 1.x"
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    pipeline_class = "StableDiffusionPipeline"
    bundled_configs = {((32, 4, 3, 3), 32): "tiny-sd", ((320, 4, 3, 3), 768): "sd15"}
    text_encoder_parts = (TextEncoderPart("text_encoder", "CLIPTextModel", "lora_te",
                                          "text_encoder_lr", "cond_stage_model.transformer."),)

    def encode_prompt(self, comps, ids: list) -> PromptEmbeds:
        te = comps.text_encoder
        skip = int(getattr(comps, "clip_skip", 1) or 1)
        if skip <= 1:
            return PromptEmbeds(hidden=te(ids[0].to(te.device))[0])
        # kohya's clip_skip: the hidden state `skip` layers from the end, through the final
        # layer norm (CLIPTextModel is flat in transformers >= 5.6: no text_model level)
        out = te(ids[0].to(te.device), output_hidden_states=True)
        norm = te.final_layer_norm if hasattr(te, "final_layer_norm") \
            else te.text_model.final_layer_norm
        return PromptEmbeds(hidden=norm(out.hidden_states[-skip]))

    def pipeline(self, comps):
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            unet=comps.unet, scheduler=comps.sample_scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
