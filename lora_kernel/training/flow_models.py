"""Loading the flow-matching transformers (Flux.1, SD3.5) for training: the transformer, the
16-channel VAE, CLIP and T5 text encoders and their tokenizers, and the flow-matching Euler
scheduler, from a diffusers folder, safetensors and local files only (the same refusals as
:mod:`lora_kernel.training.models`, which calls this and wraps the result).

The frozen transformer can be loaded quantized (``quantization: nf4 | int8``): its Linear
layers become bitsandbytes ``Linear4bit`` (NF4, bf16 compute) / ``Linear8bitLt`` layers,
which peft's LoRA wraps; on a machine without CUDA bitsandbytes' CPU backend runs them.
``fp8`` stores the weights in ``float8_e4m3fn`` and casts each layer up for its forward
(diffusers' layerwise casting); only on a GPU with fp8 support (:func:`fp8_supported`).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.model_safety import check_model_path

QUANTIZATIONS = ("none", "nf4", "int8", "fp8")


def load_flow_parts(family, p: Path, *, dtype, vae_dtype=None, tokenizer=None,
                    quantization: str = "none", config=None) -> dict:
    """The components of the Flux / SD3.5 model at ``p`` (a diffusers folder) as
    :class:`~lora_kernel.training.models.SDComponents` keyword arguments (without the
    digest): ``unet`` holds the transformer."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    if not p.is_dir():
        if not family.single_file:
            raise ConfigError(f"{p}: {family.title} trains from its diffusers folder here (a "
                              f"single file is read for Flux only); fix: point base_model at "
                              f"the model's diffusers folder", key="base_model")
        from lora_kernel.training.flow_single_file import load_flux_single_file
        out = load_flux_single_file(family, p, dtype=dtype, vae_dtype=vae_dtype, config=config)
        if quantization in ("nf4", "int8"):
            out["unet"] = quantize_linear_layers(out["unet"], quantization, dtype)
        out["noise_scheduler"], out["sample_scheduler"] = flow_schedulers(out["config_path"])
        for module in out.values():
            if hasattr(module, "eval"):
                module.eval()
        return out
    kw = dict(local_files_only=True, use_safetensors=True)
    cls = getattr(diffusers, family.transformer_class)
    transformer = cls.from_pretrained(p, subfolder="transformer", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae", torch_dtype=vae_dtype or dtype, **kw)
    texts, toks = [], []
    for part in family.text_encoder_parts:
        texts.append(getattr(transformers, part.model_class).from_pretrained(
            p, subfolder=part.name, dtype=dtype, trust_remote_code=False, **kw))
        tok_dir = p / part.name.replace("text_encoder", "tokenizer")
        if tokenizer and not toks:
            tok_dir = Path(tokenizer)
        if not any((tok_dir / f).is_file() for f in ("vocab.json", "tokenizer.json",
                                                      "spiece.model")):
            raise ConfigError(f"no tokenizer in {tok_dir}; fix: copy the model's "
                              f"{tok_dir.name} folder there", key="base_model")
        check_model_path(tok_dir)
        toks.append(getattr(transformers, part.tokenizer_class).from_pretrained(
            str(tok_dir), local_files_only=True))
    if quantization in ("nf4", "int8"):
        transformer = quantize_linear_layers(transformer, quantization, dtype)
    elif quantization == "fp8":  # stored in float8, each layer cast up for its forward
        import torch
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                             compute_dtype=compute)
    noise, sample = flow_schedulers(p)
    for m, want in ((vae, vae_dtype or dtype), *((t, dtype) for t in texts)):
        if next(m.parameters()).dtype != want:
            m.to(dtype=want)
        m.eval()
    transformer.eval()
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    out = {"unet": transformer, "vae": vae, "noise_scheduler": noise,
           "sample_scheduler": sample, "config_path": p}
    for name, te, tok in zip(names, texts, toks, strict=False):
        out[name] = te
        out[name.replace("text_encoder", "tokenizer")] = tok
    return out


def fp8_supported() -> bool:
    """Whether training will run on a CUDA GPU with fp8 support (compute capability 8.9:
    Ada, Hopper and newer). No NVIDIA driver: False, without importing torch."""
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl")):
        return False
    import torch
    return bool(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9))


def flow_schedulers(folder: Path):
    """The model's flow-matching scheduler (training reads its config; sampling uses it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} not found; fix: add the scheduler config",
                          key="base_model")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    return (FlowMatchEulerDiscreteScheduler.from_config(cfg),
            FlowMatchEulerDiscreteScheduler.from_config(cfg))


def quantize_linear_layers(model, quantization: str, compute_dtype):
    """Replace every ``nn.Linear`` of the frozen ``model`` by its bitsandbytes form
    (``nf4``: ``Linear4bit`` NF4 with ``compute_dtype`` compute; ``int8``:
    ``Linear8bitLt``), weights quantized from the loaded ones. Returns ``model``."""
    import bitsandbytes as bnb
    import torch

    compute = compute_dtype
    # bitsandbytes quantizes a weight when it moves to its device: the training device
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if quantization == "nf4":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=compute,
                                      quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(),
                                             requires_grad=False, quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features,
                                        bias=child.bias is not None, has_fp16_weights=False,
                                        device="cpu")
                q.weight = bnb.nn.Int8Params(child.weight.data.float().cpu(),
                                             requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute), requires_grad=False)
            setattr(parent, child_name, q.to(device))
        del parent_name
    return model
