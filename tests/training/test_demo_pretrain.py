"""lora_kernel.training.demo_pretrain: the scenes name what they show, the VAE starts as a
linear codec, the pre-training is deterministic on this machine, and its result is cached by
content (hit, damaged entry rebuilt, unwritable cache tolerated)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_kernel.training import demo_assets, demo_pretrain

VOCAB = demo_pretrain.SceneVocabulary(demo_assets.COLOR_RGB, demo_assets.SHAPES)


def test_scenes_are_seeded_and_their_captions_name_colour_and_shape():
    a, b = demo_pretrain.scenes(40, 0, VOCAB.palette, VOCAB.shapes), \
        demo_pretrain.scenes(40, 0, VOCAB.palette, VOCAB.shapes)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for (x, _), (y, _) in zip(a, b, strict=True))
    named = [c for _, c in a if c]
    assert len(named) >= 30
    for caption in named:
        words = caption.split()
        assert words[1] in demo_assets.COLORS and words[2] in demo_assets.SHAPES
        assert demo_assets.STYLE not in caption  # the base never sees the style's name


def test_the_vae_starts_as_a_linear_codec_of_8px_cells():
    vae = demo_assets.build_tiny_sd_components(0)["vae"]
    demo_pretrain.linear_codec_(vae)
    img = demo_pretrain.draw_scene((220, 40, 40), "square", "middle", "white")
    x = demo_pretrain._to_tensor([img])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    cells = torch.nn.functional.avg_pool2d(x, 8)
    assert torch.allclose(z[:, :3], cells, atol=0.03)
    assert torch.allclose(rec, torch.nn.functional.interpolate(cells, scale_factor=8),
                          atol=0.06)


def test_a_random_vae_is_not_a_codec():
    """The pair of the test above: without linear_codec_ the same check fails."""
    vae = demo_assets.build_tiny_sd_components(0)["vae"]
    x = demo_pretrain._to_tensor([demo_pretrain.draw_scene((220, 40, 40), "square", "middle",
                                                           "white")])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    assert not torch.allclose(z[:, :3], torch.nn.functional.avg_pool2d(x, 8), atol=0.03)


def test_cached_state_trains_once_then_hits_and_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PRETRAIN_CACHE", str(tmp_path / "cache"))
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.arange(4.0)}

    first = demo_pretrain.cached_state("m", "k1", train)
    second = demo_pretrain.cached_state("m", "k1", train)
    assert len(calls) == 1 and torch.equal(first["w"], second["w"])
    (tmp_path / "cache" / "m-k1.safetensors").write_bytes(b"not safetensors")
    third = demo_pretrain.cached_state("m", "k1", train)
    assert len(calls) == 2 and torch.equal(third["w"], first["w"])
    demo_pretrain.cached_state("m", "k2", train)  # another key: another entry
    assert len(calls) == 3


def test_an_unwritable_cache_only_costs_the_reuse(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LORA_PRETRAIN_CACHE", str(blocker / "cache"))
    assert demo_pretrain.cached_state("m", "k", lambda: {"w": torch.ones(2)})["w"].sum() == 2


def test_the_key_changes_with_the_initial_weights():
    a = demo_assets.build_tiny_sd_components(0)
    b = demo_assets.build_tiny_sd_components(1)
    assert demo_pretrain.recipe_key("tiny-sd", {"unet": a["unet"]}) == \
        demo_pretrain.recipe_key("tiny-sd", {"unet": demo_assets.build_tiny_sd_components(0)[
            "unet"]})
    assert demo_pretrain.recipe_key("tiny-sd", {"unet": a["unet"]}) != \
        demo_pretrain.recipe_key("tiny-sd", {"unet": b["unet"]})


@pytest.mark.slow
def test_pretraining_gives_the_same_bytes_twice_on_this_machine(tmp_path):
    from transformers import CLIPTokenizer

    states = []
    for _ in range(2):
        parts = demo_assets.build_tiny_sd_components(0)
        tok_dir = demo_assets.write_clip_tokenizer(tmp_path / "tok")
        tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        demo_pretrain.pretrain_tiny_sd(parts, tok, VOCAB, seed=0, vae_steps=3,
                                       denoiser_steps=3, use_cache=False)
        states.append({f"{p}.{k}": v for p in ("vae", "unet", "text_encoder")
                       for k, v in parts[p].state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    init = demo_assets.build_tiny_sd_components(0)["unet"].state_dict()
    assert any(not torch.equal(init[k], states[0][f"unet.{k}"]) for k in init)


def test_the_pretraining_cache_key_is_the_same_in_every_process(tmp_path):
    """The key once hashed diffusers' ``_use_default_values`` (built from a set, so ordered
    by each process's hash seed): every new process missed the cache and pre-trained again
    (minutes per demo build). Two processes with different hash seeds must agree."""
    import os
    import subprocess
    import sys

    code = ("import sys, pathlib\n"
            "import lora_kernel.training.demo_pretrain as dp\n"
            "def stop(name, key, train):\n"
            "    print(key)\n"
            "    raise SystemExit(0)\n"
            "dp.cached_state = stop\n"
            "from lora_kernel.training.demo_assets import write_tiny_sd\n"
            "write_tiny_sd(pathlib.Path(sys.argv[1]), seed=0)\n")
    keys = set()
    for hash_seed in ("1", "2"):
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert res.returncode == 0, res.stderr[-2000:]
        keys.add(res.stdout.strip().splitlines()[-1])
    assert len(keys) == 1, keys
