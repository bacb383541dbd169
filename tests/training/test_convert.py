"""``lora convert`` (lora_kernel.training.convert): kohya <-> diffusers <-> PEFT for an SD1.5
LoRA with a text encoder; each output applies the same update, the diffusers -> kohya result
equals the exporter's own kohya file, and the output is a sealed derived record."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.convert import convert_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(demo_home, tmp_path_factory):
    """A 2-step demo LoRA on UNet and text encoder (alpha 4, rank 8: scale 0.5)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    out = tmp_path_factory.mktemp("convert")
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(out), "max_train_steps": 2, "save_steps": 0,
                       "train_text_encoder": True, "lora_alpha": 4})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    return cfg, res.adapter_files


def _unet_out(model, path=None):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                   safety_checker=None)
    if path is not None:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    g = torch.Generator().manual_seed(0)
    c = pipe.unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(1, 77, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), ctx).sample


def test_kohya_to_diffusers_applies_the_same_update(trained, tmp_path):
    from pathlib import Path
    cfg, files = trained
    kohya = Path(files["kohya"])
    out = tmp_path / "from_kohya.safetensors"
    info = convert_lora(kohya, out, "diffusers")
    assert info["from"] == "kohya" and info["modules"] > 0
    converted, exported = load_file(str(out)), load_file(files["diffusers"])
    assert converted.keys() == exported.keys()  # text encoder included, same names
    for key, tensor in exported.items():  # alpha / rank = 0.5 baked into the up weights
        up = ".lora_B." in key or "lora_linear_layer.up" in key
        torch.testing.assert_close(converted[key], tensor * (0.5 if up else 1.0))
    base = _unet_out(cfg.base_model)
    direct, converted = _unet_out(cfg.base_model, kohya), _unet_out(cfg.base_model, out)
    assert (direct - base).abs().mean() > 1e-6
    torch.testing.assert_close(converted, direct, atol=1e-5, rtol=1e-4)


def test_diffusers_to_kohya_equals_the_exporters_kohya_file(trained, tmp_path):
    from pathlib import Path
    _, files = trained
    out = tmp_path / "x_kohya.safetensors"
    convert_lora(Path(files["diffusers"]), out, "kohya")
    mine, theirs = load_file(str(out)), load_file(files["kohya"])
    assert mine.keys() == theirs.keys()
    for key in mine:  # alpha baked: up * alpha / rank at alpha = rank
        if key.endswith(".lora_up.weight"):
            stem = key[:-len(".lora_up.weight")]
            scale = float(theirs[stem + ".alpha"]) / theirs[stem + ".lora_down.weight"].shape[0]
            torch.testing.assert_close(mine[key], theirs[key] * scale)
        elif key.endswith(".lora_down.weight"):
            assert torch.equal(mine[key], theirs[key])


def test_peft_holds_a_unet_lora_only(trained, tmp_path):
    from pathlib import Path
    _, files = trained
    with pytest.raises(ConfigError, match="text-encoder LoRA weights"):
        convert_lora(Path(files["diffusers"]), tmp_path / "peft", "peft")
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(files["kohya"]).items()
               if k.startswith("lora_unet_")}, str(unet_only))
    convert_lora(unet_only, tmp_path / "peft", "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    convert_lora(tmp_path / "peft", tmp_path / "back_kohya.safetensors", "kohya")
    back, src = load_file(str(tmp_path / "back_kohya.safetensors")), load_file(str(unet_only))
    assert back.keys() == src.keys()


def test_lora_convert_seals_a_derived_record(trained, tmp_path, state_tmp, capsys):
    from lora_kernel.cli import main as cli
    from lora_kernel.provenance.records import load_manifest, summary, verify_record
    _, files = trained
    assert cli.main(["convert", files["kohya"], "--to", "diffusers",
                     "-o", str(tmp_path / "c.safetensors")]) == 0
    record = next(p for p in (state_tmp / "runs").iterdir() if p.name != ".staging")
    assert verify_record(record) == []
    s = summary(load_manifest(record))
    assert s["kind"] == "derived" and s["adapter_files"] == ["adapter/enclave_style.safetensors"]


def test_init_from_a_kohya_file_equals_init_from_its_diffusers_twin(trained, demo_home,
                                                                    tmp_path, capsys):
    """kohya's network_weights (our init): a run started from the kohya file
    trains exactly as one started from the diffusers file exported beside it."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    _, files = trained
    out = {}
    for fmt, key in (("diffusers", "init"), ("kohya", "network_weights")):
        cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                          {"output_dir": str(tmp_path / fmt), "max_train_steps": 1,
                           "save_steps": 0, "train_text_encoder": True, "lora_alpha": 4,
                           key: files[fmt]})
        assert cfg.init == files[fmt]
        out[fmt] = train(cfg, progress=False, home=demo_home, samples=False,
                         log=lambda m: None)
    a, b = (load_file(out[f].adapter_files["diffusers"]) for f in ("diffusers", "kohya"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert out["kohya"].losses == pytest.approx(out["diffusers"].losses, abs=1e-6)
    from lora_kernel.training.checks import load_config as again
    with pytest.raises(ConfigError, match="rank"):
        again(demo_home / "demo" / "image_lora.yaml",
              {"output_dir": str(tmp_path / "x"), "lora_rank": 4, "init": files["kohya"]})
