"""SDXL on the tiny SDXL-architecture demo model: it trains (both text encoders too), its
adapters reload in ``StableDiffusionXLPipeline`` in both formats with the trained effect, its
kohya file uses the names A1111 / ComfyUI look up (checked on the full-size SDXL built on the
meta device), the size/crop conditioning is per image and cached."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.training.checks import load_config
from lora_kernel.training.export import read_metadata
from lora_kernel.training.families import family_named
from lora_kernel.training.train import train

SDXL = family_named("sdxl")


def _cfg(demo_home, **changes):
    return load_config(demo_home / "demo" / "sdxl_lora.yaml", changes)


@pytest.fixture(scope="module")
def sdxl_run(demo_home, tmp_path_factory):
    """The demo SDXL config with LoRAs on both text encoders too (alpha != rank)."""
    out = tmp_path_factory.mktemp("sdxl-run")
    cfg = _cfg(demo_home, output_dir=str(out), save_steps=0, train_text_encoder=True,
               text_encoder_lr=5e-3, lora_alpha=4, sample_steps=2)
    return cfg, train(cfg, progress=False, home=demo_home, log=lambda m: None)


@pytest.mark.slow
def test_sdxl_trains_and_records_its_family(sdxl_run):
    cfg, res = sdxl_run
    assert res.steps == cfg.max_train_steps
    assert res.eval_loss_after < 0.85 * res.eval_loss_before, (res.eval_loss_before,
                                                               res.eval_loss_after)
    assert res.model_family == "sdxl"
    summary = json.loads(Path(res.summary_path).read_text())
    assert summary["model_family"] == "sdxl"
    assert Path(res.samples["grid"]).is_file() and res.samples["mean_abs_diff"] > 0.5
    for path in res.adapter_files.values():
        meta = read_metadata(path)
        assert meta["lora_enclave.model_family"] == "sdxl"
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.slow
def test_both_text_encoders_got_a_trained_lora(sdxl_run):
    _, res = sdxl_run
    comps = res.live["components"]
    for te in (comps.text_encoder, comps.text_encoder_2):
        ups = [p for n, p in te.named_parameters() if "lora_B" in n]
        assert ups and all(p.dtype == torch.float32 for p in ups)
        assert max(float(p.detach().abs().max()) for p in ups) > 0  # lora_B starts at zero


@pytest.mark.slow
def test_the_kohya_file_names_sdxl_modules_with_real_alpha(sdxl_run):
    cfg, res = sdxl_run
    kohya = load_file(res.adapter_files["kohya"])
    names = {k.split(".")[0] for k in kohya}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                             "lora_unet_output_blocks_")) for n in unet), sorted(unet)[:3]
    assert all(float(kohya[f"{n}.alpha"]) == cfg.alpha == 4.0 for n in names)


def _outputs(pipe):
    """UNet and both text encoders' outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = pipe.tokenizer(["a red circle in enclave style"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return (pipe.unet(x, torch.tensor([500]), hidden, added_cond_kwargs=cond).sample,
                pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0])


@pytest.mark.slow
def test_both_formats_reload_in_the_sdxl_pipeline_with_the_trained_effect(sdxl_run):
    from diffusers import StableDiffusionXLPipeline
    cfg, res = sdxl_run
    comps = res.live["components"]
    for module in (comps.unet, *comps.text_encoders):
        module.eval()
    trained = _outputs(SDXL.pipeline(comps))
    base = _outputs(StableDiffusionXLPipeline.from_pretrained(cfg.base_model,
                                                              local_files_only=True))
    for ours, theirs in zip(trained, base, strict=True):
        assert (ours - theirs).abs().mean() > 1e-4  # the LoRA changes each part
    for fmt, path in res.adapter_files.items():
        pipe = StableDiffusionXLPipeline.from_pretrained(cfg.base_model, local_files_only=True)
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name,
                               adapter_name="t")
        for part, ours, reloaded in zip(("unet", "te1", "te2"), trained, _outputs(pipe),
                                        strict=True):
            torch.testing.assert_close(reloaded, ours, atol=1e-4, rtol=1e-4,
                                       msg=f"{fmt} {part}")


def test_time_ids_are_each_images_size_crop_and_target():
    from lora_kernel.training.image import Example
    ex = Example(pixels=None, bucket=(64, 48), caption="c", original_size=(200, 100),
                 resized_size=(96, 48), crop_top_left=(0, 10))
    assert SDXL.time_ids(ex, flipped=False).tolist() == [100, 200, 0, 10, 48, 64]
    # flipped: the crop's left edge mirrored in the resized image (96 - 64 - 10)
    assert SDXL.time_ids(ex, flipped=True).tolist() == [100, 200, 0, 22, 48, 64]
    assert family_named("sd15").time_ids(ex, flipped=False) is None


@pytest.mark.slow
def test_the_cache_holds_pooled_embeddings_and_time_ids(demo_home, tmp_path):
    """Random crops + flips + buckets: every cached tensor the loss uses comes back on a
    cache hit, so the second run's losses equal the first's."""
    over = dict(save_steps=0, max_train_steps=2, center_crop=False, random_flip=True,
                enable_bucket=True)
    home = tmp_path / "home"
    first = train(_cfg(demo_home, output_dir=str(tmp_path / "a"), **over), progress=False,
                  home=home, samples=False, log=lambda m: None)
    cached = load_file(str(next((home / "cache").glob("sd-*.safetensors"))))
    n = sum(1 for k in cached if k.startswith("latent."))
    assert n == 24  # the demo images
    for key in ("latent", "latent_flip", "te", "pooled", "time_ids", "time_ids_flip"):
        assert f"{key}.0" in cached and f"{key}.{n - 1}" in cached, key
    assert cached["pooled.0"].shape == (32,) and cached["time_ids.0"].shape == (6,)
    again = train(_cfg(demo_home, output_dir=str(tmp_path / "b"), **over), progress=False,
                  home=home, samples=False, log=lambda m: None)
    assert again.cache_hit and not first.cache_hit
    assert again.losses == first.losses


def test_the_text_encoder_lrs(demo_home):
    from lora_kernel.training.image import text_encoder_lr
    one = _cfg(demo_home, text_encoder_lr=1e-3)
    assert text_encoder_lr(one, "text_encoder_lr") == text_encoder_lr(one,
                                                                      "text_encoder_2_lr") == 1e-3
    two = _cfg(demo_home, text_encoder_lr=1e-3, text_encoder_2_lr=2e-4)
    assert text_encoder_lr(two, "text_encoder_2_lr") == 2e-4
    assert text_encoder_lr(_cfg(demo_home), "text_encoder_2_lr") == _cfg(
        demo_home).learning_rate


def test_the_single_file_is_the_original_layout_and_loads_the_same_model(demo_home):
    from lora_kernel.training.model_safety import read_safetensors_header
    from lora_kernel.training.models import load_sd_components
    models = demo_home / "demo" / "models"
    keys = set(read_safetensors_header(models / "tiny-sdxl.safetensors")) - {"__metadata__"}
    prefixes = {k.split(".")[0] if not k.startswith("conditioner") else
                ".".join(k.split(".")[:3]) for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner.embedders.0",
                        "conditioner.embedders.1"}
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert any(k.endswith(".attn.in_proj_weight") for k in keys)  # OpenCLIP's fused q/k/v
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    folder = load_sd_components(models / "tiny-sdxl")
    single = load_sd_components(models / "tiny-sdxl.safetensors")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part


# -- the full-size SDXL layout, on the meta device -------------------------------------------
@pytest.fixture(scope="module")
def full_sdxl():
    """SDXL base 1.0's UNet and both text encoders (bundled configs, meta device: no memory)
    with LoRAs attached as training attaches them, and the kohya state dict."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_kernel.training.config import DEFAULT_IMAGE_TARGETS
    from lora_kernel.training.export import kohya_state_dict, peft_state_dicts
    from lora_kernel.training.image import TE_TARGETS, attach_text_encoder_lora
    from lora_kernel.training.models import bundled_config

    cfg_dir = bundled_config("sdxl")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            cfg_dir / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"),
                                                           local_files_only=True))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
            str(cfg_dir / "text_encoder_2"), local_files_only=True))
    rank = 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_IMAGE_TARGETS))
    for te in (te1, te2):
        attach_text_encoder_lora(te, LoraConfig(r=rank, lora_alpha=rank,
                                                target_modules=TE_TARGETS))
    unet_sd, te1_sd = peft_state_dicts(unet, te1)
    te2_sd = peft_state_dicts(unet, te2)[1]
    real = lambda sd: {k: torch.zeros(tuple(v.shape)) for k, v in sd.items()}  # noqa: E731
    kohya = kohya_state_dict(real(unet_sd), real(te1_sd), 4.0, te2_sd=real(te2_sd),
                             family=SDXL, unet_config=dict(unet.config))
    return unet, te1, te2, kohya, rank


def _ldm_unet_names(unet) -> set[str]:
    """Every UNet weight's name in SDXL's original single-file layout, as our writer names it
    — and checked against diffusers' own reader, which must map them back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lora_kernel.training.single_file import LDM_UNET, diffusers_to_ldm
    base = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items()
            if ".lora_" not in k}
    ldm = {k: v for k, v in diffusers_to_ldm(base, {}, {}, layers_per_block=2,
                                             num_vae_up_blocks=4).items()
           if k.startswith(LDM_UNET)}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(base)  # diffusers reads our names as the same weights
    return {k[len(LDM_UNET):].removesuffix(".weight").replace(".", "_") for k in ldm}


def test_full_size_sdxl_kohya_keys_name_modules_of_the_sdxl_layout(full_sdxl):
    import re

    from lora_kernel.training.export import kohya_module_names
    unet, te1, te2, kohya, rank = full_sdxl
    names = {k.split(".")[0] for k in kohya}
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    ldm = _ldm_unet_names(unet)
    table = kohya_module_names(unet, family=SDXL)
    for name in unet_names:
        assert name.removeprefix("lora_unet_") in ldm, name
        mod = getattr(table[name], "base_layer", table[name])
        assert isinstance(mod, torch.nn.Linear), name
        assert kohya[f"{name}.lora_down.weight"].shape == (rank, mod.in_features)
        assert kohya[f"{name}.lora_up.weight"].shape == (mod.out_features, rank)
    # 70 transformer blocks (down 2x1 + 2x2... : 4 + 20, mid 10, up 30 + 6) x 2 attentions x 4
    assert len(unet_names) == 560
    te_pattern = re.compile(r"^lora_te([12])_text_model_encoder_layers_(\d+)_self_attn_"
                            r"(q|k|v|out)_proj$")
    for prefix, te, width in (("1", te1, 768), ("2", te2, 1280)):
        te_names = {n for n in names if n.startswith(f"lora_te{prefix}_")}
        layers = te.config.num_hidden_layers
        assert len(te_names) == 4 * layers, prefix  # 12 for CLIP-L, 32 for OpenCLIP-bigG
        root = te.text_model if hasattr(te, "text_model") else te
        for name in te_names:
            m = te_pattern.match(name)
            assert m and m[1] == prefix, name
            mod = root.get_submodule(f"encoder.layers.{m[2]}.self_attn.{m[3]}_proj")
            mod = getattr(mod, "base_layer", mod)
            assert kohya[f"{name}.lora_down.weight"].shape == (rank, mod.in_features) == (
                rank, width)


# -- init: start from an existing LoRA --------------------------------------------------------
@pytest.mark.slow
def test_an_sdxl_lora_as_init_starts_where_it_ended(sdxl_run, demo_home, tmp_path):
    cfg, res = sdxl_run
    again = _cfg(demo_home, output_dir=str(tmp_path), save_steps=0, max_train_steps=1,
                 train_text_encoder=True, text_encoder_lr=5e-3, lora_alpha=4,
                 init=res.adapter_files["diffusers"])
    cont = train(again, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert cont.eval_loss_before == pytest.approx(res.eval_loss_after, rel=1e-5)


@pytest.mark.slow
def test_an_sd15_lora_as_init_for_sdxl_is_refused_naming_the_key(demo_home, tmp_path):
    from lora_kernel.common.errors import ConfigError
    sd15 = load_config(demo_home / "demo" / "image_lora.yaml",
                       {"output_dir": str(tmp_path / "sd15"), "save_steps": 0,
                        "max_train_steps": 1})
    adapter = train(sd15, progress=False, home=demo_home, samples=False,
                    log=lambda m: None).adapter_files
    with pytest.raises(ConfigError, match="is a LoRA for sd15") as info:
        _cfg(demo_home, init=adapter["diffusers"])
    assert info.value.key == "init"
    with pytest.raises(ConfigError, match="kohya-format"):
        _cfg(demo_home, init=adapter["kohya"])
    # the same adapter is a valid init for an SD1.5 run
    assert load_config(demo_home / "demo" / "image_lora.yaml",
                       {"init": adapter["diffusers"]}).init == adapter["diffusers"]
