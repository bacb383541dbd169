"""Model families (lora_kernel.training.families): the family is read from a folder's
``model_index.json`` / configs or a single file's keys before anything loads; families we
do not train are refused naming what was found and what is supported; each family's
interface answers what differs (text encoders, training target, kohya names)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.families import FAMILIES, family_named, family_of
from lora_kernel.training.families.detect import SUPPORTED, detect_family


def _models(demo_home) -> Path:
    return demo_home / "demo" / "models"


def _copy(src: Path, dst: Path, edit: dict[str, dict] | None = None) -> Path:
    """A copy of the diffusers folder ``src`` with JSON files updated (``{rel: changes}``)."""
    shutil.copytree(src, dst)
    for rel, changes in (edit or {}).items():
        data = json.loads((dst / rel).read_text())
        data.update(changes)
        (dst / rel).write_text(json.dumps(data))
    return dst


def _file(tmp_path, keys: dict[str, tuple]) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


def test_every_supported_family_has_a_module():
    assert set(FAMILIES) == set(SUPPORTED) == {"sd15", "sd2", "sdxl", "flux", "sd3"}
    for name, family in FAMILIES.items():
        assert family.name == name and family.text_encoder_parts


@pytest.mark.parametrize("model,family", [("tiny-sd", "sd15"), ("tiny-sd.safetensors", "sd15"),
                                          ("tiny-sdxl", "sdxl"),
                                          ("tiny-sdxl.safetensors", "sdxl")])
def test_the_demo_models_are_detected(demo_home, model, family):
    assert detect_family(_models(demo_home) / model) == family


def test_a_v_prediction_sd_model_is_sd2_and_trains_on_the_velocity(demo_home, tmp_path):
    folder = _copy(_models(demo_home) / "tiny-sd", tmp_path / "sd2",
                   {"scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}})
    family = family_of(folder)
    assert family.name == "sd2" and family.metadata()["ss_base_model_version"] == "sd_v2"
    from lora_kernel.training.models import load_sd_components
    comps = load_sd_components(folder)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    v = family.training_target(comps.noise_scheduler, latents, noise, t)
    torch.testing.assert_close(v, comps.noise_scheduler.get_velocity(latents, noise, t))
    assert not torch.allclose(v, noise)
    # an epsilon model's target is the noise itself
    sd15 = load_sd_components(_models(demo_home) / "tiny-sd")
    assert family_named("sd15").training_target(sd15.noise_scheduler, latents, noise,
                                                t) is noise


@pytest.mark.parametrize("changes,what", [
    ({"model_index.json": {"_class_name": "FluxFillPipeline"}}, "Flux inpainting"),
    ({"model_index.json": {"_class_name": "StableVideoDiffusionPipeline"}}, "video model"),
    ({"model_index.json": {"_class_name": "StableDiffusionXLImg2ImgPipeline",
                           "requires_aesthetics_score": True}}, "SDXL refiner"),
    ({"unet/config.json": {"in_channels": 9}}, "inpainting"),
])
def test_a_folder_of_a_family_not_trained_is_refused_before_loading(demo_home, tmp_path,
                                                                    changes, what):
    folder = _copy(_models(demo_home) / "tiny-sdxl", tmp_path / "m", changes)
    with pytest.raises(ConfigError) as info:
        load_config(demo_home / "demo" / "sdxl_lora.yaml", {"base_model": str(folder)})
    msg = str(info.value)
    assert what in msg and "supported: sd15" in msg and "sdxl" in msg
    assert info.value.key == "base_model"


@pytest.mark.parametrize("keys,what", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
      "conditioner.embedders.0.model.ln_final.weight": (2,)}, "SDXL refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.text_model.x": (2,)}, "inpainting"),
    ({"model.diffusion_model.input_blocks.1.0.time_stack.x": (2,)}, "video model"),
])
def test_a_single_file_of_a_family_not_trained_is_refused(demo_home, tmp_path, keys, what):
    path = _file(tmp_path, keys)
    with pytest.raises(ConfigError, match=what) as info:
        load_config(demo_home / "demo" / "image_lora.yaml", {"base_model": str(path)})
    assert "supported: sd15" in str(info.value)


def test_a_single_file_whose_keys_fit_no_layout_says_so(demo_home, tmp_path):
    path = _file(tmp_path, {"encoder.blocks.0.weight": (2,), "decoder.head.bias": (2,)})
    with pytest.raises(ConfigError, match="fit no known checkpoint layout") as info:
        load_config(demo_home / "demo" / "image_lora.yaml", {"base_model": str(path)})
    assert "'decoder.head.bias'" in str(info.value) and "conditioner.embedders" in str(
        info.value)


def test_validation_records_the_family_and_lora_config_shows_it(demo_home, capsys):
    assert load_config(demo_home / "demo" / "sdxl_lora.yaml").model_family == "sdxl"
    assert load_config(demo_home / "demo" / "image_lora.yaml").model_family == "sd15"
    from lora_kernel.cli import main as cli
    assert cli.main(["config", str(demo_home / "demo" / "sdxl_lora.yaml")]) == 0
    assert "model family: sdxl (Stable Diffusion XL (base))" in capsys.readouterr().out


def test_a_second_text_encoder_lr_needs_a_second_text_encoder(demo_home):
    cfg = load_config(demo_home / "demo" / "sdxl_lora.yaml", {"text_encoder_2_lr": 1e-4})
    assert cfg.text_encoder_2_lr == 1e-4
    with pytest.raises(ConfigError, match="no encoder for text_encoder_2_lr") as info:
        load_config(demo_home / "demo" / "image_lora.yaml", {"text_encoder_2_lr": 1e-4})
    assert info.value.key == "text_encoder_2_lr"


def test_sdxl_below_its_native_resolution_warns(demo_home, tmp_path):
    """A model whose UNet says 1024 px (SDXL's sample_size 128) trained at 512 warns; at
    1024 it does not; the tiny demo SDXL (64 px) at its own 64 does not."""
    folder = _copy(_models(demo_home) / "tiny-sdxl", tmp_path / "xl",
                   {"unet/config.json": {"sample_size": 128}})
    cfg = load_config(demo_home / "demo" / "sdxl_lora.yaml",
                      {"base_model": str(folder), "resolution": 512})
    assert any("trained at 1024 px" in w and "resolution 512" in w
               for w in cfg.model_warnings), cfg.model_warnings
    assert not load_config(demo_home / "demo" / "sdxl_lora.yaml",
                           {"base_model": str(folder), "resolution": 1024}).model_warnings
    assert not load_config(demo_home / "demo" / "sdxl_lora.yaml").model_warnings
