"""Flux.1 (dev, schnell): a 12B rectified-flow transformer (``FluxTransformer2DModel``: 19
double-stream and 38 single-stream blocks) conditioned on T5-XXL's hidden states and the
pooled output of CLIP-L, with a 16-channel VAE. Latents are packed into 2x2 patches (64
channels per token) with (0, row, column) image ids, as ``FluxPipeline`` does; Flux.1-dev
(``guidance_embeds``) takes the distilled guidance scale as an input (``guidance_scale``
during training), schnell has none.

kohya sd-scripts / ComfyUI name Flux LoRA modules by Black Forest Labs' original layout, in
which each block's q, k and v (and a single block's MLP input) are one fused Linear:
``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``; CLIP-L is
``lora_te1_``. :func:`bfl_target` maps a diffusers module onto that layout and
:meth:`FluxFamily.kohya_state_dict` fuses the separate LoRAs of q, k, v into one of rank
``3r`` (down: the downs stacked; up: block diagonal; alpha ``3 alpha``, so ``alpha / rank``
and the weight delta are unchanged). The layout itself is :mod:`lora_kernel.training.flux_layout`.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import re

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.families.base import PromptEmbeds, TextEncoderPart
from lora_kernel.training.families.flow import FlowMatchingFamily
from lora_kernel.training.flux_layout import SWAPPED, bfl_target, fused_sizes, swap_halves


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    title = "Flux.1"
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    single_file = True
    text_encoder_parts = (
        TextEncoderPart("text_encoder", "CLIPTextModel", "lora_te1", "text_encoder_lr",
                        "text_encoders.clip_l.transformer."),
        TextEncoderPart("text_encoder_2", "T5EncoderModel", "lora_te3", "text_encoder_2_lr",
                        "text_encoders.t5xxl.transformer.", "t5", tokenizer_class="T5Tokenizer",
                        trainable=False),
    )

    def encode_prompt(self, comps, ids: list) -> PromptEmbeds:
        """As ``FluxPipeline.encode_prompt``: T5's last hidden state for the joint attention,
        CLIP-L's pooled output for the modulation."""
        clip, t5 = comps.text_encoder, comps.text_encoder_2
        pooled = clip(ids[0].to(clip.device), output_hidden_states=False).pooler_output
        return PromptEmbeds(hidden=t5(ids[1].to(t5.device), output_hidden_states=False)[0],
                            pooled=pooled)

    def predict(self, comps, batch, embeds, time_ids):
        """Pack the noisy latents into 2x2 patches, call the transformer with image and text
        ids (and the guidance for dev), and unpack its velocity."""
        import torch
        tr, x = comps.unet, batch.noisy
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
            b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(x.device, x.dtype)
        txt_ids = torch.zeros(embeds.hidden.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if tr.config.guidance_embeds:
            scale = batch.extra.get("guidance")
            guidance = torch.full((b,), 1.0 if scale is None else float(scale),
                                  device=x.device, dtype=torch.float32)
        out = tr(hidden_states=packed, timestep=batch.timesteps / 1000, guidance=guidance,
                 pooled_projections=embeds.pooled, encoder_hidden_states=embeds.hidden,
                 txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            b, c, h, w)

    def check_config(self, cfg, file: str) -> None:
        super().check_config(cfg, file)
        from pathlib import Path

        from lora_kernel.training.families.detect import read_json
        p = Path(cfg.base_model)
        tconf = read_json(p / "transformer" / "config.json") if p.is_dir() else {}
        if cfg.guidance_scale is not None and tconf and not tconf.get("guidance_embeds"):
            raise ConfigError(
                f"{p} is a Flux model without a guidance embedding (Flux.1-schnell: "
                f"guidance_embeds false), so guidance_scale has nothing to set; fix: remove "
                f"guidance_scale (it is for Flux.1-dev)", file=file, key="guidance_scale")

    def kohya_state_dict(self, denoiser_sd: dict, alpha: float, config) -> dict:
        """kohya / ComfyUI Flux entries: ``lora_unet_<BFL module>`` with fused projections
        (see the module docstring); a module without a BFL Linear is a ValueError."""
        import torch
        pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?"
                             r"\.weight$")
        groups: dict[str, dict] = {}
        for key, tensor in denoiser_sd.items():
            match = pattern.match(key)
            target = bfl_target(match.group(1)) if match else None
            if target is None:
                raise ValueError(f"LoRA key {key!r} has no module in the Flux original layout")
            name, index, kind = target
            groups.setdefault(name, {"kind": kind})
            groups[name].setdefault(index, {})[match.group(2)] = tensor.detach().cpu()
        out = {}
        for name, group in groups.items():
            kind = group.pop("kind")
            prefix = "lora_unet_" + name.replace(".", "_")
            if not kind:
                down, up = group[0]["A"], group[0]["B"]
                if name == SWAPPED:
                    up = swap_halves(up)
                members = 1
            else:
                sizes = fused_sizes(kind, config)
                present = sorted(group)
                r = group[present[0]]["A"].shape[0]
                down = torch.cat([group[i]["A"] for i in present], dim=0)
                up = torch.zeros(sum(sizes), r * len(present), dtype=down.dtype)
                for col, i in enumerate(present):
                    row = sum(sizes[:i])
                    up[row:row + sizes[i], col * r:(col + 1) * r] = group[i]["B"]
                members = len(present)
            out[f"{prefix}.lora_down.weight"] = down.contiguous()
            out[f"{prefix}.lora_up.weight"] = up.contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha) * members)
        return out

    def pipeline(self, comps):
        from diffusers import FluxPipeline
        return FluxPipeline(scheduler=comps.sample_scheduler, vae=comps.vae,
                            text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
                            transformer=comps.unet)
