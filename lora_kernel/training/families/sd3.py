"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): a rectified-flow MMDiT
(``SD3Transformer2DModel``) over 2x2 latent patches of a 16-channel VAE, conditioned on
three text encoders as ``StableDiffusion3Pipeline.encode_prompt`` does: the penultimate
hidden states of CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``) side by side,
zero-padded to T5-XXL's width and followed by T5's tokens on the sequence axis; the pooled
(projected) outputs of both CLIPs concatenated for the modulation. Timesteps are ``1000 t``;
no guidance embedding.

The kohya-style export names the transformer's modules by their diffusers names with the
``lora_transformer_`` prefix (OneTrainer's SD3 format, which ComfyUI loads) and the CLIPs
``lora_te1_`` / ``lora_te2_``.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import re

from lora_kernel.training.families.base import PromptEmbeds, TextEncoderPart
from lora_kernel.training.families.flow import FlowMatchingFamily

KOHYA_TRANSFORMER_PREFIX = "lora_transformer"


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    title = "Stable Diffusion 3.5"
    kohya_base_version = "sd3"
    modelspec_architecture = "stable-diffusion-v3/lora"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    t5_max_length = 256
    text_encoder_parts = (
        TextEncoderPart("text_encoder", "CLIPTextModelWithProjection", "lora_te1",
                        "text_encoder_lr", "text_encoders.clip_l.transformer."),
        TextEncoderPart("text_encoder_2", "CLIPTextModelWithProjection", "lora_te2",
                        "text_encoder_2_lr", "text_encoders.clip_g.transformer."),
        TextEncoderPart("text_encoder_3", "T5EncoderModel", "lora_te3", "text_encoder_3_lr",
                        "text_encoders.t5xxl.transformer.", "t5", tokenizer_class="T5Tokenizer",
                        trainable=False),
    )

    def encode_prompt(self, comps, ids: list) -> PromptEmbeds:
        import torch
        import torch.nn.functional as F
        hidden, pooled = [], []
        for te, part_ids in zip(comps.text_encoders[:2], ids[:2], strict=True):
            out = te(part_ids.to(te.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = comps.text_encoder_3
        t5_hidden = t5(ids[2].to(t5.device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(hidden=torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2),
                            pooled=torch.cat(pooled, dim=-1))

    def predict(self, comps, batch, embeds, time_ids):
        return comps.unet(hidden_states=batch.noisy, timestep=batch.timesteps,
                          encoder_hidden_states=embeds.hidden,
                          pooled_projections=embeds.pooled, return_dict=False)[0]

    def check_config(self, cfg, file: str) -> None:
        super().check_config(cfg, file)
        from lora_kernel.common.errors import ConfigError
        if cfg.guidance_scale is not None:
            raise ConfigError(
                f"{cfg.base_model} is {self.title}, which has no guidance embedding: "
                f"guidance_scale has nothing to set; fix: remove guidance_scale (it is for "
                f"Flux.1-dev)", file=file, key="guidance_scale")

    def kohya_state_dict(self, denoiser_sd: dict, alpha: float, config) -> dict:
        import torch
        pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?"
                             r"\.weight$")
        out = {}
        for key, tensor in denoiser_sd.items():
            match = pattern.match(key)
            if not match:
                raise ValueError(f"unexpected LoRA key {key!r}: cannot convert to kohya format")
            name = f"{KOHYA_TRANSFORMER_PREFIX}_{match.group(1).replace('.', '_')}"
            part = "lora_down" if match.group(2) == "A" else "lora_up"
            out[f"{name}.{part}.weight"] = tensor.detach().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        return out

    def pipeline(self, comps):
        from diffusers import StableDiffusion3Pipeline
        return StableDiffusion3Pipeline(
            transformer=comps.unet, scheduler=comps.sample_scheduler, vae=comps.vae,
            text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
            text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)
