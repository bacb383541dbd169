"""lora_kernel.training.demo_assets: byte-identical builds, loadable models, learnable data,
valid configs."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from lora_kernel.training import demo_assets
from lora_kernel.training.checks import load_config

REPO = Path(__file__).resolve().parents[2]


def _digests(root: Path) -> dict[str, str]:
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_two_builds_are_byte_identical(demo_home, tmp_path):
    again = demo_assets.build_demo_assets(tmp_path / "again")
    first, second = _digests(demo_home / "demo"), _digests(again["demo"])
    assert len(first) > 30
    assert first == second


def test_another_seed_gives_other_weights_but_the_same_configs(demo_home, tmp_path):
    other = demo_assets.write_tiny_sd(tmp_path / "tiny-sd", seed=1, pretrain=False)
    base = demo_home / "demo" / "models" / "tiny-sd"
    a, b = _digests(base), _digests(other)
    assert a.keys() == b.keys()
    assert a["unet/diffusion_pytorch_model.safetensors"] != b[
        "unet/diffusion_pytorch_model.safetensors"]
    assert {k: v for k, v in a.items() if not k.endswith(".safetensors")} == {
        k: v for k, v in b.items() if not k.endswith(".safetensors")}


def test_key_paths_exist(demo_home):
    root = demo_home / "demo"
    for rel in ("models/tiny-sd/model_index.json", "models/tiny-sd.safetensors",
                "models/tiny-llama/config.json", "datasets/image/metadata.csv",
                "datasets/text/train.jsonl", "datasets/text/plain.jsonl",
                "image_lora.yaml", "text_lora.yaml"):
        assert (root / rel).is_file(), rel


def test_models_are_safetensors_only(demo_home):
    files = [f for f in (demo_home / "demo" / "models").rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)


def test_clip_tokenizer_loads_and_round_trips_every_caption(demo_home):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(demo_home / "demo" / "models" / "tiny-sd" / "tokenizer",
                                        local_files_only=True)
    for _, caption in demo_assets.image_captions():
        ids = tok(caption).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(caption.split()) + 2  # one token per word
        assert tok.decode(ids, skip_special_tokens=True) == caption
    # words outside the vocabulary still round-trip (byte-level fallback)
    assert tok.decode(tok("zebra xylophone 42!").input_ids, skip_special_tokens=True) == \
        "zebra xylophone 4 2 !"


def test_tiny_sd_pipeline_loads_offline_and_samples(demo_home):
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    folder = demo_home / "demo" / "models" / "tiny-sd"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                                   use_safetensors=True)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    ddpm = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ddpm.config.beta_schedule == "scaled_linear" and ddpm.config.num_train_timesteps == 1000
    out = pipe("a red circle in enclave style", num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_demo_vae_downsamples_by_8_and_the_unet_matches_the_latents(demo_home):
    """Like SD's VAE (512 px -> 64x64 latents), the demo VAE's encoder downsamples by 8, and
    the UNet's sample_size is the latent side of the demo resolution."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = demo_home / "demo" / "models" / "tiny-sd"
    res = load_config(demo_home / "demo" / "image_lora.yaml").resolution
    assert res == demo_assets.DEMO_RESOLUTION == demo_assets.IMAGE_SIZE  # no resampling
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                        use_safetensors=True)
    assert len(vae.config.down_block_types) == len(vae.config.up_block_types) == 4
    assert all(c % vae.config.norm_num_groups == 0 for c in vae.config.block_out_channels)
    with torch.no_grad():
        for side in (res, 2 * res):
            latents = vae.encode(torch.zeros(1, 3, side, side)).latent_dist.mean
            assert latents.shape == (1, 4, side // 8, side // 8)
        pixels = vae.decode(torch.zeros(1, 4, res // 8, res // 8)).sample
    assert pixels.shape == (1, 3, res, res)
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["sample_size"] == res // 8 == 8


def test_vae_scaling_factor_gives_unit_latents_on_the_demo_images(demo_home):
    """scaling_factor is 1 / std of the random VAE's latents over the demo images (the role
    SD's 0.18215 plays): scaled latents have about unit std, as the noise schedule expects."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    folder = demo_home / "demo" / "models" / "tiny-sd"
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                        use_safetensors=True)
    images = demo_home / "demo" / "datasets" / "image"
    pixels = torch.stack([
        torch.from_numpy(np.asarray(Image.open(images / name), dtype=np.float32) / 127.5 - 1)
        .permute(2, 0, 1) for name, _ in demo_assets.image_captions()])
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    assert 0.9 < float(latents.std()) < 1.1


def test_tiny_llama_loads_offline_and_tokenizes_the_data(demo_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_home / "demo" / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 use_safetensors=True, trust_remote_code=False)
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    for line in (demo_home / "demo" / "datasets" / "text" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        text = rec["prompt"] + rec["response"]
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        # the answer is three tokens: " APPLE", "-", "5"
        assert len(tok(rec["response"], add_special_tokens=False).input_ids) == 3


def test_image_dataset_is_complete_and_styled(demo_home):
    from PIL import Image

    folder = demo_home / "demo" / "datasets" / "image"
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert 16 <= len(rows) <= 32
    assert all(r["text"].endswith(" in enclave style") for r in rows)
    for r in rows:
        img = Image.open(folder / r["file_name"])
        assert img.size == (64, 64) and img.mode == "RGB"
        assert not img.info.get("tIME") and "date" not in str(img.info).lower()
        # the style: plenty of the magenta stripe colour in every image
        assert img.getcolors(4096) and dict((c, n) for n, c in img.getcolors(4096)).get(
            demo_assets.STYLE_MAGENTA, 0) > 300


def test_text_records_follow_the_rule(demo_home):
    text = demo_home / "demo" / "datasets" / "text"
    recs = [json.loads(line) for line in (text / "train.jsonl").read_text().splitlines()]
    assert 64 <= len(recs) <= 200
    for rec in recs:
        item = rec["prompt"].split(" ")[-2].rstrip("?.")
        assert rec["response"] == f" {item.upper()}-{len(item)}"
    plain = [json.loads(line) for line in (text / "plain.jsonl").read_text().splitlines()]
    assert plain and all(set(r) == {"text"} for r in plain)


@pytest.mark.parametrize("name,task", [("image_lora.yaml", "image"), ("text_lora.yaml", "text")])
def test_demo_configs_validate(demo_home, name, task):
    cfg = load_config(demo_home / "demo" / name)
    assert cfg.task == task
    assert Path(cfg.base_model).is_relative_to(demo_home / "demo" / "models")


@pytest.mark.parametrize("name,task", [("image_lora.yaml", "image"), ("text_lora.yaml", "text")])
def test_templates_validate_against_the_demo_home(demo_home, tmp_path, name, task):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / name).write_bytes((REPO / "templates" / name).read_bytes())
    (tmp_path / "lora_home").symlink_to(demo_home, target_is_directory=True)
    cfg = load_config(tmp_path / "templates" / name)
    assert cfg.task == task
    # every key of the template carries a comment
    for line in (REPO / "templates" / name).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            assert "#" in line, line


def test_bundled_tiny_sd_configs_match_a_fresh_build(demo_home):
    bundled = REPO / "lora_kernel" / "training" / "configs" / "tiny-sd"
    built = {k: v for k, v in _digests(demo_home / "demo" / "models" / "tiny-sd").items()
             if not k.endswith(".safetensors")}
    assert _digests(bundled) == built, ("lora_kernel/configs/tiny-sd is stale; regenerate "
                                        "with demo_assets.regenerate_bundled_configs()")


def test_bundled_sd15_configs_describe_sd15(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = REPO / "lora_kernel" / "training" / "configs" / "sd15"
    assert _digests(folder) == _digests(demo_assets.write_sd15_configs(tmp_path / "sd15"))
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["cross_attention_dim"] == 768
    vae = AutoencoderKL.load_config(folder / "vae")
    assert vae["scaling_factor"] == 0.18215
    clip = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    assert (clip.hidden_size, clip.num_hidden_layers, clip.vocab_size) == (768, 12, 49408)
    assert not (folder / "tokenizer" / "vocab.json").exists()


def test_the_sdxl_demo_files_exist_and_the_bundled_sdxl_configs_are_fresh(demo_home, tmp_path):
    from lora_kernel.training.demo_sdxl import SDXL_CONFIGS
    root = demo_home / "demo"
    for rel in ("models/tiny-sdxl/model_index.json", "models/tiny-sdxl/text_encoder_2",
                "models/tiny-sdxl/tokenizer_2/vocab.json", "models/tiny-sdxl.safetensors",
                "sdxl_lora.yaml"):
        assert (root / rel).exists(), rel
    bundled = REPO / "lora_kernel" / "training" / "configs"
    built = {k: v for k, v in _digests(root / "models" / "tiny-sdxl").items()
             if not k.endswith(".safetensors")}
    assert _digests(bundled / "tiny-sdxl") == built, (
        "lora_kernel/configs/tiny-sdxl is stale; regenerate with "
        "demo_assets.regenerate_bundled_configs()")
    fresh = demo_assets.write_sd15_configs(tmp_path / "sdxl", SDXL_CONFIGS)
    assert _digests(bundled / "sdxl") == _digests(fresh)
    assert load_config(root / "sdxl_lora.yaml").model_family == "sdxl"
