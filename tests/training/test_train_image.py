"""Image LoRA training on the tiny generated SD model: it learns, it changes images, it
exports in diffusers and kohya formats that diffusers' own loader reloads with the same
effect, and its caches are reused."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.training.checks import load_config
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


# -- kohya names in the SD1.5 layout AUTOMATIC1111 and ComfyUI use ----------------------------
TE_KOHYA = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_"
                      r"(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
UNET_KOHYA = re.compile(r"^lora_unet_(down_blocks_\d+_attentions_\d+|mid_block_attentions_0|"
                        r"up_blocks_\d+_attentions_\d+)_transformer_blocks_\d+_attn[12]_"
                        r"(to_q|to_k|to_v|to_out_0)$")


def _a1111_compvis(name: str) -> str:
    """AUTOMATIC1111's ``convert_diffusers_name_to_compvis`` for SD1.x attention modules:
    the LDM module name (underscored) a ``lora_unet_`` / ``lora_te_`` name is looked up as."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    m = re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_middle_block_1_{m[2]}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    raise AssertionError(f"A1111 cannot place {name}")


@pytest.fixture(scope="module")
def sd15_lora():
    """SD1.5-shaped UNet and CLIP text encoder (bundled configs, meta device: no memory) with
    LoRAs attached as training attaches them, and their kohya state dict."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_kernel.training.config import DEFAULT_IMAGE_TARGETS
    from lora_kernel.training.export import kohya_state_dict, peft_state_dicts
    from lora_kernel.training.image import TE_TARGETS, attach_text_encoder_lora
    from lora_kernel.training.models import bundled_config

    cfg_dir = bundled_config("sd15")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            cfg_dir / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"),
                                                          local_files_only=True))
    rank = 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_IMAGE_TARGETS))
    attach_text_encoder_lora(te, LoraConfig(r=rank, lora_alpha=rank, target_modules=TE_TARGETS))
    unet_sd, te_sd = peft_state_dicts(unet, te)
    assert te_sd, "the text encoder's LoRA is not seen by the exporter"
    real = {k: torch.zeros(tuple(v.shape)) for k, v in {**unet_sd, **te_sd}.items()}
    kohya = kohya_state_dict({k: real[k] for k in unet_sd}, {k: real[k] for k in te_sd}, 4.0)
    return unet, te, kohya, rank


def _ldm_linear_names(unet, te) -> set[str]:
    """Underscored module names of every Linear in the classic SD1.5 (LDM) checkpoint layout:
    the names clients match kohya keys against."""
    from lora_kernel.training.single_file import unet_key_to_ldm

    def linear(model):  # base names (peft moves an adapted Linear to <name>.base_layer)
        return [n.removesuffix(".base_layer") for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".lora_" not in n]

    names = set()
    for name in linear(unet):
        ldm = unet_key_to_ldm(name + ".weight", unet.config.layers_per_block)
        names.add("diffusion_model_" + ldm.removesuffix(".weight").replace(".", "_"))
    for name in linear(te):
        classic = "text_model." + name.removeprefix("text_model.")  # every SD1.x file
        names.add("transformer_" + classic.replace(".", "_"))
    return names


def test_sd15_kohya_names_are_the_ones_a1111_and_comfyui_load(sd15_lora):
    unet, te, kohya, rank = sd15_lora
    names = {k.split(".")[0] for k in kohya}
    te_names = {n for n in names if n.startswith("lora_te_")}
    unet_names = names - te_names
    assert all(TE_KOHYA.match(n) for n in te_names), sorted(te_names)[:5]
    assert all(UNET_KOHYA.match(n) for n in unet_names), sorted(unet_names)[:5]
    layers = te.config.num_hidden_layers
    assert {int(TE_KOHYA.match(n)[1]) for n in te_names} == set(range(layers))
    assert len(te_names) == 4 * layers  # q, k, v, out of every layer
    # every name lands on a Linear of the SD1.5 layout, with matching shapes
    ldm = _ldm_linear_names(unet, te)
    te_root = te.text_model if hasattr(te, "text_model") else te
    for name in names:
        assert _a1111_compvis(name) in ldm, name
        if name in te_names:
            m = TE_KOHYA.match(name)
            leaf = (f"self_attn.{m[3]}_proj" if m[3] else f"mlp.{m[2].split('_')[1]}")
            mod = te_root.get_submodule(f"encoder.layers.{m[1]}.{leaf}")
        else:
            mod = kohya_module_names(unet)[name]
        mod = getattr(mod, "base_layer", mod)  # peft wraps the Linear it adapts
        assert isinstance(mod, torch.nn.Linear), name
        assert kohya[f"{name}.lora_down.weight"].shape == (rank, mod.in_features)
        assert kohya[f"{name}.lora_up.weight"].shape == (mod.out_features, rank)
    expected = sum(1 for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".lora_" not in n
                   and n.removesuffix(".base_layer").endswith((".to_q", ".to_k", ".to_v",
                                                               ".to_out.0")))
    assert len(unet_names) == expected == 128  # 16 transformer blocks x 2 attentions x 4
    # the exporter's own name table agrees for the text encoder
    te_table = kohya_module_names(te, "lora_te")
    assert te_names <= set(te_table)


# -- train_text_encoder: true, end to end ------------------------------------------------------
@pytest.fixture(scope="module")
def te_run(demo_home, tmp_path_factory):
    """A few steps with a LoRA on the text encoder too."""
    out = tmp_path_factory.mktemp("te-run")
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(out), "save_steps": 0, "max_train_steps": 6,
                       "train_text_encoder": True, "text_encoder_lr": 5e-3, "lora_alpha": 4})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    return cfg, res


def _te_out(te, tokenizer):
    ids = tokenizer(["a red circle in enclave style"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids)[0]


def test_text_encoder_lora_trains_and_reloads_in_both_formats(te_run):
    from diffusers import StableDiffusionPipeline
    cfg, res = te_run
    comps = res.live["components"]
    comps.text_encoder.eval()
    trained = _te_out(comps.text_encoder, comps.tokenizer)
    kohya = load_file(res.adapter_files["kohya"])
    te_names = {k.split(".")[0] for k in kohya if k.startswith("lora_te_")}
    assert te_names and all(TE_KOHYA.match(n) for n in te_names)
    assert any(k.startswith("text_encoder.") for k in load_file(res.adapter_files["diffusers"]))
    for path in res.adapter_files.values():  # no local path in the headers
        assert str(Path(cfg.base_model).parent) not in json.dumps(read_metadata(path))
    kw = dict(local_files_only=True, use_safetensors=True, safety_checker=None)
    base = _te_out(StableDiffusionPipeline.from_pretrained(cfg.base_model, **kw).text_encoder,
                   comps.tokenizer)
    assert (trained - base).abs().mean() > 1e-5  # the text encoder's LoRA learned something
    for fmt in ("diffusers", "kohya"):
        pipe = StableDiffusionPipeline.from_pretrained(cfg.base_model, **kw)
        path = res.adapter_files[fmt]
        pipe.load_lora_weights(str(path.rsplit("/", 1)[0]), weight_name=path.rsplit("/", 1)[1],
                               adapter_name="t")
        torch.testing.assert_close(_te_out(pipe.text_encoder, comps.tokenizer), trained,
                                   atol=1e-5, rtol=1e-4, msg=fmt)
