"""lora_kernel.training.models: pickles and remote code are refused before anything loads; safe
models load; a single-file checkpoint equals its folder; digests are stable."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kernel.common.errors import ConfigError, UnsafeModelError
from lora_kernel.training import models


class _Payload:
    """Unpickling this object writes a marker file: a stand-in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    return path


def test_the_payload_is_live(tmp_path):
    """Sanity check of the test itself: unpickling the payload does run code."""
    marker = tmp_path / "ran"
    evil = _evil_pickle(tmp_path / "x.bin", marker)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(evil)!r}, "
                    f"'rb'))"], check=True)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "model.pth",
                                  "model.pkl"])
def test_pickle_file_is_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "marker"
    evil = _evil_pickle(tmp_path / name, marker)
    with pytest.raises(UnsafeModelError, match="pickle.*safetensors"):
        models.load_sd_components(evil)
    with pytest.raises(UnsafeModelError):
        models.load_causal_lm(evil)
    assert not marker.exists()


def test_llm_folder_with_only_pytorch_model_bin_is_refused(demo_home, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "llm"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    (folder / "model.safetensors").unlink()
    _evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin"):
        models.load_causal_lm(folder)
    assert not marker.exists()


def test_sd_folder_with_a_pickled_unet_is_refused(demo_home, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "sd"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-sd", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _evil_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelError, match="unet/diffusion_pytorch_model.bin"):
        models.load_sd_components(folder)
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored_never_loaded(demo_home, tmp_path):
    """With a safetensors alternative the folder loads, from safetensors only."""
    marker = tmp_path / "marker"
    folder = tmp_path / "llm"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    _evil_pickle(folder / "pytorch_model.bin", marker)
    model, tok = models.load_causal_lm(folder)
    assert model.config.vocab_size == len(tok)
    assert not marker.exists()


@pytest.mark.parametrize("file,patch", [
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilLM"}}),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tok_evil.Tok", None]}}),
    ("config.json", {"trust_remote_code": True}),
])
def test_remote_code_configs_are_refused(demo_home, tmp_path, file, patch):
    folder = tmp_path / "llm"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    marker = tmp_path / "marker"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    cfg = json.loads((folder / file).read_text())
    cfg.update(patch)
    (folder / file).write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModelError, match="built-in"):
        models.load_causal_lm(folder)
    assert not marker.exists()


def test_custom_pipeline_component_is_refused(demo_home, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-sd", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_unet", "EvilUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeModelError, match="my_unet"):
        models.load_sd_components(folder)


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        models.check_model_path(tmp_path / "nope")


def test_safe_models_load(demo_home):
    sd = models.load_sd_components(demo_home / "demo" / "models" / "tiny-sd")
    assert type(sd.noise_scheduler).__name__ == "DDPMScheduler"
    assert type(sd.sample_scheduler).__name__ == "DDIMScheduler"
    assert sd.tokenizer("a red circle").input_ids[1] != sd.tokenizer.unk_token_id
    assert not sd.unet.training
    model, tok = models.load_causal_lm(demo_home / "demo" / "models" / "tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<pad>"


def _outputs(sd):
    import torch

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = sd.tokenizer(["a red circle in enclave style", "a blue square"], padding="max_length",
                       max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = sd.text_encoder(ids)[0]
        eps = sd.unet(latents, torch.tensor([10, 500]), emb).sample
        img = sd.vae.decode(latents).sample
    return emb, eps, img


def test_single_file_loads_the_same_model_as_the_folder(demo_home):
    import torch

    models_dir = demo_home / "demo" / "models"
    folder = models.load_sd_components(models_dir / "tiny-sd")
    single = models.load_sd_components(models_dir / "tiny-sd.safetensors")
    assert single.config_path == models.bundled_config("tiny-sd")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for x, y in zip(_outputs(folder), _outputs(single), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_single_file_is_in_the_ldm_layout_diffusers_reads(demo_home):
    """diffusers' own from_single_file (config= a local folder, offline) reads our file."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    path = demo_home / "demo" / "models" / "tiny-sd.safetensors"
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(models.bundled_config("tiny-sd")), local_files_only=True)
    ours = models.load_sd_components(path)
    a, b = pipe.unet.state_dict(), ours.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_prefixed_single_file_layout_loads_too(demo_home, tmp_path):
    import torch

    from lora_kernel.training.single_file import write_single_file

    folder = demo_home / "demo" / "models" / "tiny-sd"
    out = write_single_file(folder, tmp_path / "prefixed.safetensors", layout="prefixed")
    a = models.load_sd_components(folder).unet.state_dict()
    b = models.load_sd_components(out).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd15_single_file_without_tokenizer_says_what_to_do(tmp_path):
    import torch
    from safetensors.torch import save_file

    # Only the header matters for detection; a truncated SD1.5-shaped file suffices.
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                   torch.zeros(320, 768)}, str(path))
    assert models.detect_bundled_config(path).name == "sd15"
    with pytest.raises(ConfigError, match="tokenizer"):
        models._find_tokenizer(path, models.bundled_config("sd15"))


def test_unknown_architecture_asks_for_config(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(48, 4, 3, 3)},
              str(path))
    with pytest.raises(ConfigError, match="config="):
        models.load_sd_components(path)


def test_sha256_is_stable_and_tracks_content(demo_home, tmp_path):
    import hashlib

    single = demo_home / "demo" / "models" / "tiny-sd.safetensors"
    assert models.model_sha256(single) == hashlib.sha256(single.read_bytes()).hexdigest()
    folder = tmp_path / "llm"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    first = models.model_sha256(folder)
    assert first == models.model_sha256(folder)
    assert first == models.model_sha256(demo_home / "demo" / "models" / "tiny-llama")
    (folder / "generation_config.json").write_text("{}")
    assert models.model_sha256(folder) != first
