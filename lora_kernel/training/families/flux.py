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
and the weight delta are unchanged). :func:`to_bfl_state_dict` writes the whole transformer
in that layout (single-file checkpoints).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import re

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.families.base import PromptEmbeds, TextEncoderPart
from lora_kernel.training.families.flow import FlowMatchingFamily

_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, "qkv"), "attn.to_k": ("img_attn.qkv", 1, "qkv"),
    "attn.to_v": ("img_attn.qkv", 2, "qkv"),
    "attn.add_q_proj": ("txt_attn.qkv", 0, "qkv"), "attn.add_k_proj": ("txt_attn.qkv", 1, "qkv"),
    "attn.add_v_proj": ("txt_attn.qkv", 2, "qkv"),
    "attn.to_out.0": ("img_attn.proj", 0, ""), "attn.to_add_out": ("txt_attn.proj", 0, ""),
    "ff.net.0.proj": ("img_mlp.0", 0, ""), "ff.net.2": ("img_mlp.2", 0, ""),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, ""), "ff_context.net.2": ("txt_mlp.2", 0, ""),
    "norm1.linear": ("img_mod.lin", 0, ""), "norm1_context.linear": ("txt_mod.lin", 0, ""),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0, "qkvm"), "attn.to_k": ("linear1", 1, "qkvm"),
    "attn.to_v": ("linear1", 2, "qkvm"), "proj_mlp": ("linear1", 3, "qkvm"),
    "proj_out": ("linear2", 0, ""), "norm.linear": ("modulation.lin", 0, ""),
}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# The RMS norms of q and k (no LoRA on them; the single-file layout only).
_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm",
          "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers


def fused_sizes(kind: str, config) -> tuple[int, ...]:
    """Output sizes of the members of a fused BFL Linear (``qkv``; ``qkvm``: a single
    block's q, k, v and MLP input); ``""``: not fused."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return {"qkv": (inner,) * 3, "qkvm": (inner,) * 3 + (4 * inner,), "": ()}[kind]


def bfl_target(module: str) -> tuple[str, int, str] | None:
    """``(BFL module, member index, fused kind)`` of the diffusers Flux module ``module``
    (``transformer_blocks.0.attn.to_k`` -> ``("double_blocks.0.img_attn.qkv", 1, "qkv")``);
    None for a module the original layout has no Linear for."""
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
    if m:
        table, prefix = ((_SINGLE, "single_blocks") if m.group(1).startswith("single")
                         else (_DOUBLE, "double_blocks"))
        hit = table.get(m.group(3))
        return (f"{prefix}.{m.group(2)}.{hit[0]}", hit[1], hit[2]) if hit else None
    return (_TOP[module], 0, "") if module in _TOP else None


def _swap_halves(t):
    import torch
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def bfl_key(key: str) -> tuple[str, int, str]:
    """``(BFL key, member index, fused kind)`` of one diffusers Flux transformer state-dict
    key (``transformer_blocks.0.attn.norm_q.weight`` ->
    ``("double_blocks.0.img_attn.norm.query_norm.scale", 0, "")``); KeyError when the
    original layout has no such tensor."""
    module, _, param = key.rpartition(".")
    target = bfl_target(module)
    if target is not None:
        name, index, kind = target
        return f"{name}.{param}", index, kind
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
    single = bool(m) and m.group(1).startswith("single")
    norm = (_SINGLE_NORMS if single else _NORMS).get(m.group(3)) if m else None
    if norm is None or param != "weight":
        raise KeyError(f"no BFL name for {key}")
    prefix = "single_blocks" if single else "double_blocks"
    return f"{prefix}.{m.group(2)}.{norm}.scale", 0, ""


def to_bfl_state_dict(sd: dict, config) -> dict:
    """The diffusers Flux transformer state dict ``sd`` in Black Forest Labs' layout (the
    inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``)."""
    import torch
    out: dict = {}
    fused: dict[str, dict[int, object]] = {}
    for key, tensor in sd.items():
        name, index, kind = bfl_key(key)
        if name.startswith(SWAPPED):
            tensor = _swap_halves(tensor)
        if kind:
            fused.setdefault(name, {})[index] = tensor
        else:
            out[name] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def from_bfl_state_dict(bfl: dict, model_keys, config) -> dict:
    """The diffusers state dict (keys ``model_keys``) of a transformer in Black Forest Labs'
    layout ``bfl`` (fused projections split by :func:`fused_sizes`, the final modulation's
    halves swapped back); a tensor the model needs and ``bfl`` lacks is a KeyError."""
    out = {}
    for key in model_keys:
        name, index, kind = bfl_key(key)
        tensor = bfl[name]
        if kind:
            sizes = fused_sizes(kind, config)
            start = sum(sizes[:index])
            tensor = tensor[start:start + sizes[index]]
        if name.startswith(SWAPPED):
            tensor = _swap_halves(tensor)
        out[key] = tensor
    return out


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
                    up = _swap_halves(up)
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
