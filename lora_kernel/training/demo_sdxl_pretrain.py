"""Pre-training of the tiny demo SDXL, so that its samples show what a prompt names and the
SDXL demo LoRA's effect is visible against them (as :mod:`.demo_pretrain` does for the
tiny SD).

* **VAE**: the tiny SDXL has the tiny SD's VAE architecture (``SD_VAE_CONFIG``) and takes its
  pre-trained weights (the scenes-and-textures codec of
  :func:`lora_kernel.training.demo_pretrain.train_vae`); it is not trained again. A build of
  every demo asset pre-trains the tiny SD first, so here its VAE is a cache hit.
* **UNet and both text encoders**: trained together as a denoiser of the same scenes'
  latents conditioned on their captions, through the :class:`ModelFamily` interface
  (:func:`train_family_denoiser`: ``tokenize``, ``encode_prompt``, ``time_ids``,
  ``noisy_batch``, ``predict``, ``batch_loss``), i.e. the conditioning the LoRA training and
  the SDXL pipeline use (both encoders' penultimate states, the pooled projection, 64 px
  ``add_time_ids``). 10% of captions are dropped to *zero* embeddings, which is what the SDXL
  pipeline's classifier-free guidance uses for an empty negative prompt
  (``force_zeros_for_empty_prompt``).

As for the tiny SD, the base never sees the demo dataset's "enclave style"; the result is
cached by content (the key adds this module's and the family's source to
:func:`~lora_kernel.training.demo_pretrain.recipe_key`'s), and the training runs with
deterministic algorithms on one CPU thread (same machine, same bytes).

Cost, measured on the shared 2-core development machine (under load): ~95-125 s for
``SDXL_DENOISER_STEPS`` steps, paid once per machine (then a cache hit, < 1 s).

Runs as: the user (``lora demo-assets`` and everything that builds the demo assets).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path
from types import SimpleNamespace

from lora_kernel.training import demo_pretrain
from lora_kernel.training.demo_pretrain import SceneVocabulary

log = logging.getLogger(__name__)

SDXL_DENOISER_STEPS = 500
SDXL_DENOISER_LR = 3e-3
SDXL_BATCH = 16
EMPTY_CAPTION_SHARE = 0.1  # scenes() leaves this share of captions empty
TEXT_PARTS = ("text_encoder", "text_encoder_2")
NAMES = ("unet", *TEXT_PARTS)


def _square_example(size: int) -> SimpleNamespace:
    """A ``size`` px square training image as the image task describes one (for
    ``ModelFamily.time_ids``): not resized, not cropped."""
    return SimpleNamespace(original_size=(size, size), resized_size=(size, size),
                           bucket=(size, size), crop_top_left=(0, 0))


def train_family_denoiser(family, comps, vocab: SceneVocabulary, seed: int, *,
                          steps: int = SDXL_DENOISER_STEPS, lr: float = SDXL_DENOISER_LR,
                          batch: int = SDXL_BATCH, size: int = 64, zero_uncond: bool = True,
                          log_every: int = 0) -> list[float]:
    """Train ``comps.unet`` and every text encoder of ``comps`` (in place) to denoise the
    scenes' latents (``comps.vae``, frozen) given their captions, through ``family``'s
    interface. ``zero_uncond``: an empty caption conditions with zero embeddings (SDXL's
    unconditional input) instead of the encoded empty string. Returns the losses."""
    import torch

    torch.manual_seed(seed + 300)
    pool = demo_pretrain.scenes(demo_pretrain.N_SCENES, seed + 3, vocab.palette, vocab.shapes)
    vae = comps.vae
    vae.requires_grad_(False)
    with torch.no_grad():
        x = demo_pretrain._to_tensor([im for im, _ in pool])
        latents = torch.cat([family.latents_from_vae(vae, vae.encode(x[i:i + 128])
                                                     .latent_dist.mean)
                             for i in range(0, len(x), 128)])
    captions = [c for _, c in pool]
    ids = family.tokenize(comps, captions)
    empty = torch.tensor([not c for c in captions])
    time_ids = family.time_ids(_square_example(size), flipped=False)
    cfg = SimpleNamespace(noise_offset=demo_pretrain.OFFSET_NOISE, multires_noise_iterations=0)
    params = list(comps.unet.parameters())
    for te in comps.text_encoders:
        te.requires_grad_(True)
        params += list(te.parameters())
    comps.unet.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    comps.unet.train()
    for te in comps.text_encoders:
        te.train()
    g = torch.Generator().manual_seed(seed + 301)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        noisy = family.noisy_batch(cfg, comps.noise_scheduler, latents[idx], g)
        embeds = family.encode_prompt(comps, [part[idx] for part in ids])
        if zero_uncond:
            keep = (~empty[idx]).float()
            embeds.hidden = embeds.hidden * keep[:, None, None]
            if embeds.pooled is not None:
                embeds.pooled = embeds.pooled * keep[:, None]
        tids = None if time_ids is None else time_ids.expand(batch, -1)
        loss = family.batch_loss(family.predict(comps, noisy, embeds, tids), noisy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if log_every and step % log_every == 0:
            log.info("sdxl denoiser step %d loss %.4f", step, loss.item())
    comps.unet.eval()
    for te in comps.text_encoders:
        te.eval()
    return losses


def _sources_digest() -> str:
    from lora_kernel.training.families import base, sdxl
    h = hashlib.sha256(Path(__file__).read_bytes())
    for mod in (base, sdxl):
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()


def pretrain_tiny_sdxl(parts: dict, tokenizers: dict, vocab: SceneVocabulary, *, seed: int,
                       tiny_sd: dict, steps: int = SDXL_DENOISER_STEPS,
                       use_cache: bool = True) -> None:
    """Pre-train the tiny SDXL ``parts`` (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2`` modified in place; ``scheduler``'s config gives the noise schedule):
    its VAE becomes the pre-trained VAE of the tiny SD ``tiny_sd``
    (:func:`~lora_kernel.training.demo_pretrain.pretrain_tiny_sd` on it, cached), then the
    UNet and text encoders learn the scenes (:func:`train_family_denoiser`), or their cached
    result of the same recipe from the same initial weights is loaded. ``tokenizers``:
    ``tokenizer`` and ``tokenizer_2``."""
    from diffusers import DDPMScheduler

    from lora_kernel.training.families import family_named

    demo_pretrain.pretrain_tiny_sd(tiny_sd, tokenizers["tokenizer"], vocab, seed=seed,
                                   use_cache=use_cache)
    parts["vae"].load_state_dict(tiny_sd["vae"].state_dict(), strict=True)
    parts["vae"].eval()
    family = family_named("sdxl")
    comps = SimpleNamespace(
        unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        text_encoders=[parts[n] for n in TEXT_PARTS],
        tokenizers=[tokenizers["tokenizer"], tokenizers["tokenizer_2"]],
        noise_scheduler=DDPMScheduler.from_config(parts["scheduler"].config))

    def train() -> dict:
        with demo_pretrain.deterministic_cpu():
            train_family_denoiser(family, comps, vocab, seed, steps=steps)
        return {f"{part}.{k}": v.detach().clone() for part in NAMES
                for k, v in parts[part].state_dict().items()}

    if use_cache:
        key = demo_pretrain.recipe_key(
            "tiny-sdxl", {n: parts[n] for n in (*NAMES, "vae")}, seed=seed, steps=steps,
            lr=SDXL_DENOISER_LR, batch=SDXL_BATCH, sources=_sources_digest(),
            vocab=sorted(vocab.palette.items()), shapes=vocab.shapes,
            tokenizers=[sorted(t.get_vocab().items()) for t in comps.tokenizers],
            pads=[t.pad_token for t in comps.tokenizers])
        state = demo_pretrain.cached_state("tiny-sdxl", key, train)
    else:
        state = train()
    demo_pretrain.load_parts(parts, NAMES, state)
