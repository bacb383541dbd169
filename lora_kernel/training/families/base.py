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
* ``kohya_unet_name``: what the kohya export calls each UNet module;
* ``pipeline``: the diffusers pipeline the sample grid renders with.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder of a family: its component / diffusers-folder name, transformers
    class, kohya prefix, the config key of its own learning rate, and its keys' prefix in the
    original single-file layout with the converter that reads them (``"clip"``: Hugging Face
    CLIP names, ``"open_clip"``: OpenCLIP's ``resblocks`` with fused ``in_proj``)."""

    name: str
    model_class: str
    kohya_prefix: str
    lr_key: str
    ldm_prefix: str
    ldm_format: str = "clip"


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

    def native_resolution(self, comps_or_unet_config: dict) -> int:
        """The resolution the model was trained at: UNet ``sample_size`` x 8."""
        return int(comps_or_unet_config.get("sample_size", 64)) * 8

    # -- export ----------------------------------------------------------------------------
    def kohya_unet_name(self, module: str, unet_config) -> str:
        """The module name kohya/A1111 files use for the UNet module ``module`` (dotted,
        diffusers names), before ``lora_unet_`` and underscores."""
        return module

    def pipeline(self, comps):
        """The diffusers pipeline over ``comps`` (samples)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Adapter header metadata naming the family."""
        return {"lora_enclave.model_family": self.name,
                "ss_base_model_version": self.kohya_base_version,
                "modelspec.architecture": self.modelspec_architecture}
