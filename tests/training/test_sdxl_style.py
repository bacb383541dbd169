"""The tiny SDXL is pre-trained (lora_kernel.training.demo_sdxl_pretrain): its VAE is the
tiny SD's pre-trained one, its UNet and both text encoders learned the scenes through the
SDXL family's conditioning, so the SDXL demo LoRA's effect is measurable like the SD one's:
the LoRA raises the style measure over the base by the stated margin while the images keep
the prompted colour, and the same grid with the base column in the LoRA's place (a LoRA that
learned nothing) fails that check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.training import demo_assets, style_metrics

# the SDXL check's prompts: colours and shapes the demo dataset has, in its style
PROMPTS = ["a red circle in enclave style", "a blue square in enclave style",
           "a green triangle in enclave style"]


def test_the_tiny_sdxl_has_the_tiny_sds_pretrained_vae(demo_home):
    models = demo_home / "demo" / "models"
    sd = load_file(models / "tiny-sd" / "vae" / "diffusion_pytorch_model.safetensors")
    xl = load_file(models / "tiny-sdxl" / "vae" / "diffusion_pytorch_model.safetensors")
    assert sd.keys() == xl.keys()
    assert all(torch.equal(sd[k], xl[k]) for k in sd)
    # and its UNet is not the seeded initialisation any more (the pair: a fresh build
    # without pre-training is exactly that initialisation)
    init = demo_assets.build_tiny_sdxl_components(0)["unet"].state_dict()
    unet = load_file(models / "tiny-sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(init[k], unet[k]) for k in init)
    again = demo_assets.build_tiny_sdxl_components(0)["unet"].state_dict()
    assert all(torch.equal(init[k], again[k]) for k in init)


@pytest.fixture(scope="module")
def sdxl_style_run(demo_home, tmp_path_factory):
    """The demo SDXL config as shipped, sampled with the check's prompts at seeds 0, 1 (one
    SDXL run with samples costs ~2.5-3.5 min on the loaded 2-core machine, so there is one)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train

    over = {"output_dir": str(tmp_path_factory.mktemp("sdxl-style")), "save_steps": 0,
            "sample_prompts": PROMPTS, "sample_seeds": [0, 1]}
    cfg = load_config(demo_home / "demo" / "sdxl_lora.yaml", over)
    return train(cfg, progress=False, home=demo_home, log=lambda m: None).samples


def assert_lora_learned_the_style(samples: dict) -> None:
    """The check the SDXL demo run is held to (the floors of style_metrics)."""
    m = samples["measures"]
    assert m["style_gain"] >= style_metrics.STYLE_GAIN_FLOOR, m
    assert m["lora"]["adherence"] >= style_metrics.ADHERENCE_FLOOR, m


@pytest.mark.slow
def test_the_sdxl_demo_lora_learns_the_style_and_keeps_the_prompted_colour(sdxl_style_run):
    samples = sdxl_style_run
    assert_lora_learned_the_style(samples)
    # the pre-trained base column draws the prompted colours, without the style
    assert samples["measures"]["base"]["adherence"] >= style_metrics.ADHERENCE_FLOOR
    assert samples["measures"]["base"]["stripe_energy"] < 0.05


@pytest.mark.slow
def test_a_lora_column_that_learned_nothing_fails_the_check(sdxl_style_run, tmp_path):
    """The pair: a LoRA that learned nothing renders the base's images; the same grid with
    its base column in the LoRA's place fails the check (measured from the PNG grid the run
    wrote, so the check reads what a person sees)."""
    from PIL import Image

    info = sdxl_style_run
    grid = np.asarray(Image.open(info["grid"]).convert("RGB"))
    (w, h), top, left = info["cell"], info["header_height"], info["margin_width"]
    half = len(info["seeds"])
    rows = [[grid[top + r * h:top + (r + 1) * h, left + c * w:left + (c + 1) * w]
             for c in range(2 * half)] for r in range(len(PROMPTS))]
    assert_lora_learned_the_style(
        {"measures": style_metrics.measure_grid(rows, PROMPTS, half)})
    with pytest.raises(AssertionError):
        assert_lora_learned_the_style(
            {"measures": style_metrics.measure_grid([r[:half] * 2 for r in rows], PROMPTS,
                                                    half)})


def test_the_family_denoiser_training_is_deterministic_and_trains_all_three(tmp_path):
    """train_family_denoiser through the SDXL interface: the same seed gives the same bytes
    (UNet and both text encoders changed from their initialisation)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from lora_kernel.training import demo_pretrain, demo_sdxl_pretrain
    from lora_kernel.training.families import family_named

    toks = [CLIPTokenizer.from_pretrained(demo_assets.write_clip_tokenizer(
        tmp_path / name, pad_token=pad), local_files_only=True)
        for name, pad in (("t1", "<|endoftext|>"), ("t2", "!"))]
    vocab = demo_pretrain.SceneVocabulary(demo_assets.COLOR_RGB, demo_assets.SHAPES)
    states = []
    for _ in range(2):
        parts = demo_assets.build_tiny_sdxl_components(0)
        comps = SimpleNamespace(
            unet=parts["unet"], vae=parts["vae"], tokenizers=toks,
            text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
            noise_scheduler=DDPMScheduler.from_config(parts["scheduler"].config))
        with demo_pretrain.deterministic_cpu():
            losses = demo_sdxl_pretrain.train_family_denoiser(
                family_named("sdxl"), comps, vocab, 0, steps=2, batch=4)
        assert len(losses) == 2 and all(np.isfinite(losses))
        states.append({f"{p}.{k}": v for p in demo_sdxl_pretrain.NAMES
                       for k, v in parts[p].state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    init = demo_assets.build_tiny_sdxl_components(0)
    for part in demo_sdxl_pretrain.NAMES:
        start = init[part].state_dict()
        assert any(not torch.equal(start[k], states[0][f"{part}.{k}"]) for k in start), part
