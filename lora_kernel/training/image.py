"""Image LoRA (Stable Diffusion family): diffusers + peft on the UNet attention projections,
optionally the CLIP text encoder; noise-prediction loss on the DDPM schedule.

VAE latents and text-encoder outputs are computed once and cached on disk, keyed by
content (dataset version × base-model sha256 × resolution × preprocessing), so a second
run skips them. Images are center-cropped (or randomly cropped once, deterministically)
to ``resolution``, or sorted into aspect-ratio buckets of about ``resolution²`` pixels.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.data import (
    MAX_IMAGE_PIXELS,
    animated_message,
    frame_count,
    open_image,
    read_image_rows,
    rgb_image,
)
from lora_kernel.training.families.base import PromptEmbeds
from lora_kernel.training.loop import seed_everything
from lora_kernel.training.precision import keep_trainable_fp32

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: keyed by model family; pooled embeddings and time ids (SDXL)
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# -- preprocessing ---------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 8, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (w, h), multiples of ``step``, with area close to resolution²."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_ratio:
        h = int(area / w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
        w += step
    return sorted(buckets)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(ratio)),
                                       -b[0] * b[1]))


@dataclass(frozen=True)
class Geometry:
    """How a training image became its pixels: its size (w, h) before resizing, the size
    (w, h) it was resized to, and the top-left corner (top, left) of the crop in that."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def prepare_image(path: Path, target: tuple[int, int], *, center: bool,
                  rng: random.Random, max_pixels: int = MAX_IMAGE_PIXELS,
                  geometry: list | None = None) -> torch.Tensor:
    """Load, resize to cover ``target`` (w, h), crop, and scale to [-1, 1] (C, H, W).
    An image of more than ``max_pixels`` pixels is refused from its header (ImageTooLarge).
    ``geometry``, when given, receives the image's :class:`Geometry`."""
    with open_image(path, max_pixels) as im:
        if frame_count(im) > 1:
            raise ConfigError(animated_message("the dataset", path.name, frame_count(im)),
                              file=path, key="train_data_dir")
        original = im.size
        im = rgb_image(im)
        tw, th = target
        scale = max(tw / im.width, th / im.height)
        new = (max(tw, round(im.width * scale)), max(th, round(im.height * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC)
        if center:
            left, top = (new[0] - tw) // 2, (new[1] - th) // 2
        else:
            left, top = rng.randint(0, new[0] - tw), rng.randint(0, new[1] - th)
        im = im.crop((left, top, left + tw, top + th))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if geometry is not None:
        geometry.append(Geometry(original, new, (top, left)))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class Example:
    """One training image after preprocessing (``bucket``: its size (w, h) after cropping)."""

    pixels: torch.Tensor | None
    bucket: tuple[int, int]
    caption: str
    original_size: tuple[int, int] = (0, 0)  # (w, h) before resizing
    resized_size: tuple[int, int] = (0, 0)  # (w, h) it was resized to before cropping
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop
    weight: float = 1.0  # loss weight: prior_loss_weight for a regularization image


def load_examples(cfg, rows: list[dict] | None = None, *, reg: bool = True) -> list[Example]:
    """Preprocess every row of the dataset, or ``rows`` (deterministic in ``cfg.seed``); with
    ``reg`` the regularization images after them."""
    rows = read_image_rows(cfg) if rows is None else rows
    if reg and getattr(cfg, "reg_data_dir", None):  # regularization images after them (reg.py)
        from lora_kernel.training.reg import prior_weight, reg_rows
        rows = rows + [{**r, "weight": prior_weight(cfg)} for r in reg_rows(cfg, len(rows))]
    rng = random.Random(cfg.seed)
    buckets = make_buckets(cfg.resolution) if cfg.enable_bucket else None
    out = []
    for row in rows:
        if buckets:
            with open_image(row["image"], cfg.max_image_pixels) as im:
                target = pick_bucket(im.size, buckets)
        else:
            target = (cfg.resolution, cfg.resolution)
        geometry: list[Geometry] = []
        pixels = prepare_image(row["image"], target, center=cfg.center_crop, rng=rng,
                               max_pixels=cfg.max_image_pixels, geometry=geometry)
        g = geometry[0]
        out.append(Example(pixels=pixels, bucket=target, caption=row["caption"],
                           original_size=g.original_size, resized_size=g.resized_size,
                           crop_top_left=g.crop_top_left, weight=row.get("weight", 1.0)))
    return out


def cache_key(cfg, dataset_version: str, model_sha256: str, family: str = "sd15") -> str:
    """Content key of the latent / text-embedding cache."""
    parts = {"format": CACHE_FORMAT, "dataset": dataset_version, "model": model_sha256,
             "family": family, "mixed_precision": cfg.mixed_precision,
             "vae_dtype": cfg.vae_dtype,
             "resolution": cfg.resolution, "bucket": cfg.enable_bucket,
             "center_crop": cfg.center_crop, "flip": cfg.random_flip,
             "crop_seed": None if cfg.center_crop else cfg.seed,
             "captions": [cfg.caption_column, cfg.image_column],
             "text_encoder_cached": not cfg.train_text_encoder}
    if getattr(cfg, "clip_skip", 1) > 1:  # (absent at 1: the keys of earlier caches stay)
        parts["clip_skip"] = cfg.clip_skip
    if getattr(cfg, "validation_split", 0) or getattr(cfg, "validation_dir", None):
        parts["held_out"] = [cfg.validation_split, cfg.validation_dir]  # examples' order
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# -- the task --------------------------------------------------------------------------

class ImageTask:
    """LoRA training of a Stable Diffusion UNet (and optionally its text encoders), for any
    family of :mod:`lora_kernel.training.families`: prompts, extra conditioning and the
    training target come from ``comps.family``.

    ``log`` receives the latent-cache notes (hit / written); default: this module's logger.
    """

    def __init__(self, cfg, comps, *, device: torch.device, cache_dir: Path | None,
                 dataset_version: str, log: Callable[[str], None] = logger.info):
        from peft import LoraConfig

        from lora_kernel.training.config import DEFAULT_IMAGE_TARGETS
        from lora_kernel.training.families import family_named
        from lora_kernel.training.models import check_target_modules
        self.cfg, self.comps, self.device, self.log = cfg, comps, device, log
        self.family = comps.family or family_named("sd15")
        unet, vae, tes = comps.unet, comps.vae, comps.text_encoders
        # the text encoders train_text_encoder puts a LoRA on (never T5: frozen, cached)
        self.te_parts = [p for p in self.family.text_encoder_parts[:len(tes)] if p.trainable]
        trained = [te for p, te in zip(self.family.text_encoder_parts, tes, strict=False)
                   if p.trainable]
        # Names that match nothing are refused (exit 2) before anything is attached or trained.
        check_target_modules(unet, cfg.targets, what=f"UNet of {cfg.base_model}",
                             file=cfg.source, default=DEFAULT_IMAGE_TARGETS)
        if cfg.train_text_encoder:
            for part, te in zip(self.te_parts, trained, strict=True):
                check_target_modules(te, TE_TARGETS, what=f"{part.name} of {cfg.base_model}",
                                     file=cfg.source, key="train_text_encoder")
        for module in (unet, vae, *tes):
            module.requires_grad_(False)
            module.to(device)
        vae.eval()
        for te in tes:
            te.eval()
        seed_everything(cfg.seed)
        from lora_kernel.training.adapters import is_plain_lora, unet_adapter_config
        self.unet_config = (LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha,
                                       lora_dropout=cfg.lora_dropout,
                                       init_lora_weights="gaussian", target_modules=cfg.targets)
                            if is_plain_lora(cfg) else unet_adapter_config(cfg, unet))
        unet.add_adapter(self.unet_config)
        self.te_config = None
        if cfg.train_text_encoder:
            self.te_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha,
                                        lora_dropout=cfg.lora_dropout,
                                        init_lora_weights="gaussian", target_modules=TE_TARGETS)
            for te in trained:
                attach_text_encoder_lora(te, self.te_config)
                te.train()
        if cfg.init:
            load_init_adapter(cfg, unet, dict(zip((p.name for p in self.te_parts), trained,
                                                  strict=True)), denoiser=self.family.denoiser)
        keep_trainable_fp32(unet, *tes)  # frozen weights may be half precision, LoRA is not
        unet.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in trained:
                    te.gradient_checkpointing_enable()
        from lora_kernel.training.losses import training_scheduler
        self.scheduler = training_scheduler(cfg, comps.noise_scheduler)  # zero_terminal_snr
        from lora_kernel.training.image_eval import HeldOut, held_out_rows
        train_rows, held_rows = held_out_rows(cfg)  # validation_split / validation_dir
        self.examples = load_examples(cfg, train_rows)
        self.n_train = len(self.examples)  # the held-out images follow, never trained on
        if held_rows:
            self.examples += load_examples(cfg, held_rows, reg=False)
        from lora_kernel.training.captions import CaptionHabits
        self.habits = CaptionHabits(cfg)  # per-step captions (shuffle, dropout)
        comps.clip_skip = cfg.clip_skip  # read by the family's encode_prompt
        self.captions_seen: list[list[str]] = []  # what the text encoder saw, per micro-batch
        self._training = True
        self.input_ids = self.family.tokenize(comps, [e.caption for e in self.examples])
        self.latents: list[torch.Tensor] | None = None
        self.flipped: list[torch.Tensor] | None = None
        self.te_states: list[torch.Tensor] | None = None
        self.pooled: list[torch.Tensor] | None = None
        self.time_ids = self._time_ids(flipped=False)
        self.time_ids_flipped = self._time_ids(flipped=True)
        self.cache_hit = False
        if cfg.cache_latents:
            self._load_or_build_cache(cache_dir, dataset_version)
        self.held_out = HeldOut(self, self.n_train) if held_rows else None
        if self.te_states is not None and device.type == "cuda":
            # prompts are cached: the frozen encoders (T5-XXL: ~9 GB) leave the GPU for the
            # loop; sample_grid brings them back
            for te in tes:
                te.to("cpu")
            torch.cuda.empty_cache()

    def _time_ids(self, *, flipped: bool) -> list | None:
        ids = [self.family.time_ids(e, flipped=flipped) for e in self.examples]
        return None if any(t is None for t in ids) else ids

    @property
    def trained_text_encoders(self) -> list:
        """The text encoders ``train_text_encoder`` trains, in ``te_parts`` order."""
        return [te for p, te in zip(self.family.text_encoder_parts, self.comps.text_encoders,
                                    strict=False) if p.trainable]

    # cache ----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.comps.vae
        dist = vae.encode(pixels.unsqueeze(0).to(self.device, vae.dtype)).latent_dist
        return self.family.latents_from_vae(vae, dist.mean).squeeze(0).float().cpu()

    def _encode_text(self, batch: list[int], captions: list[str] | None = None):
        """The prompts of ``batch`` (or ``captions``, this step's) through the family's text
        encoder(s)."""
        if captions is not None:
            return self.family.encode_prompt(self.comps,
                                             self.family.tokenize(self.comps, captions))
        return self.family.encode_prompt(self.comps, [ids[batch] for ids in self.input_ids])

    def _load_or_build_cache(self, cache_dir: Path | None, dataset_version: str) -> None:
        key = cache_key(self.cfg, dataset_version, self.comps.sha256, self.family.name)
        path = Path(cache_dir) / f"sd-{key}.safetensors" if cache_dir else None
        n = len(self.examples)
        if path is not None and path.exists():
            tensors = load_file(str(path))
            self.latents = [tensors[f"latent.{i}"] for i in range(n)]
            if self.cfg.random_flip:
                self.flipped = [tensors[f"latent_flip.{i}"] for i in range(n)]
            if not self.cfg.train_text_encoder:
                self.te_states = [tensors[f"te.{i}"] for i in range(n)]
                if "pooled.0" in tensors:
                    self.pooled = [tensors[f"pooled.{i}"] for i in range(n)]
            if "time_ids.0" in tensors:
                self.time_ids = [tensors[f"time_ids.{i}"] for i in range(n)]
                self.time_ids_flipped = [tensors[f"time_ids_flip.{i}"] for i in range(n)]
            self.cache_hit = True
            self.log(f"latent cache hit: {path}")
            return
        tensors = {}
        self.latents = [self._encode_pixels(e.pixels) for e in self.examples]
        tensors.update({f"latent.{i}": t for i, t in enumerate(self.latents)})
        if self.cfg.random_flip:
            self.flipped = [self._encode_pixels(torch.flip(e.pixels, dims=[2]))
                            for e in self.examples]
            tensors.update({f"latent_flip.{i}": t for i, t in enumerate(self.flipped)})
        if not self.cfg.train_text_encoder:
            with torch.no_grad():
                embeds = self._encode_text(list(range(n)))
            self.te_states = [s.float().cpu().clone() for s in embeds.hidden]
            tensors.update({f"te.{i}": t for i, t in enumerate(self.te_states)})
            if embeds.pooled is not None:
                self.pooled = [s.float().cpu().clone() for s in embeds.pooled]
                tensors.update({f"pooled.{i}": t for i, t in enumerate(self.pooled)})
        if self.time_ids is not None and self.time_ids_flipped is not None:
            tensors.update({f"time_ids.{i}": t for i, t in enumerate(self.time_ids)})
            tensors.update({f"time_ids_flip.{i}": t
                            for i, t in enumerate(self.time_ids_flipped)})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"key": key,
                                                       "dataset_version": dataset_version})
            self.log(f"latent cache written: {path}")

    # Task protocol --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.comps.unet.parameters() if p.requires_grad],
                   "lr": self.cfg.learning_rate}]
        if self.cfg.train_text_encoder:
            for part, te in zip(self.te_parts, self.trained_text_encoders, strict=True):
                groups.append({"params": [p for p in te.parameters() if p.requires_grad],
                               "lr": text_encoder_lr(self.cfg, part.lr_key)})
        return groups

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {f"unet.{n}": p for n, p in self.comps.unet.named_parameters()
                 if p.requires_grad}
        if self.cfg.train_text_encoder:
            for part, te in zip(self.te_parts, self.trained_text_encoders, strict=True):
                named.update({f"{part.name}.{n}": p for n, p in te.named_parameters()
                              if p.requires_grad})
        return named

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in torch.randperm(self.n_train, generator=gen).tolist():
            by_bucket.setdefault(self.examples[i].bucket, []).append(i)
        from lora_kernel.training.distributed import global_batch_size
        b = global_batch_size(self.cfg)  # data-parallel: the batch over all ranks
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            batches.extend(idx[i:i + b] for i in range(0, len(idx), b))
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def batch_size_of(self, batch: list[int]) -> int:
        return len(batch)

    def eval_batches(self) -> list[list[int]]:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.examples[:self.n_train]):
            by_bucket.setdefault(e.bucket, []).append(i)
        b = self.cfg.batch_size
        return [idx[i:i + b] for bucket in sorted(by_bucket)
                for idx in [by_bucket[bucket]] for i in range(0, len(idx), b)]

    def after_step(self, step: int, n_steps: int, writer, output_dir: Path) -> None:
        """The loop's periodic hook: the held-out loss (image_eval.py)."""
        if self.held_out is not None:
            self.held_out.after_step(step, n_steps, writer)

    def train_mode(self, enabled: bool) -> None:
        self._training = enabled  # evaluation sees the captions as written
        self.comps.unet.train(enabled)
        for te in self.trained_text_encoders:
            te.train(enabled and self.cfg.train_text_encoder)

    def loss(self, batch: list[int], generator: torch.Generator,
             shard=None) -> torch.Tensor:
        """The batch's loss. ``shard`` (data-parallel, :mod:`lora_kernel.training.distributed`):
        every random draw is made for the whole global ``batch``, then only this rank's slice
        is denoised, its loss weighted so the ranks' mean gradient is the whole batch's."""
        cfg, dev = self.cfg, self.device
        flips = (torch.rand(len(batch), generator=generator) < 0.5 if cfg.random_flip
                 else torch.zeros(len(batch), dtype=torch.bool))
        if self.latents is not None:
            lat = [self.flipped[i] if f else self.latents[i]
                   for i, f in zip(batch, flips.tolist(), strict=True)]
            latents = torch.stack(lat).to(dev)
        else:
            pixels = torch.stack([self.examples[i].pixels for i in batch])
            if cfg.random_flip:
                pixels = torch.where(flips[:, None, None, None], torch.flip(pixels, dims=[3]),
                                     pixels)
            with torch.no_grad():
                vae = self.comps.vae
                latents = self.family.latents_from_vae(vae, vae.encode(
                    pixels.to(dev, vae.dtype)).latent_dist.sample(generator=generator))
            latents = latents.float()
        noisy = self.family.noisy_batch(cfg, self.scheduler, latents, generator)
        captions = None
        if self.habits.active and self._training:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            captions = self.habits.captions([self.examples[i].caption for i in batch], seed)
            self.captions_seen.append(captions)
        n_global = len(batch)
        if shard is not None:
            part = shard.part(n_global)
            if part.stop == part.start:  # a short last batch: nothing for this rank
                from lora_kernel.training.distributed import zero_loss
                return zero_loss(list(self.named_trainable().values()))
            batch, flips = batch[part], flips[part]
            noisy = self.family.shard_batch(noisy, part, n_global)
            captions = captions[part] if captions is not None else None
        if captions is None and self.te_states is not None and not cfg.train_text_encoder:
            embeds = PromptEmbeds(
                hidden=torch.stack([self.te_states[i] for i in batch]).to(dev),
                pooled=(torch.stack([self.pooled[i] for i in batch]).to(dev)
                        if self.pooled is not None else None))
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder):
                embeds = self._encode_text(batch, captions)
        time_ids = None
        if self.time_ids is not None and self.time_ids_flipped is not None:
            time_ids = torch.stack([(self.time_ids_flipped if f else self.time_ids)[i]
                                    for i, f in zip(batch, flips.tolist(), strict=True)])
        pred = self.family.predict(self.comps, noisy, embeds, time_ids)
        weights = [self.examples[i].weight for i in batch]
        if any(w != 1.0 for w in weights):  # regularization images: prior_loss_weight
            noisy.extra["example_weights"] = torch.tensor(weights)
        loss = self.family.batch_loss(pred, noisy)
        return loss if shard is None else loss * shard.weight(n_global)


# -- samples ---------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(cfg, comps, out_dir: Path, *, device: torch.device) -> dict:
    """Render each sample prompt at fixed seeds, without and with the LoRA, as one grid.

    Returns what ``samples.json`` holds: ``grid`` (its path), ``prompts``, ``seeds``,
    ``columns`` (per column: group "base" or "LoRA", seed), ``layout``, the grid geometry of
    :func:`labelled_grid`, and ``mean_abs_diff``: the mean absolute pixel difference (0..255)
    between the two halves, how much the LoRA changes images; and, when the prompts name the
    demo's style, ``measures``: its style and prompt-adherence measures
    (:func:`lora_kernel.training.style_metrics.measure_grid`).
    """
    from lora_kernel.training.families import family_named
    from lora_kernel.training.style_metrics import demo_style_prompts, measure_grid
    prompts = cfg.sample_prompts or ["a sample"]
    unet, tes = comps.unet, comps.text_encoders
    was_training = unet.training
    unet.eval()
    for te in tes:
        te.to(device).eval()
    family = comps.family or family_named("sd15")
    pipe = family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    rows, diffs = [], []
    for prompt in prompts:
        row = []
        for with_lora in (False, True):
            for seed in cfg.sample_seeds:
                _set_adapters([unet, *tes], with_lora)
                gen = torch.Generator(device="cpu").manual_seed(int(seed))
                image = pipe(prompt, num_inference_steps=cfg.sample_steps, generator=gen,
                             height=cfg.resolution, width=cfg.resolution,
                             guidance_scale=5.0, output_type="np",
                             **family.sample_kwargs(comps)).images[0]
                row.append(image)
        half = len(cfg.sample_seeds)
        diffs.extend(float(np.abs(a - b).mean() * 255)
                     for a, b in zip(row[:half], row[half:], strict=True))
        rows.append(row)
    _set_adapters([unet, *tes], True)
    if was_training:
        unet.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "grid.png"
    cells = [[Image.fromarray((im * 255).round().clip(0, 255).astype(np.uint8)) for im in r]
             for r in rows]
    grid, geometry = labelled_grid(cells, prompts)
    grid.save(path)
    seeds = list(cfg.sample_seeds)
    info = {"grid": str(path), "prompts": prompts, "seeds": seeds,
            "columns": [{"column": i, "group": group, "lora": group == "LoRA", "seed": seed}
                        for i, (group, seed) in enumerate(
                            (g, s) for g in GRID_GROUPS for s in seeds)],
            "layout": "header row: 'base' over the seeds without the LoRA, 'LoRA' over the "
                      "same seeds with it; left margin: each row's prompt; one row per prompt",
            **geometry, "mean_abs_diff": float(np.mean(diffs))}
    if demo_style_prompts(prompts):  # the demo style's measures (style_metrics)
        info["measures"] = measure_grid(rows, prompts, half)
    (out_dir / "samples.json").write_text(json.dumps(info, indent=1))
    return info


GRID_GROUPS = ("base", "LoRA")


def labelled_grid(rows: list[list[Image.Image]], prompts: list[str],
                  groups: tuple[str, ...] = GRID_GROUPS) -> tuple[Image.Image, dict]:
    """One grid of sample images with a header row naming each column group ("base" over the
    images without the LoRA, "LoRA" over those with it) and each row's prompt, wrapped and
    truncated to fit, in a left margin.

    ``rows`` holds one list of equally sized images per prompt, its columns split evenly into
    ``groups``. Drawn with PIL's built-in bitmap font (no font file, nothing fetched), or
    Debian's CJK font when a prompt has characters outside Latin-1, and nothing
    time-dependent, so the same images give the same bytes. Returns the grid and its
    geometry in pixels (``cell`` [w, h], ``header_height``, ``margin_width``): cell (r, c)
    starts at (margin_width + c * w, header_height + r * h).
    """
    from PIL import ImageDraw, ImageFont

    if len(rows) != len(prompts) or not rows or len(rows[0]) % len(groups):
        raise ValueError(f"{len(rows)} rows for {len(prompts)} prompts; each row's columns "
                         f"must split evenly into {groups}")
    from lora_kernel.training.fonts import caption_font, cjk_font_file

    clean = _latin1
    if cjk_font_file() is not None and any(_latin1(t) != " ".join(str(t).split())
                                           for t in (*prompts, *groups)):
        font = caption_font(11)  # prompts in Chinese, Japanese, Korean...: Debian's CJK font

        def clean(text: str) -> str:
            return " ".join(str(text).split())
    else:
        loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
        font = loader() if loader is not None else ImageFont.load_default()
    cell_w, cell_h = rows[0][0].size
    ncols, pad = len(rows[0]), 3
    line_h = font.getbbox("Ag")[3] + 2
    header_h = line_h + 2 * pad
    texts = [clean(p) for p in prompts]
    widest = max(font.getlength(t) for t in texts)
    margin_w = int(min(192, max(64, widest + 2 * pad + 1)))  # + 1: the rule at its right
    grid = Image.new(rows[0][0].mode, (margin_w + ncols * cell_w, header_h + len(rows) * cell_h),
                     "white")
    draw = ImageDraw.Draw(grid)
    ink, rule = "black", (160, 160, 160) if grid.mode == "RGB" else 160
    group_w = ncols // len(groups) * cell_w
    for i, name in enumerate(groups):
        x0 = margin_w + i * group_w
        label = _fit_lines(clean(name), font, group_w - 2, 1)
        if label:
            draw.text((x0 + (group_w - font.getlength(label[0])) // 2, pad), label[0],
                      fill=ink, font=font)
        if i:
            draw.line([(x0, 0), (x0, header_h - 1)], fill=rule)
    draw.line([(0, header_h - 1), (grid.width - 1, header_h - 1)], fill=rule)
    draw.line([(margin_w - 1, 0), (margin_w - 1, grid.height - 1)], fill=rule)
    max_lines = max(1, (cell_h - 2 * pad) // line_h)
    for r, (row, text) in enumerate(zip(rows, texts, strict=True)):
        y0 = header_h + r * cell_h
        for c, image in enumerate(row):
            grid.paste(image, (margin_w + c * cell_w, y0))
        for k, line in enumerate(_fit_lines(text, font, margin_w - 2 * pad - 1, max_lines)):
            draw.text((pad, y0 + pad + k * line_h), line, fill=ink, font=font)
    return grid, {"cell": [cell_w, cell_h], "header_height": header_h, "margin_width": margin_w}


def _latin1(text: str) -> str:
    """``text`` in the bitmap font's character set: whitespace runs as one space, anything
    outside Latin-1 as "?"."""
    return " ".join(str(text).split()).encode("latin-1", "replace").decode("latin-1")


def _fit_lines(text: str, font, width: float, max_lines: int) -> list[str]:
    """``text`` wrapped at spaces (a word wider than ``width`` is cut) into at most
    ``max_lines`` lines of at most ``width`` pixels; cut text ends in "..."."""
    def fits(line: str) -> bool:
        return font.getlength(line) <= width

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += " " + word
            continue
        while not fits(word) and len(lines) <= max_lines:
            n = max(1, sum(1 for k in range(1, len(word) + 1) if fits(word[:k])))
            lines.append(word[:n])
            word = word[n:]
        if word:
            lines.append(word)
        if len(lines) > max_lines:
            break
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and not fits(last + "..."):
        last = last[:-1]
    tail = last.rstrip() + "..."
    return lines[:max_lines - 1] + ([tail] if fits(tail) else [])


def attach_text_encoder_lora(text_encoder, config, adapter_name: str = "default") -> None:
    """Attach a trainable LoRA to the CLIP text encoder with peft's own
    ``inject_adapter_in_model`` (what transformers' ``add_adapter`` wraps: transformers 5.x
    gates that method on peft >= 0.22, which the pinned peft 0.21 is not), and mark it as
    transformers' ``add_adapter`` would, so diffusers and transformers see a loaded adapter.
    Unlike ``add_adapter`` it leaves ``base_model_name_or_path`` unset, as the UNet's is: the
    adapter file then records no local path, and peft never looks the name up on the Hub."""
    from peft import inject_adapter_in_model
    inject_adapter_in_model(config, text_encoder, adapter_name)
    text_encoder._hf_peft_config_loaded = True


def _set_adapters(models: list, enabled: bool) -> None:
    """Switch every LoRA layer of ``models`` (UNet, text encoders) on or off (peft's layer
    API, which neither diffusers' nor transformers' peft version gates apply to)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for model in models:
        if getattr(model, "peft_config", None):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.enable_adapters(enabled)


def text_encoder_lr(cfg, key: str) -> float:
    """The learning rate of a text encoder: its own key (``text_encoder_lr``,
    ``text_encoder_2_lr``), else ``text_encoder_lr`` (one for both), else ``learning_rate``."""
    return (getattr(cfg, key, None) or cfg.text_encoder_lr or cfg.learning_rate)


def load_init_adapter(cfg, unet, text_encoders: dict, denoiser: str = "unet") -> None:
    """Copy the LoRA weights of ``cfg.init`` (a diffusers-format adapter, checked by the
    validator) into the freshly attached LoRA layers of ``unet`` and the text encoders
    (``{component name: model}``); ``denoiser``: the component name ``unet`` has in the file
    (``transformer`` for Flux and SD3.5). A weight that has no layer here, or a layer left without
    a weight, is a :class:`ConfigError` naming ``init``: the adapter was trained with other
    target modules or without ``train_text_encoder``."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft import set_peft_model_state_dict

    from lora_kernel.common.errors import ConfigError
    weights = load_file(str(cfg.init))
    if any(k.startswith("lora_unet_") for k in weights):  # kohya's network_weights
        from lora_kernel.training.convert import kohya_to_diffusers
        scale = cfg.alpha / cfg.lora_rank  # the file's alpha/rank is baked in: undo ours
        weights = {k: (v / scale if ".lora_B." in k or "lora_linear_layer.up" in k else v)
                   for k, v in kohya_to_diffusers(weights).items()}
    models = {denoiser: unet, **(text_encoders if cfg.train_text_encoder else {})}
    for name, model in models.items():
        part = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        # diffusers' file names (lora.down / lora_linear_layer.down) back to peft's
        part = (convert_unet_state_dict_to_peft(part) if name == denoiser
                else convert_state_dict_to_peft(part))
        result = set_peft_model_state_dict(model, part)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if result.unexpected_keys or missing or not part:
            raise ConfigError(
                f"{cfg.init} does not fit this run's {name} LoRA layers ({len(part)} weights; "
                f"unexpected {list(result.unexpected_keys)[:2]}, missing {missing[:2]}); fix: "
                f"use the target_modules and train_text_encoder it was trained with",
                file=cfg.source, key="init")
