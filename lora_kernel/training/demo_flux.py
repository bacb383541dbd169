"""The tiny Flux.1 and SD3.5 demo models (random weights of the real architectures, built by
our own code, same seed same bytes) and their demo configs.

* ``models/tiny-flux/``: ``FluxPipeline`` folder: ``FluxTransformer2DModel`` with a guidance
  embedding (Flux.1-dev's form: 1 double- and 2 single-stream blocks, 2 heads of 16), a
  CLIP-L-like ``CLIPTextModel`` (pooled 32), a T5-XXL-like ``T5EncoderModel`` (v1.1 gated-GELU,
  width 32) and a 16-channel VAE with a shift factor; 64 px images give 8x8x16 latents,
  4x4 packed tokens of 64 channels.
* ``models/tiny-flux.safetensors``: the same as one all-in-one file in ComfyUI's layout
  (:mod:`lora_kernel.training.flow_single_file`).
* ``models/tiny-sd3/``: ``StableDiffusion3Pipeline`` folder: ``SD3Transformer2DModel``
  (SD3.5's RMS qk-norm), CLIP-L and CLIP-G (both with projections, pooled 16 + 16), T5.
* The T5 tokenizer is a Unigram vocabulary built here (:func:`t5_vocab`): every demo word as
  one ``▁word`` piece, then single letters, saved through transformers' ``T5Tokenizer``
  (``tokenizer.json``); the CLIP tokenizers are the demo's BPE one
  (:func:`lora_kernel.training.demo_assets.write_clip_tokenizer`, passed in: this module
  does not import the demo writer that calls it).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

T5_WIDTH = 32
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
TINY_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
    pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
)
# The 16-channel VAE (Flux's and SD3's shape at toy width). scale: about 1 / std of these
# randomly initialised VAEs' latent means over the demo images (0.32 and 0.35 for seed 0;
# mean -0.006 and -0.025, so no shift); Flux's own are shift 0.1159, scale 0.3611.
FLOW_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0, scaling_factor=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

_CONFIG_HEAD = """\
task: image
train_data_dir: datasets/image
metadata_path: datasets/image/metadata.csv
resolution: 64  # the tiny model's own (the real models': 1024)
lora_rank: 8
lora_alpha: 8
batch_size: 4
learning_rate: 2.0e-3
max_train_steps: 40
save_steps: 20
sample_prompts:
  - a red circle in enclave style
sample_steps: 6
sample_seeds: [0]
seed: 42
timestep_sampling: sigmoid
"""
FLUX_CONFIG_YAML = ("# Demo Flux.1 LoRA: the tiny Flux-dev-architecture model learns the "
                    "\"enclave style\".\n# Paths are relative to this file. Run: lora run "
                    "--config flux_lora.yaml\n" + _CONFIG_HEAD + """\
base_model: models/tiny-flux
output_dir: output/flux
output_name: enclave_style_flux
guidance_scale: 1.0  # Flux.1-dev's guidance embedding during training
# attention of both streams, the MLPs, and the single blocks' MLP input (kohya: linear1)
target_modules: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out,
                 ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2, proj_mlp]
""")
SD3_CONFIG_YAML = ("# Demo SD3.5 LoRA: the tiny SD3.5-architecture model learns the "
                   "\"enclave style\".\n# Paths are relative to this file. Run: lora run "
                   "--config sd3_lora.yaml\n" + _CONFIG_HEAD + """\
base_model: models/tiny-sd3
output_dir: output/sd3
output_name: enclave_style_sd3
target_modules: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out]
""")


def t5_vocab(words) -> list[tuple[str, float]]:
    """The demo T5 Unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>`` (T5's ids 0, 1, 2),
    each word as ``▁word`` (log-probability -2), then ``▁`` and single letters (-8)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in sorted(set(words))]
    pieces += [("\u2581", -6.0)] + [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return pieces


T5_MAX_LENGTH = 32  # the tiny models' T5 sequence (the real ones: Flux 512, SD3.5 256)


def write_t5_tokenizer(folder: Path, words, max_length: int = T5_MAX_LENGTH) -> Path:
    """Write the demo T5 tokenizer (``tokenizer.json``, ``tokenizer_config.json``) loadable
    with ``T5Tokenizer.from_pretrained(folder)``."""
    from transformers import T5Tokenizer
    if folder.exists():
        shutil.rmtree(folder)
    tok = T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(str(folder))
    _normalise(folder)
    return folder


def _normalise(folder: Path) -> None:
    """JSON files with sorted keys and no fields that vary between builds."""
    for path in sorted(folder.rglob("*.json")):
        if path.name in ("vocab.json",):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_bytes((json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
                          + "\n").encode("utf-8"))


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False))


def _clip(cls, vocab: dict, hidden: int, projection: int, act: str):
    from transformers import CLIPTextConfig
    return cls(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=projection, hidden_act=act, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))


def write_tiny_flux(folder: Path, *, seed: int, vocab: dict, words, vae_config: dict,
                    clip_tokenizer: Callable[..., Path]) -> Path:
    """Write the tiny Flux.1-dev-architecture model as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5Tokenizer

    _fresh(folder)
    torch.manual_seed(seed + 20)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    torch.manual_seed(seed + 21)
    vae = AutoencoderKL(**{**vae_config, **FLOW_VAE})
    torch.manual_seed(seed + 22)
    clip = _clip(CLIPTextModel, vocab, 32, 32, "quick_gelu")
    t5_words = [w for w in words]
    torch.manual_seed(seed + 23)
    t5 = _t5(len(t5_vocab(t5_words)))
    toks = {"tokenizer": CLIPTokenizer.from_pretrained(
                clip_tokenizer(folder / "tokenizer"), local_files_only=True),
            "tokenizer_2": T5Tokenizer.from_pretrained(
                write_t5_tokenizer(folder / "tokenizer_2", t5_words), local_files_only=True)}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=clip, text_encoder_2=t5, transformer=transformer, **toks)
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites the tokenizers in its own format; keep ours (stable bytes).
    shutil.rmtree(folder / "tokenizer")
    clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2", t5_words)
    _normalise(folder)
    return folder


def write_tiny_sd3(folder: Path, *, seed: int, vocab: dict, words, vae_config: dict,
                   clip_tokenizer: Callable[..., Path]) -> Path:
    """Write the tiny SD3.5-architecture model as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

    _fresh(folder)
    torch.manual_seed(seed + 30)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    torch.manual_seed(seed + 31)
    vae = AutoencoderKL(**{**vae_config, **FLOW_VAE})
    torch.manual_seed(seed + 32)
    clip_l = _clip(CLIPTextModelWithProjection, vocab, 16, 16, "quick_gelu")
    torch.manual_seed(seed + 33)
    clip_g = _clip(CLIPTextModelWithProjection, vocab, 16, 16, "gelu")
    torch.manual_seed(seed + 34)
    t5 = _t5(len(t5_vocab(words)))
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    toks = {name: CLIPTokenizer.from_pretrained(clip_tokenizer(folder / name, pad_token=pad),
                                                local_files_only=True)
            for name, pad in pads.items()}
    toks["tokenizer_3"] = T5Tokenizer.from_pretrained(
        write_t5_tokenizer(folder / "tokenizer_3", words), local_files_only=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, text_encoder_3=t5, **toks)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in pads.items():
        shutil.rmtree(folder / name)
        clip_tokenizer(folder / name, pad_token=pad)
    write_t5_tokenizer(folder / "tokenizer_3", words)
    _normalise(folder)
    return folder


def write_flow_demo(root: Path, *, seed: int, vocab: dict, words, vae_config: dict,
                    clip_tokenizer: Callable[..., Path]) -> dict[str, Path]:
    """Write both tiny models and their configs under ``root`` (the demo folder); returns
    ``tiny_flux``, ``tiny_flux_single_file`` (all-in-one, ComfyUI layout), ``flux_config``,
    ``tiny_sd3``, ``sd3_config``."""
    models = root / "models"
    paths = {"tiny_flux": models / "tiny-flux", "flux_config": root / "flux_lora.yaml",
             "tiny_flux_single_file": models / "tiny-flux.safetensors",
             "tiny_sd3": models / "tiny-sd3", "sd3_config": root / "sd3_lora.yaml"}
    kw = dict(seed=seed, vocab=vocab, words=words, vae_config=vae_config,
              clip_tokenizer=clip_tokenizer)
    write_tiny_flux(paths["tiny_flux"], **kw)
    from lora_kernel.training.flow_single_file import write_flux_single_file
    write_flux_single_file(paths["tiny_flux"], paths["tiny_flux_single_file"])
    write_tiny_sd3(paths["tiny_sd3"], **kw)
    paths["flux_config"].write_bytes(FLUX_CONFIG_YAML.encode("utf-8"))
    paths["sd3_config"].write_bytes(SD3_CONFIG_YAML.encode("utf-8"))
    return paths


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


# Flux.1's architecture (black-forest-labs/FLUX.1-dev and -schnell, configs only): the
# bundles lora_kernel/training/configs/flux-dev and flux-schnell, which load an all-in-one
# Flux checkpoint offline (its tokenizer folders must sit next to it) and size the
# full-size model in tests (on the meta device).
_UP, _DOWN = ("UpDecoderBlock2D",) * 4, ("DownEncoderBlock2D",) * 4
FLUX_CONFIGS = {
    "model_index.json": {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]},
    "transformer/config.json": {
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": list(_DOWN),
        "force_upcast": True, "in_channels": 3,
        "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": list(_UP),
        "use_post_quant_conv": False, "use_quant_conv": False},
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "vocab_size": 49408},
    "text_encoder_2/config.json": {
        "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
        "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_heads": 64,
        "num_layers": 24, "pad_token_id": 0, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "vocab_size": 32128},
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER},
    "tokenizer/README.txt": (
        "The CLIP and T5 tokenizer vocabularies cannot be generated offline, so they are not\n"
        "bundled. Put the tokenizer/ and tokenizer_2/ folders of a Flux diffusers model next\n"
        "to the checkpoint (or pass config= with them).\n"),
}
FLUX_SCHNELL_CHANGES = {
    "transformer/config.json": {"guidance_embeds": False},
    "scheduler/scheduler_config.json": {"shift": 1.0, "use_dynamic_shifting": False},
}


def write_flux_config_bundles(dst: Path, tiny_folder: Path) -> None:
    """Write the bundled Flux configs into ``dst`` (``lora_kernel/training/configs``):
    ``flux-dev``, ``flux-schnell`` and ``tiny-flux`` (the demo model's configs and
    tokenizers, from ``tiny_folder``). A developer tool, like
    :func:`lora_kernel.training.demo_assets.regenerate_bundled_configs`."""
    for name, changes in (("flux-dev", {}), ("flux-schnell", FLUX_SCHNELL_CHANGES)):
        _fresh(dst / name)
        for rel, data in FLUX_CONFIGS.items():
            path = dst / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, str):
                path.write_bytes(data.encode("utf-8"))
                continue
            path.write_bytes((json.dumps({**data, **changes.get(rel, {})}, indent=2,
                                         sort_keys=True) + "\n").encode("utf-8"))
    _fresh(dst / "tiny-flux")
    for f in sorted(tiny_folder.rglob("*")):
        if f.is_file() and f.suffix != ".safetensors":
            target = dst / "tiny-flux" / f.relative_to(tiny_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
