"""Flux.1 and SD3.5 on the tiny demo models of their architectures: the flow-matching
objective (timestep sampling, shift, weighting, velocity target, Flux's packed latents and
guidance), training that lowers the loss, adapters that reload in ``FluxPipeline`` /
``StableDiffusion3Pipeline`` with the trained effect, the kohya Flux file in Black Forest
Labs' layout (fused q/k/v; checked against the full-size Flux built on the meta device and
diffusers' own kohya converter), and the refusals of settings the model cannot take."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.export import read_metadata
from lora_kernel.training.families import family_named, family_of
from lora_kernel.training.families.base import NoisyBatch, PromptEmbeds
from lora_kernel.training.families.flow import loss_weights, sample_t
from lora_kernel.training.flux_layout import bfl_target, fused_sizes, to_bfl_state_dict
from lora_kernel.training.train import train

FLUX, SD3 = family_named("flux"), family_named("sd3")
# Flux.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FAST = dict(save_steps=0, max_train_steps=24, learning_rate=5e-3, sample_steps=2,
            train_text_encoder=True, lora_alpha=4)


def _cfg(demo_home, name, **changes):
    return load_config(demo_home / "demo" / f"{name}_lora.yaml", changes)


@pytest.fixture(scope="module")
def flux_run(demo_home, tmp_path_factory):
    cfg = _cfg(demo_home, "flux", output_dir=str(tmp_path_factory.mktemp("flux")), **FAST)
    return cfg, train(cfg, progress=False, home=demo_home, log=lambda m: None)


@pytest.fixture(scope="module")
def sd3_run(demo_home, tmp_path_factory):
    cfg = _cfg(demo_home, "sd3", output_dir=str(tmp_path_factory.mktemp("sd3")), **FAST)
    return cfg, train(cfg, progress=False, home=demo_home, log=lambda m: None)


# -- the objective ---------------------------------------------------------------------
def test_timestep_sampling_modes_and_the_shift():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = dict(sigmoid_scale=1.0, discrete_flow_shift=3.0)
    draws = {m: sample_t(SimpleNamespace(timestep_sampling=m, **base), 4000, gen())
             for m in ("uniform", "sigmoid", "logit_normal", "shift")}
    for mode, t in draws.items():
        assert 0 < float(t.min()) and float(t.max()) < 1, mode
    assert abs(float(draws["uniform"].mean()) - 0.5) < 0.02
    assert abs(float(draws["sigmoid"].median()) - 0.5) < 0.03  # symmetric about 1/2
    s = draws["sigmoid"]
    torch.testing.assert_close(draws["shift"], 3 * s / (1 + 2 * s))  # towards noise
    assert float(draws["shift"].mean()) > float(s.mean()) + 0.1
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(loss_weights("sigma_sqrt", t), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(loss_weights("cosmap", t),
                               2 / (torch.pi * (1 - 2 * t + 2 * t ** 2)))
    assert loss_weights("none", t).tolist() == [1.0, 1.0]


def test_the_target_is_the_velocity_and_flux_packs_as_its_pipeline(demo_home):
    from diffusers import FluxPipeline
    cfg = _cfg(demo_home, "flux", timestep_sampling="uniform", weighting_scheme="cosmap")
    latents = torch.randn(2, 16, 8, 8)
    gen = torch.Generator().manual_seed(1)
    batch = FLUX.noisy_batch(cfg, None, latents, gen)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.rand(2, generator=gen)
    torch.testing.assert_close(batch.target, noise - latents)
    torch.testing.assert_close(batch.noisy, (1 - t.view(-1, 1, 1, 1)) * latents
                               + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(batch.timesteps, 1000 * t)
    torch.testing.assert_close(batch.weights, loss_weights("cosmap", t))
    # the transformer sees FluxPipeline's packing and ids; its output is unpacked back
    seen = {}

    def transformer(**kw):
        seen.update(kw)
        return (kw["hidden_states"] * 2,)
    transformer.config = SimpleNamespace(guidance_embeds=True)
    embeds = PromptEmbeds(hidden=torch.randn(2, 5, 32), pooled=torch.randn(2, 32))
    out = FLUX.predict(SimpleNamespace(unet=transformer), batch, embeds, None)
    torch.testing.assert_close(seen["hidden_states"],
                               FluxPipeline._pack_latents(batch.noisy, 2, 16, 8, 8))
    torch.testing.assert_close(seen["img_ids"],
                               FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                      torch.float32))
    assert seen["txt_ids"].shape == (5, 3) and not seen["txt_ids"].any()
    assert seen["guidance"].tolist() == [cfg.guidance_scale] * 2
    torch.testing.assert_close(out, batch.noisy * 2)


# -- detection and refusals --------------------------------------------------------------
def test_the_demo_models_are_flux_and_sd3_and_lora_config_says_so(demo_home):
    models = demo_home / "demo" / "models"
    assert family_of(models / "tiny-flux") is FLUX and family_of(models / "tiny-sd3") is SD3
    assert _cfg(demo_home, "flux").model_family == "flux"
    assert _cfg(demo_home, "sd3").model_family == "sd3"


def _schnell(demo_home, tmp_path) -> Path:
    folder = tmp_path / "tiny-schnell"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-flux", folder)
    conf = folder / "transformer" / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "guidance_embeds": False}))
    return folder


@pytest.mark.parametrize("name,changes,key,says", [
    ("flux", {"resolution": 72}, "resolution", "resolution: 64 (or 80)"),
    ("flux", {"enable_bucket": True}, "enable_bucket", "enable_bucket: false"),
    ("sd3", {"guidance_scale": 3.5}, "guidance_scale", "remove guidance_scale"),
    ("sdxl", {"quantization": "nf4"}, "quantization", "quantization: none"),
    ("sdxl", {"guidance_scale": 1.0}, "guidance_scale", "remove guidance_scale"),
    ("flux", {"timestep_sampling": "cosine"}, "timestep_sampling", "uniform, sigmoid"),
])
def test_settings_the_model_cannot_take_are_refused(demo_home, name, changes, key, says):
    with pytest.raises(ConfigError) as info:
        _cfg(demo_home, name, **changes)
    assert info.value.key == key and says in str(info.value)


def test_schnell_refuses_guidance_scale_and_trains_without_it(demo_home, tmp_path):
    folder = _schnell(demo_home, tmp_path)
    with pytest.raises(ConfigError, match="schnell") as info:
        _cfg(demo_home, "flux", base_model=str(folder))
    assert info.value.key == "guidance_scale" and "remove guidance_scale" in str(info.value)
    # must work: the same model without guidance_scale, dev with it, at a multiple of 16
    assert _cfg(demo_home, "flux", base_model=str(folder), guidance_scale=None).model_family \
        == "flux"
    assert _cfg(demo_home, "flux", resolution=80).resolution == 80


# -- training and reloading ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("run,family", [("flux_run", FLUX), ("sd3_run", SD3)])
def test_it_trains_and_records_its_family(run, family, request):
    cfg, res = request.getfixturevalue(run)
    assert res.steps == cfg.max_train_steps
    # flow matching keeps a large irreducible loss (the noise part of the velocity)
    assert res.eval_loss_after < 0.9 * res.eval_loss_before, (res.eval_loss_before,
                                                               res.eval_loss_after)
    assert res.model_family == family.name
    assert json.loads(Path(res.summary_path).read_text())["model_family"] == family.name
    assert Path(res.samples["grid"]).is_file() and res.samples["mean_abs_diff"] > 0.5
    for path in res.adapter_files.values():
        meta = read_metadata(path)
        assert meta["lora_enclave.model_family"] == family.name
        assert meta["ss_base_model_version"] == family.kohya_base_version
        assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    comps = res.live["components"]
    trained = [te for p, te in zip(family.text_encoder_parts, comps.text_encoders,
                                   strict=True) if p.trainable]
    assert len(trained) == len(comps.text_encoders) - 1  # T5 stays frozen and cached
    assert not getattr(comps.text_encoders[-1], "peft_config", None)
    for te in trained:
        assert max(float(p.detach().abs().max()) for n, p in te.named_parameters()
                   if "lora_B" in n) > 0


def _outputs(family, pipe):
    """The transformer's and the CLIP encoders' outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=gen)
    batch = NoisyBatch(noisy=latents, timesteps=torch.tensor([500.0]), target=latents,
                       extra={"guidance": 1.0})
    width = 32 + 32 if family is SD3 else 32
    embeds = PromptEmbeds(hidden=torch.randn(1, width, 32, generator=gen),
                          pooled=torch.randn(1, 32, generator=gen))
    ids = pipe.tokenizer(["a red circle in enclave style"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    clips = [pipe.text_encoder] + ([pipe.text_encoder_2] if family is SD3 else [])
    with torch.no_grad():
        return [family.predict(SimpleNamespace(unet=pipe.transformer), batch, embeds, None),
                *(te(ids)[0] for te in clips)]


@pytest.mark.slow
@pytest.mark.parametrize("run,family", [("flux_run", FLUX), ("sd3_run", SD3)])
def test_the_diffusers_file_reloads_in_the_pipeline_with_the_trained_effect(run, family,
                                                                            request):
    import diffusers
    cfg, res = request.getfixturevalue(run)
    comps = res.live["components"]
    for module in (comps.unet, *comps.text_encoders):
        module.eval()
    cls = getattr(diffusers, family.pipeline_class)
    trained = _outputs(family, family.pipeline(comps))
    base = _outputs(family, cls.from_pretrained(cfg.base_model, local_files_only=True))
    for ours, theirs in zip(trained, base, strict=True):
        assert (ours - theirs).abs().mean() > 1e-4  # the LoRA changes each part
    path = Path(res.adapter_files["diffusers"])
    pipe = cls.from_pretrained(cfg.base_model, local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="t")
    for i, (ours, reloaded) in enumerate(zip(trained, _outputs(family, pipe), strict=True)):
        torch.testing.assert_close(reloaded, ours, atol=1e-4, rtol=1e-4, msg=f"part {i}")


def _deltas(sd: dict, alpha: float) -> dict:
    """``{module: scale x B @ A}`` of a diffusers-format (peft-named) LoRA state dict."""
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            a, b = sd[key], sd[f"{module}.lora_B.weight"]
            out[module] = (b.float() @ a.float()) * alpha / a.shape[0]
    return out


def _kohya_deltas(kohya: dict, prefix: str = "lora_unet_") -> dict:
    out = {}
    for key in kohya:
        if key.startswith(prefix) and key.endswith(".lora_down.weight"):
            name = key[:-len(".lora_down.weight")]
            down, up = kohya[key].float(), kohya[f"{name}.lora_up.weight"].float()
            out[name[len(prefix):]] = up @ down * float(kohya[f"{name}.alpha"]) / down.shape[0]
    return out


def _fused(deltas: dict, config) -> dict:
    """The per-module deltas placed into Black Forest Labs' fused modules."""
    out: dict = {}
    for module, delta in deltas.items():
        name, index, kind = bfl_target(module.removeprefix("transformer."))
        key = name.replace(".", "_")
        if not kind:
            if name == "final_layer.adaLN_modulation.1":
                delta = torch.cat(delta.chunk(2)[::-1])
            out[key] = delta
            continue
        sizes = fused_sizes(kind, config)
        if key not in out:
            out[key] = torch.zeros(sum(sizes), delta.shape[1])
        row = sum(sizes[:index])
        out[key][row:row + sizes[index]] = delta
    return out


@pytest.mark.slow
def test_the_kohya_flux_file_holds_the_same_weights_in_the_original_layout(flux_run):
    cfg, res = flux_run
    kohya = load_file(res.adapter_files["kohya"])
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1"}
    unet = {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    assert unet and all(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
                        for n in unet), sorted(unet)[:3]
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_1_linear1"} <= unet
    diffusers_sd = load_file(res.adapter_files["diffusers"])
    tr = {k: v for k, v in diffusers_sd.items() if k.startswith("transformer.")}
    config = dict(res.live["components"].unet.config)
    expected = _fused(_deltas(tr, cfg.alpha), config)
    got = _kohya_deltas(kohya)
    assert set(got) == set(expected)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    te = {k[len("text_encoder."):].replace(".lora_linear_layer.down.", ".lora_A.")
          .replace(".lora_linear_layer.up.", ".lora_B."): v
          for k, v in diffusers_sd.items() if k.startswith("text_encoder.")}
    te_got = _kohya_deltas(kohya, "lora_te1_text_model_")
    te_expected = {k.replace(".", "_"): v for k, v in _deltas(te, cfg.alpha).items()}
    assert te_got.keys() == te_expected.keys() and te_got
    for name in te_got:
        torch.testing.assert_close(te_got[name], te_expected[name], msg=name)


@pytest.fixture(scope="module")
def flux_dev_meta():
    """Flux.1-dev's full-size transformer on the meta device (no memory, no weights)."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV)


def test_the_original_layout_is_the_one_diffusers_converts_from(flux_dev_meta):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    sd = flux_dev_meta.state_dict()
    bfl = to_bfl_state_dict(sd, dict(flux_dev_meta.config))
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and "single_blocks.37.linear1.weight" \
        in bfl and bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape)
                                                           for k, v in sd.items()}


def test_every_kohya_key_maps_onto_the_full_size_flux_layout(flux_dev_meta):
    """A rank-4 LoRA on every Linear the default and the demo targets reach (and on the
    embedders and the final layer) of the full-size Flux.1-dev: each exported
    ``lora_unet_<name>`` is a Linear ``<name>.weight`` of BFL's layout with matching shapes,
    and diffusers' own kohya converter reads the file back into the same weights."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    config = dict(flux_dev_meta.config)
    bfl = {k: tuple(v.shape) for k, v in to_bfl_state_dict(flux_dev_meta.state_dict(),
                                                           config).items()}
    gen = torch.Generator().manual_seed(0)
    peft_sd = {}
    for name, module in flux_dev_meta.named_modules():
        if isinstance(module, torch.nn.Linear) and bfl_target(name) is not None:
            peft_sd[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features,
                                                           generator=gen) * 0.01
            peft_sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4,
                                                           generator=gen) * 0.01
    assert len(peft_sd) == 2 * (19 * 14 + 38 * 6 + 10)  # every Linear of the transformer
    kohya = FLUX.kohya_state_dict(peft_sd, 4.0, config)
    names = {k.split(".")[0] for k in kohya}
    for name in names:
        module = name[len("lora_unet_"):]
        weight = next((k for k in bfl if k.replace(".", "_") == module + "_weight"), None)
        assert weight is not None, name
        out_f, in_f = bfl[weight]
        assert kohya[f"{name}.lora_down.weight"].shape[1] == in_f, name
        assert kohya[f"{name}.lora_up.weight"].shape[0] == out_f, name
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert {k.removeprefix("transformer.") for k in converted} == set(peft_sd)
    for module in ("transformer_blocks.3.attn.add_v_proj", "transformer_blocks.0.attn.to_q",
                   "single_transformer_blocks.9.proj_mlp", "single_transformer_blocks.0.attn.to_k",
                   "norm_out.linear", "time_text_embed.guidance_embedder.linear_2"):
        want = _deltas({k: v for k, v in peft_sd.items() if k.startswith(module + ".lora")}, 4.0)
        # diffusers folds alpha / rank (the fused rank 3r, 4r) into lora_A: scale 1 here
        got = {k.removeprefix("transformer."): v for k, v in converted.items()
               if k.removeprefix("transformer.").startswith(f"{module}.lora")}
        a, b = got[f"{module}.lora_A.weight"], got[f"{module}.lora_B.weight"]
        torch.testing.assert_close(b @ a, want[module], atol=1e-7, rtol=1e-4, msg=module)


# -- memory -----------------------------------------------------------------------------------
def _sparse_safetensors(path: Path, shapes: dict) -> None:
    """A bf16 ``.safetensors`` of ``shapes`` whose data is a hole (a sparse file: the header
    is real, the bytes take no disk)."""
    import struct
    header, offset = {}, 0
    for name in sorted(shapes):
        n = 2
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def full_size_flux(tmp_path_factory, flux_dev_meta):
    """Flux.1-dev's diffusers folder at full size with sparse weights: configs and real
    safetensors headers (11.9B transformer, T5-XXL, CLIP-L, the 16-channel VAE)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    folder = tmp_path_factory.mktemp("flux-dev-sparse") / "FLUX.1-dev"
    with torch.device("meta"):
        parts = {
            "transformer": flux_dev_meta,
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12,
                                                         intermediate_size=3072)),
            "text_encoder_2": T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
            "vae": AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                 use_quant_conv=False, use_post_quant_conv=False),
        }
    for name, model in parts.items():
        weights = "model" if name.startswith("text") else "diffusion_pytorch_model"
        _sparse_safetensors(folder / name / f"{weights}.safetensors",
                            {k: tuple(v.shape) for k, v in model.state_dict().items()})
        (folder / name / "config.json").write_text(json.dumps(model.config.to_dict()
                                                              if name.startswith("text")
                                                              else dict(model.config),
                                                              default=list))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def test_lora_config_of_a_full_size_flux_says_what_it_needs(demo_home, full_size_flux,
                                                             capsys):
    """nf4 + gradient checkpointing + bf16 at 1024 px fits a 24 GB card (the issue's target:
    <= 22 GiB); in bf16 it needs more than 24 GB, and more again without checkpointing."""
    import dataclasses

    from lora_kernel.training.models import estimate_training_memory
    over = ["-p", "base_model", str(full_size_flux), "-p", "resolution", "1024",
            "-p", "mixed_precision", "bf16", "-p", "quantization", "nf4",
            "-p", "gradient_checkpointing", "true", "-p", "batch_size", "1"]
    from lora_kernel.cli import main as cli
    code = cli.main(["config", str(demo_home / "demo" / "flux_lora.yaml"), *over])
    out = capsys.readouterr().out
    assert code == 0, out
    line = out.splitlines()[-1].split("; memory: ", 1)[1]  # the last line: OK; ...; memory
    assert "fits a 24 GB GPU" in line and "fits a 80 GB GPU" in line, line
    cfg = _cfg(demo_home, "flux", base_model=str(full_size_flux), resolution=1024,
               mixed_precision="bf16", quantization="nf4", gradient_checkpointing=True,
               batch_size=1)
    est = estimate_training_memory(cfg)
    assert 15 * 2 ** 30 < est.device <= 22 * 2 ** 30, est  # T5 9.5 GB + nf4 6.7 GB + ...
    plain = estimate_training_memory(dataclasses.replace(cfg, quantization="none",
                                                         gradient_checkpointing=False))
    bf16_gc = estimate_training_memory(dataclasses.replace(cfg, quantization="none"))
    assert plain.weights == bf16_gc.weights > 30 * 2 ** 30  # 11.9B + 4.8B params in bf16
    assert 24 * 2 ** 30 < bf16_gc.device < plain.device and bf16_gc.device < 80 * 2 ** 30


@pytest.mark.slow
def test_an_nf4_flux_run_trains_on_the_cpu_and_its_adapter_loads_in_the_full_model(
        demo_home, tmp_path):
    """quantization: nf4 through bitsandbytes' CPU backend: the frozen transformer's Linear
    layers are 4-bit, the LoRA trains (loss falls) and its diffusers file loads into the
    unquantized pipeline."""
    import bitsandbytes as bnb
    from diffusers import FluxPipeline
    cfg = _cfg(demo_home, "flux", output_dir=str(tmp_path / "nf4"), quantization="nf4",
               save_steps=0, max_train_steps=16, learning_rate=5e-3, sample_steps=1)
    res = train(cfg, progress=False, home=demo_home, log=lambda m: None)
    tr = res.live["components"].unet
    base = tr.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    assert isinstance(tr.single_transformer_blocks[0].proj_out, bnb.nn.Linear4bit)
    assert res.eval_loss_after < 0.95 * res.eval_loss_before, (res.eval_loss_before,
                                                                res.eval_loss_after)
    assert json.loads(Path(res.summary_path).read_text())["config"]["quantization"] == "nf4"
    path = Path(res.adapter_files["diffusers"])
    pipe = FluxPipeline.from_pretrained(cfg.base_model, local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="t")
    assert sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_A" in n) == sum(
        1 for n, _ in tr.named_parameters() if "lora_A" in n) > 0


@pytest.mark.slow
def test_a_resumed_flux_run_is_bit_identical_to_an_uninterrupted_one(demo_home, tmp_path):
    """Everything random of the flow objective at once (shifted sigmoid times, cosmap
    weights, guidance, flips, dropout, accumulation, the CLIP LoRA): interrupted after step 2
    and resumed, the adapters and per-step losses equal an uninterrupted run's, byte for
    byte — so a replay of the same inputs trains the same adapter."""
    from lora_kernel.common.errors import TrainingInterrupted
    over = dict(max_train_steps=4, save_steps=0, lora_dropout=0.1, random_flip=True,
                gradient_accumulation_steps=2, timestep_sampling="shift",
                weighting_scheme="cosmap", train_text_encoder=True, batch_size=2)

    def run(out, **kw):
        cfg = _cfg(demo_home, "flux", output_dir=str(out), **over)
        return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None,
                     **kw)
    whole = run(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "split", interrupt_at_step=2)
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.steps == whole.steps == 4 and resumed.resumed_from
    assert resumed.losses == whole.losses
    for fmt, path in whole.adapter_files.items():
        ours, theirs = load_file(path), load_file(resumed.adapter_files[fmt])
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), fmt


# -- single files -----------------------------------------------------------------------------
def test_the_all_in_one_flux_file_loads_as_its_folder(demo_home):
    """The demo's ComfyUI-layout all-in-one file (BFL transformer under
    ``model.diffusion_model.``, ``text_encoders.clip_l/t5xxl``, ``vae.``) gives exactly the
    folder's weights, with the bundled tiny-flux configs and tokenizers."""
    from lora_kernel.training.models import load_sd_components
    models = demo_home / "demo" / "models"
    folder = load_sd_components(models / "tiny-flux")
    single = load_sd_components(models / "tiny-flux.safetensors")
    assert single.family is FLUX and single.config_path.name == "tiny-flux"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert single.tokenizer_2("a red circle").input_ids == folder.tokenizer_2(
        "a red circle").input_ids
    assert _cfg(demo_home, "flux", base_model=str(models / "tiny-flux.safetensors")
                ).model_family == "flux"


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_a_transformer_only_flux_file_is_refused_naming_what_it_lacks(demo_home, tmp_path,
                                                                      prefix):
    """flux1-dev.safetensors (bare BFL keys) and ComfyUI's diffusion-model file hold the
    transformer only: refused before anything loads, naming the T5 and the VAE."""
    from safetensors.torch import save_file
    full = load_file(str(demo_home / "demo" / "models" / "tiny-flux.safetensors"))
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({prefix + k[len("model.diffusion_model."):]: v for k, v in full.items()
               if k.startswith("model.diffusion_model.")}, str(path))
    with pytest.raises(ConfigError) as info:
        _cfg(demo_home, "flux", base_model=str(path))
    msg = str(info.value)
    assert info.value.key == "base_model" and "T5-XXL" in msg and "VAE" in msg
    assert "CLIP-L" in msg and "all-in-one" in msg and "diffusers folder" in msg


def test_the_bundled_full_size_flux_configs_are_flux_dev_and_schnell(flux_dev_meta):
    from diffusers import FluxTransformer2DModel

    from lora_kernel.training.flow_single_file import CONFIGS, bundled_flux_config
    conf = FluxTransformer2DModel.load_config(CONFIGS / "flux-dev" / "transformer")
    assert {k: conf[k] for k in FLUX_DEV} == {**FLUX_DEV, "axes_dims_rope": [16, 56, 56]}
    header = {"img_in.weight": {"shape": [3072, 64]}, "guidance_in.in_layer.weight": {}}
    assert bundled_flux_config(header).name == "flux-dev"
    del header["guidance_in.in_layer.weight"]
    assert bundled_flux_config(header).name == "flux-schnell"
    assert not FluxTransformer2DModel.load_config(
        CONFIGS / "flux-schnell" / "transformer")["guidance_embeds"]


@pytest.mark.slow
def test_init_continues_from_a_flux_adapter_and_refuses_an_sd3_one(flux_run, sd3_run,
                                                                    demo_home, tmp_path):
    """``init:`` takes this platform's Flux adapter (transformer and CLIP LoRA) into a new
    Flux run, whose first loss is then the trained one's; an SD3.5 adapter is refused."""
    cfg, res = flux_run
    over = dict(FAST, max_train_steps=1, init=res.adapter_files["diffusers"])
    again = train(_cfg(demo_home, "flux", output_dir=str(tmp_path / "again"), **over),
                  progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert again.eval_loss_before == pytest.approx(res.eval_loss_after, rel=1e-5)
    with pytest.raises(ConfigError, match="is a LoRA for sd3") as info:
        _cfg(demo_home, "flux", **dict(over, init=sd3_run[1].adapter_files["diffusers"]))
    assert info.value.key == "init"
