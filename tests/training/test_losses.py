"""Loss options (lora_kernel.training.losses): Min-SNR and debiased weights as kohya computes
them for epsilon and v prediction, pyramid noise drawn from the loop's generator,
zero-terminal-SNR betas, plain MSE bit for bit when nothing is on, and a short run with all
of them on trains."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.config import config_from_mapping
from lora_kernel.training.losses import (
    diffusion_loss,
    multires_noise,
    sample_weights,
    training_scheduler,
)


def _cfg(**kw):
    base = {"min_snr_gamma": 0.0, "debiased_estimation_loss": False,
            "multires_noise_iterations": 0, "multires_noise_discount": 0.3,
            "zero_terminal_snr": False}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_and_debiased_weights_match_kohyas_formulas(prediction):
    sched = DDPMScheduler(prediction_type=prediction)
    t = torch.tensor([0, 10, 200, 500, 999])
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    want = clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr
    torch.testing.assert_close(sample_weights(_cfg(min_snr_gamma=5.0), sched, t), want)
    capped = torch.minimum(snr, torch.full_like(snr, 1000.0))  # kohya caps SNR at 1000
    deb = 1 / (capped + 1) if prediction == "v_prediction" else 1 / torch.sqrt(capped)
    torch.testing.assert_close(sample_weights(_cfg(debiased_estimation_loss=True), sched, t),
                               deb)


def test_plain_mse_is_unchanged_and_weights_change_the_loss():
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 900])
    assert torch.equal(diffusion_loss(_cfg(), sched, pred, target, t),
                       F.mse_loss(pred, target))
    assert diffusion_loss(_cfg(min_snr_gamma=5.0), sched, pred, target, t) \
        != F.mse_loss(pred, target)


def test_multires_noise_is_seeded_by_the_generator_and_unit_std():
    cfg = _cfg(multires_noise_iterations=6, multires_noise_discount=0.3)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a = multires_noise(noise, cfg, torch.Generator().manual_seed(3))
    b = multires_noise(noise, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, noise)
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)
    assert multires_noise(noise, _cfg(), torch.Generator()) is noise  # off: untouched


def test_zero_terminal_snr_rescales_the_last_timestep_to_pure_noise():
    sched = DDPMScheduler(beta_schedule="scaled_linear")
    assert sched.alphas_cumprod[-1] > 1e-4
    zt = training_scheduler(_cfg(zero_terminal_snr=True), sched)
    assert float(zt.alphas_cumprod[-1]) < 1e-6
    assert training_scheduler(_cfg(), sched) is sched


def test_multires_noise_discount_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="multires_noise_discount"):
        config_from_mapping({"base_model": "x", "multires_noise_discount": 0})


@pytest.mark.slow
def test_a_run_with_every_loss_option_trains(demo_home, demo_subset, tmp_path):
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {"output_dir": str(tmp_path), "max_train_steps": 20, "save_steps": 0,
                       **demo_subset(8),
                       "min_snr_gamma": 5.0, "multires_noise_iterations": 6,
                       "debiased_estimation_loss": True, "zero_terminal_snr": True})
    res = train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.eval_loss_after < res.eval_loss_before


def test_clip_skip_conditions_on_the_penultimate_layer_through_the_final_norm(demo_home):
    from lora_kernel.training.families import family_named
    from lora_kernel.training.models import load_sd_components
    comps = load_sd_components(demo_home / "demo" / "models" / "tiny-sd")
    fam = family_named("sd15")
    ids = fam.tokenize(comps, ["a red circle in enclave style"])
    te = comps.text_encoder
    with torch.no_grad():
        last = fam.encode_prompt(comps, ids).hidden
        comps.clip_skip = 2
        skipped = fam.encode_prompt(comps, ids).hidden
        states = te(ids[0], output_hidden_states=True).hidden_states
        torch.testing.assert_close(skipped, te.final_layer_norm(states[-2]))
        torch.testing.assert_close(last, te.final_layer_norm(states[-1]))
    assert not torch.allclose(last, skipped)


@pytest.mark.parametrize("key", ["min_snr_gamma", "debiased_estimation_loss",
                                 "multires_noise_iterations", "noise_offset",
                                 "zero_terminal_snr", "network_type", "use_dora"])
def test_ddpm_loss_options_and_lycoris_types_are_refused_for_flow_models(demo_home, tmp_path,
                                                                          key):
    """Flux / SD3.5 train by flow matching: kohya's DDPM loss options would be silently
    ignored there, so each is refused naming its key; flow matching's own weighting works."""
    import yaml

    from lora_kernel.training.checks import load_config
    value = {"min_snr_gamma": 5.0, "debiased_estimation_loss": True,
             "multires_noise_iterations": 6, "noise_offset": 0.05, "zero_terminal_snr": True,
             "network_type": "loha", "use_dora": True}[key]
    data = yaml.safe_load((demo_home / "demo" / "flux_lora.yaml").read_text())
    for k in ("train_data_dir", "metadata_path", "base_model"):
        data[k] = str((demo_home / "demo" / data[k]).resolve())
    path = tmp_path / "flux.yaml"
    path.write_text(yaml.safe_dump({**data, key: value}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and "fix: remove" in str(info.value)
    path.write_text(yaml.safe_dump({**data, "weighting_scheme": "sigma_sqrt"}))
    assert load_config(path).weighting_scheme == "sigma_sqrt"
