"""Pre-training of the tiny demo Stable Diffusion model, so that its samples show what a
prompt names and a LoRA's effect is visible against them.

A randomly initialised model draws coloured noise, with or without a LoRA. Here the tiny SD
model of :mod:`lora_kernel.training.demo_assets` learns, from procedurally drawn *scenes*
(a coloured shape at a position on a plain background, the caption naming all three):

1. the VAE, as an autoencoder of scenes and of striped textures (a generic image codec: it
   must be able to draw stripes, but learns no link from any word to them);
2. the text encoder and the UNet together, as a denoiser of the scenes' latents conditioned
   on their captions (10% empty captions, for classifier-free guidance).

The base never sees the demo dataset's "enclave style" (magenta stripes, white rims): only a
LoRA trained on it can add the style (:mod:`lora_kernel.training.style_metrics` measures it).

The result is cached by content (``$LORA_PRETRAIN_CACHE``, else
``$XDG_CACHE_HOME/lora-enclave/pretrain``, else ``~/.cache/lora-enclave/pretrain``): the key
hashes this module's source, the model configs, the seed and the torch/diffusers/transformers
versions, so a build on the same machine pays the pre-training once and then loads the
weights (a file lock keeps concurrent builds from training twice). The training runs with
deterministic algorithms on a fixed number of CPU threads, so the same machine gives the same
bytes every time; another CPU (other vector instructions) may round differently, so
bit-identity across machines is not promised, only the quality floors the tests check.

Runs as: the user (``lora demo-assets`` and everything that builds the demo assets).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# -- the scenes -------------------------------------------------------------------------
SCENE_BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46),
             "middle": (32, 32)}
POSITION_WORDS = tuple(POSITIONS)
FILLERS = ("photo", "drawing", "painting", "picture", "shape")

PRETRAIN_THREADS = 1
VAE_STEPS = 200
DENOISER_STEPS = 1000
DENOISER_LR = 3e-3
OFFSET_NOISE = 0.5
N_SCENES = 1024
RECIPE_VERSION = 1


def draw_scene(rgb, shape: str, position: str, background: str, *, size: int = 64,
               jitter: tuple[int, int, int] = (0, 0, 0)):
    """One ``size`` px scene: a ``shape`` (no rim) of colour ``rgb`` centred at ``position``
    on a plain ``background``; ``jitter`` = (dx, dy, dr) in px."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), SCENE_BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx, cy, r = cx + jitter[0], cy + jitter[1], 12 + jitter[2]
    _draw_shape(d, shape, cx, cy, r, tuple(rgb))
    return img


def _draw_shape(d, shape: str, cx: int, cy: int, r: int, rgb, **kw) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb, **kw)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb, **kw)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb, **kw)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb, **kw)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def scene_caption(color: str, shape: str, position: str, background: str,
                  rng: random.Random) -> str:
    """A caption naming the scene; parts are left out at random so that short prompts
    ("a red circle") work, and a filler phrase is sometimes appended so that words the base
    never learned (a style's name) do not derail it."""
    text = f"a {color} {shape}"
    if rng.random() < 0.6:
        text += f" on the {position}"
    if rng.random() < 0.6:
        text += f" on a {background} background"
    if rng.random() < 0.3:
        text += f" in {rng.choice(FILLERS)} {rng.choice(FILLERS)}"
    return text


def scenes(n: int, seed: int, palette: dict, shapes: tuple[str, ...]):
    """``n`` seeded random scenes of ``shapes`` in ``palette``'s colours (name -> RGB):
    ``(PIL image, caption)``."""
    rng = random.Random(f"scenes-{seed}")
    colours = sorted(palette)
    out = []
    for _ in range(n):
        c, s = rng.choice(colours), rng.choice(shapes)
        p, b = rng.choice(POSITION_WORDS), rng.choice(sorted(SCENE_BACKGROUNDS))
        jitter = (rng.randint(-4, 4), rng.randint(-4, 4), rng.randint(-2, 3))
        out.append((draw_scene(palette[c], s, p, b, jitter=jitter),
                    "" if rng.random() < 0.1 else scene_caption(c, s, p, b, rng)))
    return out


def texture(rng: random.Random, shapes: tuple[str, ...], size: int = 64):
    """A striped texture with a random pair of colours, angle, period and duty cycle, sometimes
    with a random-coloured shape (white rim or none) on top: what the VAE must be able to
    encode besides plain scenes."""
    from PIL import Image, ImageDraw

    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    img = Image.new("RGB", (size, size), colour())
    d = ImageDraw.Draw(img)
    period, slant = rng.choice((8, 12, 16, 24, 32)), rng.choice((-1, 0, 1))
    width = max(2, int(period * rng.uniform(0.3, 0.6)))
    ink = colour()
    for k in range(-2 * size, 3 * size, period):
        off = k
        if slant == 0:
            d.rectangle([off, 0, off + width - 1, size], fill=ink)
        else:
            d.polygon([(off, 0), (off + width, 0), (off + width - slant * size, size),
                       (off - slant * size, size)], fill=ink)
    if rng.random() < 0.6:
        cx, cy, r = rng.randint(16, 48), rng.randint(16, 48), rng.randint(9, 16)
        rim = dict(outline=(255, 255, 255), width=rng.choice((0, 2, 3)))
        _draw_shape(d, rng.choice(shapes), cx, cy, r, colour(), **rim)
    return img


# -- the cache ----------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where pre-trained weights are cached (see the module docstring)."""
    env = os.environ.get("LORA_PRETRAIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "lora-enclave" / "pretrain"


def recipe_key(name: str, models: dict, **extra) -> str:
    """The content key of a pre-training result: this module's source, the library versions,
    every model's config and initial weights (``models``: name -> module), and ``extra``."""
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps({"name": name, "extra": extra, "recipe": RECIPE_VERSION,
                         "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
                        sort_keys=True, default=str).encode())
    for part in sorted(models):
        model = models[part]
        cfg = model.config
        cfg = dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()
        # diffusers' private entries (``_use_default_values`` is built from a set, so its
        # order changes with every process's hash seed) are bookkeeping, not the model
        cfg = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
        h.update(json.dumps([part, cfg], sort_keys=True, default=str).encode())
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_state(name: str, key: str, train) -> dict:
    """``{param name: tensor}`` from the cache entry ``<name>-<key>.safetensors``, else from
    ``train()`` (then stored, atomically). An unwritable cache only costs the reuse."""
    from safetensors.torch import load_file, save_file

    folder = cache_dir()
    path = folder / f"{name}-{key}.safetensors"
    try:
        lock = _locked(folder / f"{name}-{key}.lock")
        lock.__enter__()
    except OSError as e:
        log.warning("pre-training cache %s unusable (%s): training without it", folder, e)
        return train()
    try:
        if path.is_file():
            try:
                state = load_file(path)
                log.info("pre-trained weights: cache hit %s", path)
                return state
            except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, and said so
                log.warning("pre-trained weights %s unreadable (%s): training again", path, e)
        state = train()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, path)
            log.info("pre-trained weights cached: %s", path)
        except OSError as e:
            log.warning("pre-training cache %s not written (%s)", path, e)
        return state
    finally:
        lock.__exit__(None, None, None)


@contextlib.contextmanager
def deterministic_cpu(threads: int = PRETRAIN_THREADS) -> Iterator[None]:
    """Deterministic algorithms on ``threads`` CPU threads; the previous settings after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


# -- the training -----------------------------------------------------------------------
@dataclass(frozen=True)
class SceneVocabulary:
    """What the scenes draw and name: ``palette`` (colour name -> RGB) and ``shapes``."""
    palette: dict
    shapes: tuple[str, ...]


def _to_tensor(images):
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def linear_codec_(vae, k: float = 10.0, b: float = 10.0) -> None:
    """Set ``vae``'s weights (in place) so that it is a plain linear codec before any
    training: the encoder averages each 8x8 pixel cell's RGB into latent channels 0-2, the
    decoder repeats them back (8x8 blocks). Pre-training then only sharpens it, which takes
    a few hundred steps instead of the thousands a VAE needs from a random start.

    How: every residual branch (ResNet ``conv2``, attention ``to_out``) starts at zero, so
    each block passes its input through; the down-samplers average 2x2, the up-samplers
    repeat. The two GroupNorms on the main path (``conv_norm_out``, one group) would remove
    each image's mean and scale, so the path carries ``+s, -s`` channel pairs (the group's
    mean stays 0) and a ``+k, -k`` pair whose size fixes the group's spread; the norm's
    affine weight undoes that spread and its bias ``b`` moves the signal to where SiLU is
    nearly the identity. Needs equal ``block_out_channels`` (at least 8) and
    ``norm_num_groups: 1``.
    """
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    enc, dec = vae.encoder, vae.decoder
    width = vae.config.block_out_channels[0]
    if set(vae.config.block_out_channels) != {width} or width < 8 \
            or vae.config.norm_num_groups != 1:
        raise ValueError("linear_codec_ needs equal block_out_channels >= 8 and one group")
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif isinstance(m, Attention):
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
        for conv in (enc.conv_in, dec.conv_in):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1.0
                conv.weight[3 + c, c, 1, 1] = -1.0
            conv.bias[6], conv.bias[7] = k, -k
        for block in enc.down_blocks:
            for ds in block.downsamplers or []:
                ds.conv.weight.zero_()
                ds.conv.bias.zero_()
                for c in range(width):
                    ds.conv.weight[c, c, 0:2, 0:2] = 0.25
        for block in dec.up_blocks:
            for us in block.upsamplers or []:
                us.conv.weight.zero_()
                us.conv.bias.zero_()
                for c in range(width):
                    us.conv.weight[c, c, 1, 1] = 1.0
        spread = math.sqrt(2.0 * k * k / width)
        for norm in (enc.conv_norm_out, dec.conv_norm_out):
            norm.weight.fill_(spread)
            norm.bias.fill_(b)
        offset = b / (1.0 + math.exp(-b))  # silu(b)
        for conv, n_out in ((enc.conv_out, 3), (dec.conv_out, 3)):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(n_out):
                conv.weight[c, c, 1, 1] = 1.0
                conv.bias[c] = -offset
        latent = vae.config.latent_channels
        enc.conv_out.bias[latent:] = -10.0  # log-variance: a near-deterministic latent
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.out_channels):
                conv.weight[c, c, 0, 0] = 1.0


def train_vae(vae, vocab: SceneVocabulary, seed: int, steps: int = VAE_STEPS,
              log_every: int = 0) -> None:
    """Train ``vae`` (in place) to reconstruct scenes and textures; then rescale its latent
    so that ``scaling_factor`` (kept from the config) maps the scenes' latents to unit
    standard deviation, as SD's does."""
    import torch

    rng = random.Random(f"vae-{seed}")
    torch.manual_seed(seed + 100)
    pool = [im for im, _ in scenes(512, seed + 1, vocab.palette, vocab.shapes)]
    pool += [texture(rng, vocab.shapes) for _ in range(512)]
    data = _to_tensor(pool)
    linear_codec_(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps,
                                                pct_start=0.1)
    vae.train()
    g = torch.Generator().manual_seed(seed + 101)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (8,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + 0.05 * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * (dist.mean ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        scene_x = _to_tensor([im for im, _ in scenes(128, seed + 2, vocab.palette,
                                                     vocab.shapes)])
        std = float(vae.encode(scene_x).latent_dist.mean.std())
        # latent' = c * latent with c * std * scaling_factor = 1: scale the encoder's mean
        # projection by c (its log-variance half by c**2) and the decoder's input by 1 / c.
        c = 1.0 / (std * vae.config.scaling_factor)
        qc, pqc = vae.quant_conv, vae.post_quant_conv
        n = qc.out_channels // 2
        qc.weight[:n] *= c
        qc.bias[:n] *= c
        qc.bias[n:] += 2.0 * math.log(c)
        pqc.weight *= 1.0 / c


def train_denoiser(unet, text_encoder, tokenizer, vae, vocab: SceneVocabulary,
                   scheduler_config: dict, seed: int, steps: int = DENOISER_STEPS,
                   log_every: int = 0) -> None:
    """Train ``unet`` and ``text_encoder`` (in place) to denoise scene latents given their
    captions (epsilon prediction on the model's noise schedule)."""
    import torch
    from diffusers import DDPMScheduler

    torch.manual_seed(seed + 200)
    pool = scenes(N_SCENES, seed + 3, vocab.palette, vocab.shapes)
    with torch.no_grad():
        x = _to_tensor([im for im, _ in pool])
        latents = torch.cat([vae.encode(x[i:i + 128]).latent_dist.mean
                             for i in range(0, len(x), 128)]) * vae.config.scaling_factor
    ids = tokenizer([c for _, c in pool], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
            "prediction_type")
    noise_sched = DDPMScheduler(**{k: v for k, v in dict(scheduler_config).items()
                                   if k in keep})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=DENOISER_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=DENOISER_LR, total_steps=steps,
                                                pct_start=0.05)
    unet.train()
    text_encoder.train()
    g = torch.Generator().manual_seed(seed + 201)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (16,), generator=g)
        z0 = latents[idx]
        # offset noise: a per-channel constant too, so that the model learns to set each
        # image's mean colour itself (SD's schedule leaves ~7-10% of the signal at the first
        # sampling step, and on 8x8 latents the start noise's mean, std 1/8 per channel,
        # would otherwise pick the background colour)
        noise = torch.randn(z0.shape, generator=g) + OFFSET_NOISE * torch.randn(
            (len(idx), z0.shape[1], 1, 1), generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids[idx])[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            log.info("denoiser step %d loss %.4f", step, loss.item())
    unet.eval()
    text_encoder.eval()


def pretrain_tiny_sd(parts: dict, tokenizer, vocab: SceneVocabulary, *, seed: int,
                     vae_steps: int = VAE_STEPS, denoiser_steps: int = DENOISER_STEPS,
                     use_cache: bool = True) -> None:
    """Pre-train the tiny SD ``parts`` (``unet``, ``vae``, ``text_encoder`` modified in
    place; ``scheduler``'s config gives the noise schedule), or load the cached result of
    the same recipe from the same initial weights."""
    names = ("vae", "unet", "text_encoder")

    def train() -> dict:
        with deterministic_cpu():
            train_vae(parts["vae"], vocab, seed, steps=vae_steps)
            train_denoiser(parts["unet"], parts["text_encoder"], tokenizer, parts["vae"],
                           vocab, parts["scheduler"].config, seed, steps=denoiser_steps)
        return {f"{part}.{k}": v.detach().clone() for part in names
                for k, v in parts[part].state_dict().items()}

    if use_cache:
        key = recipe_key("tiny-sd", {n: parts[n] for n in names}, seed=seed,
                         vae_steps=vae_steps, denoiser_steps=denoiser_steps,
                         vocab=sorted(vocab.palette.items()), shapes=vocab.shapes,
                         tokenizer=sorted(tokenizer.get_vocab().items()))
        state = cached_state("tiny-sd", key, train)
    else:
        state = train()
    load_parts(parts, names, state)


def load_parts(parts: dict, names, state: dict) -> None:
    """Load each of ``names`` from ``state`` (keys ``<name>.<parameter>``, as the pre-training
    saves them) into ``parts[name]``, strictly, and put it in eval mode."""
    for part in names:
        prefix = f"{part}."
        parts[part].load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                     if k.startswith(prefix)}, strict=True)
        parts[part].eval()
