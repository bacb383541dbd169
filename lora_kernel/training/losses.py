"""Loss options kohya users turn on (sd-scripts ``library/custom_train_functions.py``):
``min_snr_gamma`` (Min-SNR weighting, Hang et al. 2023), ``debiased_estimation_loss``,
``multires_noise_iterations`` / ``multires_noise_discount`` (pyramid noise) and
``zero_terminal_snr`` (betas rescaled so the last timestep is pure noise, Lin et al. 2023).
The weights follow the model's ``prediction_type`` (epsilon or v, SD2's 768 px models).

All randomness comes from the generator the loop passes, so a run stays deterministic and
resumes exactly. With none of the options on, :func:`diffusion_loss` is plain MSE, the same
bits as before.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_options_on(cfg) -> bool:
    """Whether any per-sample weighting is on."""
    return bool(getattr(cfg, "min_snr_gamma", 0) or getattr(cfg, "debiased_estimation_loss",
                                                             False))


# kohya's loss options of the DDPM (UNet) families -> their value when off. Flow-matching
# families (Flux, SD3.5) have no SNR schedule or epsilon/v target: they refuse these (their
# own per-example weighting is weighting_scheme, their noise spread timestep_sampling).
DDPM_ONLY = {"min_snr_gamma": 0.0, "debiased_estimation_loss": False,
             "multires_noise_iterations": 0, "noise_offset": 0.0, "zero_terminal_snr": False}


def ddpm_only_set(cfg) -> list[str]:
    """The DDPM-only loss options ``cfg`` turns on (see :data:`DDPM_ONLY`)."""
    return [k for k, off in DDPM_ONLY.items() if getattr(cfg, k, off) != off]


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps``."""
    ab = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ab / (1.0 - ab).clamp(min=1e-12)


def sample_weights(cfg, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of the options on (1 where none is)."""
    s = snr(scheduler, timesteps)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    w = torch.ones_like(s)
    gamma = getattr(cfg, "min_snr_gamma", 0)
    if gamma:
        clipped = torch.minimum(s, torch.full_like(s, float(gamma)))
        w = w * (clipped / (s + 1.0) if v_pred else clipped / s.clamp(min=1e-12))
    if getattr(cfg, "debiased_estimation_loss", False):
        s = torch.minimum(s, torch.full_like(s, 1000.0))
        w = w * (1.0 / (s + 1.0) if v_pred else 1.0 / torch.sqrt(s.clamp(min=1e-12)))
    return w


def diffusion_loss(cfg, scheduler, pred: torch.Tensor, target: torch.Tensor,
                   timesteps: torch.Tensor, example_weights: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """MSE of ``pred`` against ``target``, weighted per sample when an option asks and by
    ``example_weights`` (kohya's ``prior_loss_weight`` of regularization images)."""
    if not loss_options_on(cfg) and example_weights is None:
        return F.mse_loss(pred.float(), target.float())
    per = F.mse_loss(pred.float(), target.float(), reduction="none")
    per = per.mean(dim=list(range(1, per.ndim)))
    if example_weights is not None:
        per = per * example_weights.float().to(per.device)
    if not loss_options_on(cfg):
        return per.mean()
    return (per * sample_weights(cfg, scheduler, timesteps).to(per.device)).mean()


def multires_noise(noise: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """kohya's pyramid noise: ``noise`` plus upsampled coarser noise at
    ``multires_noise_discount ** i`` for ``multires_noise_iterations`` levels, normalised to
    unit std. Level sizes and noise are drawn from ``generator``."""
    iterations = int(getattr(cfg, "multires_noise_iterations", 0))
    if not iterations:
        return noise
    discount = float(getattr(cfg, "multires_noise_discount", 0.3))
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        level = torch.randn((b, c, hn, wn), generator=generator).to(noise.device)
        out = out + up(level) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def training_scheduler(cfg, scheduler):
    """The noise scheduler training uses: ``scheduler``, or with ``zero_terminal_snr`` a copy
    whose betas are rescaled to zero terminal SNR (diffusers' ``rescale_betas_zero_snr``)."""
    if not getattr(cfg, "zero_terminal_snr", False):
        return scheduler
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
