"""Image LoRA training on the tiny generated SD model: it learns, it changes images, it
exports in diffusers and kohya formats that diffusers' own loader reloads with the same
effect, and its caches are reused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.training.config import load_config
from lora_kernel.training.export import kohya_module_names, read_metadata
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_run(demo_home, tmp_path_factory):
    """One short image training run on the demo set (shared by this module's tests)."""
    out = tmp_path_factory.mktemp("image-run")
    # alpha != rank, so a format that dropped the real alpha would scale differently.
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(out), "save_steps": 0, "lora_alpha": 4})
    res = train(cfg, progress=False, home=demo_home, log=lambda m: None)
    return cfg, res


def test_training_lowers_the_loss_by_a_clear_margin(image_run):
    cfg, res = image_run
    assert res.steps == cfg.max_train_steps
    assert res.eval_loss_after < 0.85 * res.eval_loss_before, (
        res.eval_loss_before, res.eval_loss_after)
    assert res.final_loss < res.first_loss


def test_the_lora_changes_generated_images(image_run):
    _, res = image_run
    grid = res.samples["grid"]
    assert grid.endswith("grid.png")
    assert res.samples["mean_abs_diff"] > 2.0  # out of 255


def test_metadata_records_config_model_dataset_version_not_paths(image_run):
    cfg, res = image_run
    for path in res.adapter_files.values():
        meta = read_metadata(path)
        assert meta["lora_enclave.base_model_sha256"] == res.base_model_sha256
        assert meta["lora_enclave.dataset_version"] == res.dataset_version
        assert meta["lora_enclave.version"]
        conf = json.loads(meta["lora_enclave.config"])
        assert conf["lora_rank"] == cfg.lora_rank
        assert "train_data_dir" not in conf and "metadata_path" not in conf
        assert cfg.train_data_dir not in json.dumps(meta)
        assert float(meta["ss_network_alpha"]) == cfg.alpha


def test_dataset_paths_are_recorded_only_when_opted_in(demo_home, tmp_path):
    from lora_kernel.training.data import dataset_digests
    from lora_kernel.training.export import adapter_metadata
    cfg = load_config(demo_home / "demo" / "image_lora.yaml", {"record_dataset_paths": True})
    meta = adapter_metadata(cfg, base_model_sha256="0" * 64, dataset_version="ds-x",
                            dataset_digests=dataset_digests(cfg))
    assert "metadata.csv" in meta["lora_enclave.dataset_files"]
    assert cfg.train_data_dir in meta["lora_enclave.config"]


def test_every_kohya_key_maps_to_a_lora_module_with_real_alpha(image_run, demo_home):
    from lora_kernel.training.models import load_sd_components
    cfg, res = image_run
    kohya = load_file(res.adapter_files["kohya"])
    unet = load_sd_components(cfg.base_model).unet
    modules = kohya_module_names(unet)
    names = {k.split(".")[0] for k in kohya}
    assert names and all(n.startswith("lora_unet_") for n in names)
    for name in names:
        mod = modules.get(name)
        assert isinstance(mod, torch.nn.Linear), name
        assert any(name.endswith(t.replace(".", "_")) for t in cfg.targets)
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert down.shape == (cfg.lora_rank, mod.in_features)
        assert up.shape == (mod.out_features, cfg.lora_rank)
        assert float(kohya[f"{name}.alpha"]) == cfg.alpha
    expected = sum(1 for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(
                       n.endswith("." + t) for t in cfg.targets))
    assert len(names) == expected


def _unet_out(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    x = torch.randn(1, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx).sample


def test_both_formats_reload_in_diffusers_with_the_same_effect(image_run):
    from diffusers import StableDiffusionPipeline
    cfg, res = image_run
    base = StableDiffusionPipeline.from_pretrained(cfg.base_model, local_files_only=True,
                                                   use_safetensors=True, safety_checker=None)
    ref = _unet_out(base.unet)
    outs = {}
    for fmt in ("diffusers", "kohya"):
        pipe = StableDiffusionPipeline.from_pretrained(cfg.base_model, local_files_only=True,
                                                       use_safetensors=True,
                                                       safety_checker=None)
        path = res.adapter_files[fmt]
        pipe.load_lora_weights(str(path.rsplit("/", 1)[0]), weight_name=path.rsplit("/", 1)[1],
                               adapter_name="t")
        outs[fmt] = _unet_out(pipe.unet)
    # The LoRA changes the UNet's output, and both formats change it identically.
    assert (outs["diffusers"] - ref).abs().mean() > 1e-4
    torch.testing.assert_close(outs["diffusers"], outs["kohya"], atol=1e-5, rtol=1e-4)


def test_second_run_reuses_the_latent_cache_with_the_same_result(image_run, demo_home,
                                                                  tmp_path):
    cfg, first = image_run
    again = load_config(demo_home / "demo" / "image_lora.yaml",
                        {"output_dir": str(tmp_path), "save_steps": 0, "lora_alpha": 4})
    res = train(again, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert res.cache_hit
    a = load_file(first.adapter_files["diffusers"])
    b = load_file(res.adapter_files["diffusers"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
