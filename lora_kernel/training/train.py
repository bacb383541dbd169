"""Training entry point: ``train(cfg)`` runs an image or text LoRA end to end.

Outputs under ``cfg.output_dir``::

    <output_name>.safetensors         image: diffusers/PEFT format (load_lora_weights)
    <output_name>_kohya.safetensors   image: kohya/A1111 format (<lora:name:w>)
    <output_name>/                    text: PEFT adapter folder (PeftModel.from_pretrained)
    checkpoints/checkpoint-N/         resumable checkpoints (every save_steps)
    tb/                               TensorBoard event files
    samples/                          grid.png (image) or completions.json/.md (text)
    training_summary.json             losses, timings, digests, files
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_kernel.common.paths import lora_home
from lora_kernel.common.version import version_info
from lora_kernel.training.data import dataset_digests, dataset_version

__all__ = ["TrainResult", "train", "pick_device"]


@dataclass
class TrainResult:
    """What a finished training run produced.

    ``live`` (not a field, not serialised) holds the in-memory trained objects: for image
    runs the :class:`~lora_kernel.training.models.SDComponents` with the LoRA attached, for text
    runs the PEFT model and tokenizer — for notebooks that want to try the adapter at once.
    """

    task: str
    output_dir: str
    adapter_files: dict[str, str]
    losses: list[float]
    steps: int
    seconds: float
    examples_per_second: float
    base_model_sha256: str
    dataset_version: str
    dataset_digests: dict[str, str]
    samples: dict = field(default_factory=dict)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    cache_hit: bool = False
    resumed_from: str | None = None
    summary_path: str = ""

    @property
    def first_loss(self) -> float:
        """Mean loss of the first tenth of the steps."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[:k]) / k

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k


def pick_device() -> torch.device:
    """CUDA when available (the spawner sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(cfg, *, resume: bool | str | Path | None = None, progress: bool = True,
          interrupt_at_step: int | None = None,
          on_step: Callable[[int, float, float], None] | None = None,
          home: str | Path | None = None, samples: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the LoRA described by a validated :class:`~lora_kernel.training.config.TrainConfig`.

    Raises :class:`~lora_kernel.common.errors.TrainingInterrupted` (after saving a checkpoint) on
    Ctrl-C / SIGTERM, :class:`~lora_kernel.common.errors.UnsafeModelError` for refused models.
    """
    from lora_kernel.training.loop import run_loop
    device = pick_device()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    digests = dataset_digests(cfg)
    version = dataset_version(cfg, digests)
    cache_dir = lora_home(home) / "cache"
    started = time.time()
    if cfg.task == "image":
        result, files, sample_info, cache_hit, model_sha, live = _train_image(
            cfg, device=device, out=out, cache_dir=cache_dir, version=version, digests=digests,
            resume=resume, progress=progress, interrupt_at_step=interrupt_at_step,
            on_step=on_step, samples=samples, log=log, run_loop=run_loop)
    else:
        result, files, sample_info, cache_hit, model_sha, live = _train_text(
            cfg, device=device, out=out, version=version, digests=digests, resume=resume,
            progress=progress, interrupt_at_step=interrupt_at_step, on_step=on_step,
            samples=samples, run_loop=run_loop)
    res = TrainResult(task=cfg.task, output_dir=str(out), adapter_files=files,
                      losses=result.losses, steps=result.steps, seconds=result.seconds,
                      examples_per_second=result.examples_per_second,
                      base_model_sha256=model_sha, dataset_version=version,
                      dataset_digests=digests if cfg.record_dataset_paths else {},
                      samples=sample_info, cache_hit=cache_hit,
                      eval_loss_before=result.eval_loss_before,
                      eval_loss_after=result.eval_loss_after,
                      resumed_from=result.resumed_from)
    res.live = live
    summary = asdict(res)
    summary.update({"config": cfg.to_dict(), "started": started, "ended": time.time(),
                    "device": str(device), "version": version_info(),
                    "dataset_file_count": len(digests)})
    path = out / "training_summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    res.summary_path = str(path)
    return res


def _train_image(cfg, *, device, out, cache_dir, version, digests, resume, progress,
                 interrupt_at_step, on_step, samples, log, run_loop):
    from lora_kernel.training.export import adapter_metadata, save_diffusers_lora, save_kohya_lora
    from lora_kernel.training.image import ImageTask, sample_grid
    from lora_kernel.training.models import load_sd_components
    comps = load_sd_components(cfg.base_model)
    task = ImageTask(cfg, comps, device=device,
                     cache_dir=cache_dir if cfg.cache_latents else None,
                     dataset_version=version, log=log)
    result = run_loop(cfg, task, output_dir=out, device=device, resume=resume,
                      on_step=on_step, interrupt_at_step=interrupt_at_step, progress=progress)
    meta = adapter_metadata(cfg, base_model_sha256=comps.sha256, dataset_version=version,
                            dataset_digests=digests,
                            extra={"ss_num_train_steps": str(result.steps),
                                   "modelspec.architecture": "stable-diffusion-v1/lora"})
    te = comps.text_encoder if cfg.train_text_encoder else None
    files = {
        "diffusers": str(save_diffusers_lora(out / f"{cfg.output_name}.safetensors", comps.unet,
                                             te, task.unet_config, task.te_config, meta)),
        "kohya": str(save_kohya_lora(out / f"{cfg.output_name}_kohya.safetensors", comps.unet,
                                     te, cfg.alpha, meta)),
    }
    info = sample_grid(cfg, comps, out / "samples", device=device) if samples else {}
    return result, files, info, task.cache_hit, comps.sha256, {"components": comps}


def _train_text(cfg, *, device, out, version, digests, resume, progress, interrupt_at_step,
                on_step, samples, run_loop):
    from lora_kernel.training.export import adapter_metadata, save_peft_adapter
    from lora_kernel.training.models import load_causal_lm, model_sha256
    from lora_kernel.training.text import TextTask, sample_completions
    model, tokenizer = load_causal_lm(cfg.base_model)
    sha = model_sha256(cfg.base_model)
    task = TextTask(cfg, model, tokenizer, device=device)
    result = run_loop(cfg, task, output_dir=out, device=device, resume=resume,
                      on_step=on_step, interrupt_at_step=interrupt_at_step, progress=progress)
    meta = adapter_metadata(cfg, base_model_sha256=sha, dataset_version=version,
                            dataset_digests=digests,
                            extra={"ss_num_train_steps": str(result.steps)})
    folder = save_peft_adapter(out / cfg.output_name, task.model, meta)
    files = {"peft": str(folder)}
    info = sample_completions(cfg, task, out / "samples") if samples else {}
    return result, files, info, False, sha, {"model": task.model, "tokenizer": tokenizer}
