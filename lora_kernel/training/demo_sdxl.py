"""The tiny SDXL demo model's and the bundled SDXL configs' definitions (data only; the
writers are :func:`lora_kernel.training.demo_assets.write_tiny_sdxl` and
:func:`~lora_kernel.training.demo_assets.regenerate_bundled_configs`).

The tiny SDXL is a model of the real SDXL *architecture*, seeded and then pre-trained on
drawn scenes (:mod:`lora_kernel.training.demo_sdxl_pretrain`; its VAE is the tiny SD's)
(UNet with ``text_time`` added conditioning and linear-projection transformers of several
layers per block; two text encoders — a CLIP-L-like ``CLIPTextModel`` and an
OpenCLIP-bigG-like ``CLIPTextModelWithProjection`` with a text projection; the tiny SD's VAE; two
tokenizers) at a size that trains on a CPU in seconds: 64 px images, 8x8 latents. Its
single-file form (:func:`lora_kernel.training.single_file.write_single_file`) uses the
original layout (``model.diffusion_model.``, ``first_stage_model.``,
``conditioner.embedders.0.transformer.``, ``conditioner.embedders.1.model.``). Same seed,
same bytes.

:data:`SDXL_CONFIGS` is SDXL base 1.0's architecture (``lora_kernel/training/configs/sdxl``),
which loads a real SDXL single-file checkpoint offline (its tokenizers must be copied next to
it, as for SD1.x) and lets tests build the full-size model on the meta device.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

# The tiny SDXL: the real one's structure at toy width. Cross-attention width is the two
# encoders' hidden sizes concatenated (SDXL: 768 + 1280 = 2048); the added embedding takes
# the pooled projection plus six time ids of addition_time_embed_dim each (1280 + 6 x 256).
TINY_TE_HIDDEN = 32
TINY_TE2_HIDDEN = 32
TINY_PROJECTION = 32
TINY_TIME_EMBED = 8
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), cross_attention_dim=TINY_TE_HIDDEN + TINY_TE2_HIDDEN,
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TINY_TIME_EMBED,
    projection_class_embeddings_input_dim=TINY_PROJECTION + 6 * TINY_TIME_EMBED,
)
# SDXL's noise schedule and sampler (the SD1.x betas; Euler, leading spacing).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading",
    steps_offset=1, interpolation_type="linear", use_karras_sigmas=False,
)

SDXL_CONFIG_YAML = """\
# Demo SDXL LoRA: the tiny SDXL-architecture model learns the "enclave style".
# Paths are relative to this file. Run: lora run --config sdxl_lora.yaml
task: image
base_model: models/tiny-sdxl
train_data_dir: datasets/image
metadata_path: datasets/image/metadata.csv
resolution: 64  # the tiny model's own (the real SDXL's is 1024)
lora_rank: 8
lora_alpha: 8
# SDXL has no attention at its highest resolution: the style (thin stripes) is learned by
# the ResNet convolutions there, so they get a LoRA too (kohya's LoCon; both formats load it).
target_modules: [to_q, to_k, to_v, to_out.0, conv1, conv2]
batch_size: 4
learning_rate: 5.0e-3
max_train_steps: 40
save_steps: 20
output_dir: output/sdxl
output_name: enclave_style_xl
sample_prompts:
  - a red circle in enclave style
sample_steps: 8
sample_seeds: [0]
seed: 42
"""


_CLIP = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
         "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
         "vocab_size": 49408}
# SDXL base 1.0's architecture (stabilityai/stable-diffusion-xl-base-1.0, configs only).
SDXL_CONFIGS = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder/config.json": {
        **_CLIP, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "projection_dim": 768,
    },
    "text_encoder_2/config.json": {
        **_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
        "num_hidden_layers": 32, "projection_dim": 1280,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER, "clip_sample": False,
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "trained_betas": None,
    },
    "tokenizer/README.txt": (
        "The CLIP tokenizer vocabularies (vocab.json, merges.txt) cannot be generated offline,\n"
        "so they are not bundled. Put the tokenizer/ and tokenizer_2/ folders of an SDXL\n"
        "diffusers model next to the checkpoint (or pass config= with them).\n"),
}
