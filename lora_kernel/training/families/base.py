"""The small interface every model family implements, and what all Stable Diffusion
families share.

The training loop, the image task, caching, checkpoints, exports and records ask a
:class:`ModelFamily` (never ``if family == ...``) for what differs between families:

* ``text_encoder_parts`` and ``bundled_configs``: what
  :func:`lora_kernel.training.models.load_sd_components` loads (in the training dtypes) from
  a diffusers folder or one file, and the export names of each text encoder;
* ``tokenize`` / ``encode_prompt``: one or more text encoders, hidden states for the UNet's
  cross-attention and pooled embeddings (:class:`PromptEmbeds`);
* ``time_ids`` / ``unet_kwargs``: extra conditioning (SDXL's size and crop ``add_time_ids``);
* ``training_target``: epsilon or v-prediction (from the scheduler's ``prediction_type``);
* ``noisy_batch`` / ``predict`` / ``batch_loss``: one training step's noising, timesteps and
  target, the denoiser's call, and the (weighted) loss — DDPM here, flow matching in
  :mod:`.flow` (Flux, SD3.5: velocity target, packed latents, guidance embedding);
* ``latents_from_vae``: the VAE's latent scaling (and shift, for the 16-channel VAEs);
* ``check_config``: refusals that depend on the model (read before anything loads);
* ``kohya_unet_name``: what the kohya export calls each UNet module;
* ``pipeline``: the diffusers pipeline the sample grid renders with.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder of a family: its component / diffusers-folder name, transformers
    class, kohya prefix, the config key of its own learning rate, and its keys' prefix in the
    original single-file layout with the converter that reads them (``"clip"``: Hugging Face
    CLIP names, ``"open_clip"``: OpenCLIP's ``resblocks`` with fused ``in_proj``, ``"t5"``:
    Hugging Face T5 names); its tokenizer's transformers class; ``trainable``: whether
    ``train_text_encoder`` puts a LoRA on it (T5 is always frozen and cached)."""

    name: str
    model_class: str
    kohya_prefix: str
    lr_key: str
    ldm_prefix: str
    ldm_format: str = "clip"
    tokenizer_class: str = "CLIPTokenizer"
    trainable: bool = True


@dataclass
class NoisyBatch:
    """One training step's denoiser input: ``noisy`` latents at ``timesteps`` and the
    ``target`` the denoiser learns; ``weights`` (batch,) scale each example's loss (None: 1);
    ``extra`` holds what a family's :meth:`ModelFamily.predict` needs besides (guidance)."""

    noisy: Any
    timesteps: Any
    target: Any
    weights: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``hidden`` (batch, tokens, width) for cross-attention; ``pooled``
    (batch, width) where the family conditions on it (SDXL), else None."""

    hidden: Any
    pooled: Any = None


class ModelFamily:
    """A family of image base models (see the module docstring). Subclasses set the class
    attributes and override what differs; one instance per family lives in
    :data:`lora_kernel.training.families.FAMILIES`."""

    name: ClassVar[str]
    title: ClassVar[str]
    kohya_base_version: ClassVar[str]  # kohya's ss_base_model_version
    modelspec_architecture: ClassVar[str]  # modelspec.architecture of an adapter
    pipeline_class: ClassVar[str]  # diffusers pipeline for samples and save_lora_weights
    bundled_configs: ClassVar[dict[tuple, str]] = {}  # (conv_in shape, cross width) -> bundle
    text_encoder_parts: ClassVar[tuple[TextEncoderPart, ...]]
    vae_fp16_overflows: ClassVar[bool] = False  # keep the VAE out of fp16 (vae_dtype: auto)
    denoiser: ClassVar[str] = "unet"  # the denoiser's component name (Flux, SD3: transformer)

    # -- prompts ---------------------------------------------------------------------------
    def tokenize(self, comps, captions: list[str]) -> list:
        """Token ids of ``captions``, one (N, max_length) tensor per text encoder."""
        out = []
        for tok in comps.tokenizers:
            out.append(tok(captions, padding="max_length", max_length=tok.model_max_length,
                           truncation=True, return_tensors="pt").input_ids)
        return out

    def encode_prompt(self, comps, ids: list) -> PromptEmbeds:
        """The text encoders' output for token ids (one tensor per encoder)."""
        raise NotImplementedError

    def time_ids(self, example, *, flipped: bool) -> Any:
        """Extra per-image conditioning (None: the family has none)."""
        return None

    def unet_kwargs(self, embeds: PromptEmbeds, time_ids) -> dict:
        """Keyword arguments of the UNet call besides sample, timestep and hidden states."""
        return {}

    # -- training --------------------------------------------------------------------------
    def training_target(self, scheduler, latents, noise, timesteps):
        """What the UNet learns to predict: the noise (epsilon) or the velocity (v), as the
        model's scheduler config says (``prediction_type``)."""
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def latents_from_vae(self, vae, latents):
        """VAE latents (the posterior's mean or a sample) in the denoiser's scale."""
        return latents * vae.config.scaling_factor

    def noisy_batch(self, cfg, scheduler, latents, generator) -> NoisyBatch:
        """Noise, timesteps and target of one step (DDPM: uniform integer timesteps, the
        scheduler's ``add_noise``, epsilon or v target; ``noise_offset`` adds per-channel
        noise). Draws from ``generator`` only (CPU), so a replay draws the same."""
        import torch
        dev = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(dev)
        from lora_kernel.training.losses import multires_noise
        noise = multires_noise(noise, cfg, generator)  # a no-op unless configured
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=generator).to(dev)
        return NoisyBatch(noisy=scheduler.add_noise(latents, noise, timesteps),
                          timesteps=timesteps,
                          target=self.training_target(scheduler, latents, noise, timesteps),
                          extra={"cfg": cfg, "scheduler": scheduler})

    def shard_batch(self, batch: NoisyBatch, part: slice, n: int) -> NoisyBatch:
        """The examples ``part`` of a ``batch`` of ``n`` drawn for the whole global batch
        (data-parallel: :mod:`lora_kernel.training.distributed`): every tensor whose first
        dimension is the batch is sliced, in ``extra`` too; the rest (a scalar guidance,
        the config) is kept. A family whose batch holds other per-example values overrides
        this."""
        import torch

        def cut(value):
            return value[part] if torch.is_tensor(value) and value.ndim and \
                value.shape[0] == n else value
        return NoisyBatch(noisy=cut(batch.noisy), timesteps=cut(batch.timesteps),
                          target=cut(batch.target), weights=cut(batch.weights),
                          extra={k: cut(v) for k, v in batch.extra.items()})

    def predict(self, comps, batch: NoisyBatch, embeds: PromptEmbeds, time_ids):
        """The denoiser's prediction for ``batch`` (same shape as ``batch.target``)."""
        return comps.unet(batch.noisy, batch.timesteps, embeds.hidden,
                          **self.unet_kwargs(embeds, time_ids)).sample

    def batch_loss(self, pred, batch: NoisyBatch):
        """Mean squared error of ``pred`` against the target, each example weighted (its
        ``extra["example_weights"]``: a regularization image's ``prior_loss_weight``; a DDPM
        batch: kohya's loss options, min-SNR, debiased estimation, through
        :func:`lora_kernel.training.losses.diffusion_loss`; plain MSE without them)."""
        import torch.nn.functional as F
        examples = batch.extra.get("example_weights")  # prior_loss_weight of reg images
        if batch.weights is None and "scheduler" in batch.extra:
            from lora_kernel.training.losses import diffusion_loss
            return diffusion_loss(batch.extra["cfg"], batch.extra["scheduler"], pred,
                                  batch.target, batch.timesteps, example_weights=examples)
        if batch.weights is None and examples is None:
            return F.mse_loss(pred.float(), batch.target.float())
        per = ((pred.float() - batch.target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
        for w in (batch.weights, examples):
            if w is not None:
                per = w.float().to(per.device) * per
        return per.mean()

    def check_config(self, cfg, file: str) -> None:
        """Refuse (:class:`~lora_kernel.common.errors.ConfigError`) settings this family's
        model cannot train with, before anything loads (validation calls it). A UNet family
        has no guidance embedding and no quantized loading."""
        from lora_kernel.common.errors import ConfigError
        if cfg.guidance_scale is not None:
            raise ConfigError(f"{cfg.base_model} is {self.title}, which has no guidance "
                              f"embedding; fix: remove guidance_scale (it is for Flux.1-dev)",
                              file=file, key="guidance_scale")
        if cfg.quantization != "none":
            raise ConfigError(f"quantization is for the Flux and SD3.5 transformers, and "
                              f"{cfg.base_model} is {self.title}; fix: quantization: none",
                              file=file, key="quantization")

    def native_resolution(self, comps_or_unet_config: dict) -> int:
        """The resolution the model was trained at: UNet ``sample_size`` x 8."""
        return int(comps_or_unet_config.get("sample_size", 64)) * 8

    # -- export ----------------------------------------------------------------------------
    def kohya_state_dict(self, denoiser_sd: dict, alpha: float, config) -> dict | None:
        """The denoiser's kohya entries when the family writes them itself (Flux: fused
        projections of the original layout); None: one entry per module, named by
        :meth:`kohya_unet_name`."""
        return None

    def kohya_unet_name(self, module: str, unet_config) -> str:
        """The module name kohya/A1111 files use for the UNet module ``module`` (dotted,
        diffusers names), before ``lora_unet_`` and underscores."""
        return module

    def sample_kwargs(self, comps) -> dict:
        """Extra keyword arguments of the pipeline call that renders the sample grid."""
        return {}

    def pipeline(self, comps):
        """The diffusers pipeline over ``comps`` (samples)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Adapter header metadata naming the family."""
        return {"lora_enclave.model_family": self.name,
                "ss_base_model_version": self.kohya_base_version,
                "modelspec.architecture": self.modelspec_architecture}
