"""Black Forest Labs' original Flux.1 transformer layout (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``: q, k, v — and a single block's MLP input — fused into one
Linear; ``final_layer.adaLN_modulation.1`` with its (shift, scale) halves in the other
order) and the diffusers names it maps to: :func:`bfl_target` per module,
:func:`to_bfl_state_dict` / :func:`from_bfl_state_dict` for whole state dicts (single-file
checkpoints, and kohya/ComfyUI LoRA names in :mod:`lora_kernel.training.families.flux`).
No model code: names, sizes and tensor slicing.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import re

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


def swap_halves(t):
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
            tensor = swap_halves(tensor)
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
            tensor = swap_halves(tensor)
        out[key] = tensor
    return out
