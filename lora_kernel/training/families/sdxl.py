"""Stable Diffusion XL (base): two text encoders — CLIP ViT-L (``text_encoder``) and
OpenCLIP ViT-bigG with a projection (``text_encoder_2``) — whose penultimate hidden states,
concatenated, condition the UNet's cross-attention, while the projected pooled output of the
second and the size/crop conditioning (``add_time_ids``: original size, crop top-left,
target size, each (height, width)) enter through the UNet's ``added_cond_kwargs``. Epsilon
prediction, 1024 px, and a VAE that overflows in fp16 (``vae_dtype: auto`` keeps it fp32).

kohya / A1111 / ComfyUI name SDXL LoRA modules by the original single-file layout
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and the two text encoders
``lora_te1_`` and ``lora_te2_``; adapters say ``ss_base_model_version: sdxl_base_v1-0``.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from lora_kernel.training.families.base import ModelFamily, PromptEmbeds, TextEncoderPart
from lora_kernel.training.single_file import SDXL_TE1, SDXL_TE2


class SDXLFamily(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL (base)"
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    pipeline_class = "StableDiffusionXLPipeline"
    bundled_configs = {((32, 4, 3, 3), 64): "tiny-sdxl", ((320, 4, 3, 3), 2048): "sdxl"}
    text_encoder_parts = (
        TextEncoderPart("text_encoder", "CLIPTextModel", "lora_te1", "text_encoder_lr",
                        SDXL_TE1),
        TextEncoderPart("text_encoder_2", "CLIPTextModelWithProjection", "lora_te2",
                        "text_encoder_2_lr", SDXL_TE2, "open_clip"),
    )
    vae_fp16_overflows = True

    def encode_prompt(self, comps, ids: list) -> PromptEmbeds:
        """As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden
        state, concatenated; the pooled (projected) output of the last encoder."""
        import torch
        hidden, pooled = [], None
        for te, part_ids in zip(comps.text_encoders, ids, strict=True):
            out = te(part_ids.to(te.device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return PromptEmbeds(hidden=torch.cat(hidden, dim=-1), pooled=pooled)

    def time_ids(self, example, *, flipped: bool):
        """``add_time_ids`` of one training image, as the diffusers SDXL training scripts
        compute them: its size before resizing, the top-left of the crop in the resized
        image (mirrored for a flipped image) and the bucket it was cropped to."""
        import torch
        top, left = example.crop_top_left
        if flipped:
            left = example.resized_size[0] - example.bucket[0] - left
        w, h = example.bucket
        ow, oh = example.original_size
        return torch.tensor([oh, ow, top, left, h, w], dtype=torch.float32)

    def unet_kwargs(self, embeds: PromptEmbeds, time_ids) -> dict:
        return {"added_cond_kwargs": {"text_embeds": embeds.pooled,
                                      "time_ids": time_ids.to(embeds.pooled.device)}}

    def kohya_unet_name(self, module: str, unet_config) -> str:
        from lora_kernel.training.single_file import unet_key_to_ldm
        return unet_key_to_ldm(module + ".weight", unet_config["layers_per_block"],
                               list(unet_config["up_block_types"])).removesuffix(".weight")

    def pipeline(self, comps):
        from diffusers import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
            scheduler=comps.sample_scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
