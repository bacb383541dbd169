"""The flow-matching objective shared by the rectified-flow transformers (Flux.1, SD3.5).

A training step draws ``t`` in (0, 1), mixes ``x_t = (1 - t) x_0 + t noise`` and teaches the
transformer the velocity ``noise - x_0`` (diffusers' ``train_dreambooth_lora_flux.py`` /
``_sd3.py`` and kohya's ``flux_train_network.py`` do the same). How ``t`` is drawn is the
config's ``timestep_sampling``:

* ``uniform``: ``t ~ U(0, 1)``;
* ``sigmoid``: ``t = sigmoid(sigmoid_scale * n)``, ``n ~ N(0, 1)`` (kohya's default for Flux);
* ``logit_normal``: ``t = sigmoid(n)`` (SD3's paper; diffusers' ``weighting_scheme:
  logit_normal`` with mean 0, std 1);
* ``shift``: ``sigmoid`` then shifted towards noise by ``discrete_flow_shift`` ``s``:
  ``t' = s t / (1 + (s - 1) t)`` (the shift the models' schedulers sample with).

``weighting_scheme`` weights each example's squared error (``none``, ``sigma_sqrt``:
``t^-2``, ``cosmap``: ``2 / (pi (1 - 2t + 2t^2))``), as diffusers'
``compute_loss_weighting_for_sd3``. Timesteps reach the transformer as ``1000 t``.

The VAE latents are ``(z - shift_factor) x scaling_factor`` (the 16-channel VAEs of both).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import math
from typing import ClassVar

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.families.base import ModelFamily, NoisyBatch

TIMESTEP_SAMPLING = ("uniform", "sigmoid", "logit_normal", "shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
# The config keys only the flow-matching families read (the others refuse them).
FLOW_KEYS = ("timestep_sampling", "discrete_flow_shift", "weighting_scheme", "sigmoid_scale",
             "guidance_scale")


def sample_t(cfg, n: int, generator):
    """``n`` flow times in (0, 1) drawn from ``generator`` as ``cfg.timestep_sampling`` says."""
    import torch
    mode = cfg.timestep_sampling
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    scale = cfg.sigmoid_scale if mode in ("sigmoid", "shift") else 1.0
    t = torch.sigmoid(scale * torch.randn(n, generator=generator))
    if mode == "shift":
        s = cfg.discrete_flow_shift
        t = (t * s) / (1 + (s - 1) * t)
    return t


def loss_weights(scheme: str, t):
    """Per-example loss weights for flow times ``t`` (``none``: ones)."""
    import torch
    if scheme == "sigma_sqrt":
        return t.clamp_min(1e-4) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    return torch.ones_like(t)


class FlowMatchingFamily(ModelFamily):
    """What Flux and SD3.5 share: a transformer denoiser (in the components' ``unet`` slot),
    a 16-channel VAE with a shift, CLIP + T5 prompts and the flow-matching objective.
    Subclasses say how prompts are encoded and how the transformer is called."""

    denoiser = "transformer"
    # T5's tokens: the pipeline's max_sequence_length, or the tokenizer's model_max_length
    # where that is shorter (the tiny demo models: 32)
    t5_max_length: ClassVar[int] = 512
    latent_multiple: ClassVar[int] = 16  # resolution multiple: VAE 8 x patch 2
    native: ClassVar[int] = 1024
    single_file: ClassVar[bool] = False  # trains from one .safetensors (Flux: all-in-one)

    def latents_from_vae(self, vae, latents):
        shift = vae.config.shift_factor or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def tokenize(self, comps, captions: list[str]) -> list:
        """CLIP tokenizers at their 77 tokens, T5's at the pipeline's ``max_sequence_length``."""
        out = []
        for tok in comps.tokenizers:
            length = (min(self.t5_max_length, tok.model_max_length)
                      if "T5" in type(tok).__name__ else tok.model_max_length)
            out.append(tok(captions, padding="max_length", max_length=length,
                           truncation=True, return_tensors="pt").input_ids)
        return out

    def noisy_batch(self, cfg, scheduler, latents, generator) -> NoisyBatch:
        import torch
        dev = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        t = sample_t(cfg, latents.shape[0], generator)
        sigma = t.to(dev, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - sigma) * latents + sigma * noise
        return NoisyBatch(noisy=noisy, timesteps=(t * 1000).to(dev), target=noise - latents,
                          weights=loss_weights(cfg.weighting_scheme, t),
                          extra={"guidance": cfg.guidance_scale})

    def sample_kwargs(self, comps) -> dict:
        """Extra pipeline arguments of the sample grid: T5's sequence length as trained."""
        t5 = comps.tokenizers[-1]
        return {"max_sequence_length": min(self.t5_max_length, t5.model_max_length)}

    def native_resolution(self, comps_or_unet_config: dict) -> int:
        return self.native

    def check_config(self, cfg, file: str) -> None:
        """Refused: a resolution the VAE and the 2x2 patches cannot tile, buckets, fp8 where
        the GPU has none, and a model folder without one of its parts (T5, VAE, ...)."""
        from pathlib import Path

        from lora_kernel.training.flow_models import fp8_supported
        from lora_kernel.training.losses import ddpm_only_set
        for key in ddpm_only_set(cfg):  # would be silently ignored by flow matching
            raise ConfigError(
                f"is a loss option of the DDPM models (SD 1.x/2.x, SDXL: an SNR schedule, "
                f"epsilon / v targets); {self.title} trains by flow matching, which has none, "
                f"so it would be ignored; fix: remove {key} (flow matching's own: "
                f"weighting_scheme: sigma_sqrt or cosmap, timestep_sampling)", file=file,
                key=key)
        if cfg.network_type != "lora" or cfg.use_dora:  # adapters.py: the UNet families
            key = "use_dora" if cfg.network_type == "lora" else "network_type"
            raise ConfigError(
                f"{self.title} trains plain LoRA on its transformer here (LoCon, LoHa, LoKr "
                f"and DoRA exports are for the UNet families); fix: remove {key}",
                file=file, key=key)
        p = Path(cfg.base_model)
        if p.is_file() and self.single_file:
            from lora_kernel.training.flow_single_file import missing_error, missing_parts
            from lora_kernel.training.model_safety import read_safetensors_header
            missing = missing_parts(read_safetensors_header(p))
            if missing:
                err = missing_error(p, missing)
                raise ConfigError(err.detail, file=file, key="base_model")
        if p.is_dir():
            for part in ("transformer", "vae", *(t.name for t in self.text_encoder_parts)):
                if not any((p / part).glob("*.safetensors")):
                    what = next((f"{t.model_class}" for t in self.text_encoder_parts
                                 if t.name == part), part)
                    raise ConfigError(
                        f"{p} is {self.title} without its {part} ({what}) weights "
                        f"({part}/*.safetensors): it cannot encode prompts or images without "
                        f"it; fix: copy the model's {part}/ folder (and its tokenizer folder) "
                        f"into {p}, from the same model's diffusers release", file=file,
                        key="base_model")
        if cfg.quantization == "fp8" and not fp8_supported():
            raise ConfigError(
                "quantization: fp8 needs a GPU with fp8 support (compute capability 8.9: Ada, "
                "Hopper or newer), and training here will not run on one; fix: quantization: "
                "nf4 (bitsandbytes, any GPU or the CPU) or int8", file=file, key="quantization")
        m = self.latent_multiple
        if cfg.resolution % m:
            raise ConfigError(
                f"{self.title} needs a resolution divisible by {m} (the VAE's 8x "
                f"downsampling, then 2x2 latent patches), got {cfg.resolution}; fix: "
                f"resolution: {max(m, cfg.resolution // m * m)} (or "
                f"{(cfg.resolution // m + 1) * m})", file=file,
                key="resolution")
        if cfg.enable_bucket:
            raise ConfigError(
                f"enable_bucket is not supported for {self.title} yet (its buckets must be "
                f"multiples of {m}); fix: enable_bucket: false", file=file, key="enable_bucket")
