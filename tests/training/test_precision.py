"""Frozen base weights in the training precision: with ``mixed_precision: bf16`` the UNet,
text encoder and VAE (and the causal LM) hold bfloat16 weights, the LoRA weights and the
optimizer stay float32, the run still learns, its adapters reload, the summary says which
dtype was which, and the memory estimate follows."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.precision import keep_trainable_fp32, vae_dtype_name
from lora_kernel.training.train import train


@pytest.fixture(scope="module")
def bf16_image_run(demo_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16-image")
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(out), "save_steps": 0, "max_train_steps": 40,
                       "mixed_precision": "bf16"})
    return cfg, train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)


@pytest.mark.slow
def test_bf16_image_run_keeps_base_in_bf16_and_lora_in_fp32_and_learns(bf16_image_run):
    cfg, res = bf16_image_run
    comps = res.live["components"]
    for module in (comps.unet, comps.vae, comps.text_encoder):
        frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
        assert frozen == {torch.bfloat16}, (type(module).__name__, frozen)
    lora = [p for p in comps.unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert res.eval_loss_after < 0.92 * res.eval_loss_before, (res.eval_loss_before,
                                                               res.eval_loss_after)
    summary = json.loads(open(res.summary_path).read())
    assert summary["base_weight_dtype"] == "bfloat16"
    assert summary["trainable_dtype"] == "float32"
    for path in res.adapter_files.values():  # exported in the dtype it was trained in
        assert {t.dtype for t in load_file(path).values()} == {torch.float32}


@pytest.mark.slow
def test_bf16_adapter_reloads_into_a_float32_pipeline(bf16_image_run):
    from diffusers import StableDiffusionPipeline
    cfg, res = bf16_image_run
    kw = dict(local_files_only=True, use_safetensors=True, safety_checker=None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))

    def out(unet):
        with torch.no_grad():
            return unet(x, torch.tensor([500]), ctx).sample

    ref = out(StableDiffusionPipeline.from_pretrained(cfg.base_model, **kw).unet)
    outs = {}
    for fmt, path in res.adapter_files.items():
        pipe = StableDiffusionPipeline.from_pretrained(cfg.base_model, **kw)
        folder, name = path.rsplit("/", 1)
        pipe.load_lora_weights(folder, weight_name=name, adapter_name="t")
        outs[fmt] = out(pipe.unet)
    assert (outs["diffusers"] - ref).abs().mean() > 1e-4
    torch.testing.assert_close(outs["diffusers"], outs["kohya"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_float32_run_records_float32(demo_home, tmp_path):
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(tmp_path), "save_steps": 0, "max_train_steps": 1})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert (res.base_weight_dtype, res.trainable_dtype) == ("float32", "float32")
    assert next(res.live["components"].unet.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_bf16_text_run_keeps_the_lm_in_bf16_and_learns(demo_home, tmp_path):
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"output_dir": str(tmp_path), "save_steps": 0, "max_train_steps": 20,
                       "mixed_precision": "bf16"})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    model = res.live["model"]
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert res.eval_loss_after < 0.5 * res.eval_loss_before
    assert (res.base_weight_dtype, res.trainable_dtype) == ("bfloat16", "float32")
    from peft import PeftModel

    from lora_kernel.training.models import load_causal_lm
    base, _ = load_causal_lm(cfg.base_model)
    reloaded = PeftModel.from_pretrained(base, res.adapter_files["peft"])
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {torch.float32}


def test_the_optimizer_sees_only_float32_lora_weights():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    lin.requires_grad_(False)
    lora = torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16)
    model = torch.nn.Sequential(lin, lora)
    keep_trainable_fp32(model)
    assert lin.weight.dtype == torch.bfloat16  # frozen: untouched
    assert lora.weight.dtype == torch.float32


def _image(demo_home, **changes):
    return load_config(demo_home / "demo" / "image_lora.yaml", changes)


def _text(demo_home, **changes):
    return load_config(demo_home / "demo" / "text_lora.yaml", changes)


def test_vae_dtype_follows_the_weights_unless_it_overflows(demo_home):
    cfg = _image(demo_home, mixed_precision="bf16")
    assert cfg.vae_dtype == "auto" and vae_dtype_name(cfg) == "bfloat16"
    assert vae_dtype_name(_image(demo_home, mixed_precision="bf16",
                                 vae_dtype="fp32")) == "float32"

    class Fp16:
        mixed_precision, vae_dtype = "fp16", "auto"
    assert vae_dtype_name(Fp16) == "float16"
    assert vae_dtype_name(Fp16, vae_fp16_overflows=True) == "float32"


def test_an_unknown_vae_dtype_is_refused(demo_home):
    with pytest.raises(ConfigError, match="vae_dtype") as info:
        _image(demo_home, vae_dtype="float8")
    assert "auto" in str(info.value)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd.safetensors"])
def test_the_memory_estimate_follows_the_weight_dtype(demo_home, model):
    from lora_kernel.training.models import estimate_training_memory
    base = str(demo_home / "demo" / "models" / model)
    fp32 = estimate_training_memory(_image(demo_home, base_model=base))
    bf16 = estimate_training_memory(_image(demo_home, base_model=base, mixed_precision="bf16"))
    vae32 = estimate_training_memory(_image(demo_home, base_model=base,
                                            mixed_precision="bf16", vae_dtype="fp32"))
    assert bf16.weights * 2 == fp32.weights
    assert bf16.weights < vae32.weights < fp32.weights
    t32 = estimate_training_memory(_text(demo_home))
    t16 = estimate_training_memory(_text(demo_home, mixed_precision="bf16"))
    assert t16.weights * 2 == t32.weights
