"""Training entry point: ``train(cfg)`` runs an image or text LoRA end to end.

Outputs under ``cfg.output_dir``::

    <output_name>.safetensors         image: diffusers/PEFT format (load_lora_weights)
    <output_name>_kohya.safetensors   image: kohya/A1111 format (<lora:name:w>)
    <output_name>/                    text: PEFT adapter folder (PeftModel.from_pretrained)
    checkpoints/checkpoint-N/         resumable checkpoints (every save_steps)
    tb/                               TensorBoard event files
    samples/                          grid.png (image) or completions.json/.md (text)
    training_summary.json             losses, timings, digests, files

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.paths import lora_home
from lora_kernel.common.version import version_info
from lora_kernel.training.data import dataset_digests, dataset_version
from lora_kernel.training.precision import (
    torch_dtype,
    trainable_dtype_name,
    vae_dtype_name,
    weight_dtype_name,
)

if TYPE_CHECKING:
    from lora_kernel.training.loop import LoopResult

__all__ = ["TrainResult", "TaskOutcome", "train", "pick_device", "run_outputs",
           "prepare_output_dir"]

logger = logging.getLogger(__name__)

# What a run writes into output_dir besides its adapters (see the module docstring).
RUN_OUTPUTS = ("checkpoints", "tb", "samples", "training_summary.json", "loss_curve.png",
               "snapshots")


@dataclass
class TrainResult:
    """What a finished training run produced.

    ``live`` (not serialised, not compared, not in the repr) holds the in-memory trained
    objects: for image runs ``{"components": SDComponents}`` with the LoRA attached, for text
    runs ``{"model": PeftModel, "tokenizer": ...}`` — for notebooks that want to try the adapter
    at once. :meth:`to_dict` leaves it out.
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
    snapshots: list[dict] = field(default_factory=list)  # loadable adapters saved mid-run
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    cache_hit: bool = False
    resumed_from: str | None = None
    model_family: str | None = None  # image: sd15, sd2, sdxl (lora_kernel.training.families)
    base_weight_dtype: str = "float32"  # the frozen base model's weights (mixed_precision)
    trainable_dtype: str = "float32"  # the LoRA weights the optimizer trains
    summary_path: str = ""
    distributed: dict = field(default_factory=dict)  # num_processes > 1: ranks, batch, lr
    live: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``live`` as plain data, in declaration order (``asdict`` without
        deep-copying the live models)."""
        data = asdict(replace(self, live={}))
        del data["live"]
        return data

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


def run_outputs(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: checkpoints/, tb/, samples/, the summary,
    the loss curve, adapter files (``*.safetensors``) and PEFT adapter folders. Other files
    are not a run's and are left alone."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for item in sorted(out.iterdir()):
        if (item.name in RUN_OUTPUTS
                or (item.is_file() and item.suffix == ".safetensors")
                or (item.is_dir() and (item / "adapter_config.json").is_file())):
            found.append(item)
    return found


def prepare_output_dir(cfg, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make ``cfg.output_dir`` ready for a new run (what ``lora train`` does first).

    Resuming continues the run found there. Otherwise an ``output_dir`` that already holds a
    run (:func:`run_outputs`) is refused with a :class:`ConfigError`, so a second run never
    mixes its checkpoints, TensorBoard logs and adapters into the first one's; with
    ``overwrite`` that run's outputs are deleted first (nothing else in the folder is).
    """
    if resume and overwrite:
        raise ConfigError("give either --resume (continue the run in output_dir) or "
                          "--overwrite (start it again), not both", file=cfg.source,
                          key="output_dir")
    found = [] if resume else run_outputs(cfg.output_dir)
    if not found:
        return
    if not overwrite:
        names = " ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ConfigError(f"output_dir {cfg.output_dir} already holds a run ({names}); fix: "
                          f"--resume to continue, --overwrite to start again, or another "
                          f"output_dir", file=cfg.source, key="output_dir")
    for item in found:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


LOCK_NAME = ".lora-train.lock"


@contextmanager
def output_dir_lock(output_dir: str | Path, *, source: str | None = None) -> Iterator[None]:
    """Hold ``output_dir`` for one training: a second ``lora train`` (or notebook) on the same
    folder is refused with a :class:`ConfigError` naming the holder (pid, user, host, since)
    instead of both writing their checkpoints, adapters and summaries into it. The lock is an
    ``flock`` on ``<output_dir>/.lora-train.lock``: the kernel releases it when the holder
    ends, however it ends (kill -9 included)."""
    import fcntl
    import getpass
    import socket

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"output_dir {out} is in use by a training still running "
                              f"({holder}); fix: wait for it to end, or use another "
                              f"output_dir", file=source, key="output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()}, user {getpass.getuser()}, host "
                       f"{socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                       ).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def pick_device() -> torch.device:
    """CUDA when available (the spawner sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(cfg, *, resume: bool | str | Path | None = None, progress: bool = True,
          interrupt_at_step: int | None = None,
          on_step: Callable[[int, float, float], None] | None = None,
          home: str | Path | None = None, samples: bool = True,
          log: Callable[[str], None] = logger.info) -> TrainResult:
    """Train the LoRA described by a validated :class:`~lora_kernel.training.config.TrainConfig`.

    ``log`` receives the run's notes (latent cache hit / written); by default they go to this
    module's :mod:`logging` logger at INFO.

    Raises :class:`~lora_kernel.common.errors.TrainingInterrupted` (after saving a checkpoint) on
    Ctrl-C / SIGTERM, :class:`~lora_kernel.common.errors.UnsafeModelError` for refused models.
    """
    from lora_kernel.training.dist_launch import wants_launch
    if wants_launch(cfg):  # num_processes > 1: start the ranks, return rank 0's result
        from lora_kernel.training.dist_launch import launch
        return TrainResult(**launch(cfg, resume=resume, progress=progress, samples=samples,
                                    home=home, log=log))
    from lora_kernel.training.distributed import is_rank_zero
    from lora_kernel.training.loop import apply_determinism, run_loop
    device = pick_device()
    deterministic = apply_determinism(cfg, device)  # before any kernel runs
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    digests = dataset_digests(cfg)
    version = dataset_version(cfg, digests)
    # A recorded run's cache is its own (steps.cleanenv: LORA_CACHE_DIR in its work folder),
    # never one in the user's home that could hold edited latents.
    cache_dir = Path(os.environ.get("LORA_CACHE_DIR") or lora_home(home) / "cache")
    started = time.time()
    if cfg.task == "image":
        outcome = _train_image(
            cfg, device=device, out=out, cache_dir=cache_dir, version=version, digests=digests,
            resume=resume, progress=progress, interrupt_at_step=interrupt_at_step,
            on_step=on_step, samples=samples, log=log, run_loop=run_loop)
    else:
        outcome = _train_text(
            cfg, device=device, out=out, version=version, digests=digests, resume=resume,
            progress=progress, interrupt_at_step=interrupt_at_step, on_step=on_step,
            samples=samples, run_loop=run_loop)
    loop = outcome.loop
    res = TrainResult(task=cfg.task, output_dir=str(out), adapter_files=outcome.adapter_files,
                      losses=loop.losses, steps=loop.steps, seconds=loop.seconds,
                      examples_per_second=loop.examples_per_second,
                      base_model_sha256=outcome.base_model_sha256, dataset_version=version,
                      dataset_digests=digests if cfg.record_dataset_paths else {},
                      samples=outcome.samples, cache_hit=outcome.cache_hit,
                      snapshots=outcome.snapshots,
                      eval_loss_before=loop.eval_loss_before,
                      eval_loss_after=loop.eval_loss_after,
                      resumed_from=loop.resumed_from,
                      model_family=outcome.model_family,
                      base_weight_dtype=outcome.base_weight_dtype,
                      trainable_dtype=outcome.trainable_dtype, live=outcome.live)
    from lora_kernel.training.dist_launch import distributed_facts
    res.distributed = distributed_facts(cfg)
    if not is_rank_zero():
        return res  # rank 0 alone writes the summary
    summary = res.to_dict()
    summary.update({"config": cfg.to_dict(), "started": started, "ended": time.time(),
                    "device": str(device), "deterministic": deterministic,
                    "version": version_info(),
                    "dataset_file_count": len(digests)})
    summary.update(outcome.summary)
    if getattr(cfg, "reg_data_dir", None):  # the regularization images' own version
        from lora_kernel.training.reg import reg_version
        summary["reg_dataset_version"] = reg_version(digests)
    if getattr(cfg, "init_adapter", None):  # text: the adapter it continued, by content
        from lora_kernel.training.text_adapter import init_adapter_sha256
        summary["init_adapter_sha256"] = init_adapter_sha256(cfg)
    path = out / "training_summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    res.summary_path = str(path)
    return res


@dataclass(frozen=True)
class TaskOutcome:
    """What one task's training (:func:`_train_image` / :func:`_train_text`) hands back to
    :func:`train`, which adds the dataset and timing facts to make the :class:`TrainResult`."""

    loop: LoopResult
    adapter_files: dict[str, str]
    samples: dict
    cache_hit: bool
    base_model_sha256: str
    live: dict[str, Any]
    base_weight_dtype: str
    trainable_dtype: str
    model_family: str | None = None
    snapshots: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # task facts for the summary file


def _train_image(cfg, *, device, out, cache_dir, version, digests, resume, progress,
                 interrupt_at_step, on_step, samples, log, run_loop) -> TaskOutcome:
    from lora_kernel.training.adapters import is_plain_lora
    from lora_kernel.training.export import adapter_metadata, save_diffusers_lora, save_kohya_lora
    from lora_kernel.training.families import family_of
    from lora_kernel.training.image import ImageTask, sample_grid
    from lora_kernel.training.models import load_sd_components
    family = family_of(cfg.base_model)
    dtype = weight_dtype_name(cfg)
    vae = vae_dtype_name(cfg, vae_fp16_overflows=family.vae_fp16_overflows)
    if vae != dtype and cfg.vae_dtype == "auto":
        log(f"note: the {family.title} VAE overflows in {dtype}; it runs in {vae} "
            f"(set vae_dtype to choose)")
    comps = load_sd_components(cfg.base_model, dtype=torch_dtype(dtype),
                               vae_dtype=torch_dtype(vae), quantization=cfg.quantization)
    from lora_kernel.training.snapshots import Snapshots
    task = ImageTask(cfg, comps, device=device,
                     cache_dir=cache_dir if cfg.cache_latents else None,
                     dataset_version=version, log=log)
    family = comps.family
    te, te2 = ((comps.text_encoder, comps.text_encoder_2) if cfg.train_text_encoder
               else (None, None))

    def export(folder: Path, stem: str, steps: int, epoch: int | None) -> dict[str, str]:
        meta = adapter_metadata(cfg, base_model_sha256=comps.sha256, dataset_version=version,
                                dataset_digests=digests,
                                extra={"ss_num_train_steps": str(steps),
                                       **({"ss_epoch": str(epoch)} if epoch else {}),
                                       **family.metadata()})
        if not is_plain_lora(cfg):  # LoCon / LoHa / LoKr / DoRA: LyCORIS names + PEFT
            from lora_kernel.training.adapters import save_lycoris, save_peft_unet
            return {"peft": str(save_peft_unet(folder / f"{stem}_peft.safetensors",
                                               comps.unet, task.unet_config, meta)),
                    "kohya": str(save_lycoris(folder / f"{stem}_kohya.safetensors", cfg,
                                              comps.unet, task.unet_config, te, meta,
                                              text_encoder_2=te2, family=family))}
        return {
            "diffusers": str(save_diffusers_lora(folder / f"{stem}.safetensors", comps.unet,
                                                 te, task.unet_config, task.te_config, meta,
                                                 text_encoder_2=te2,
                                                 pipeline_class=family.pipeline_class,
                                                 denoiser=family.denoiser)),
            "kohya": str(save_kohya_lora(folder / f"{stem}_kohya.safetensors", comps.unet,
                                         te, cfg.alpha, meta, text_encoder_2=te2,
                                         family=family)),
        }

    snaps = Snapshots(cfg, out, export, task=task,
                      sample=lambda folder: sample_grid(cfg, comps, folder, device=device))
    from lora_kernel.training.distributed import is_rank_zero
    writer = is_rank_zero()  # data-parallel: rank 0 alone exports, samples and snapshots
    result = run_loop(cfg, task, output_dir=out, device=device, resume=resume,
                      on_step=on_step, interrupt_at_step=interrupt_at_step, progress=progress,
                      after_step=snaps.after_step if snaps.wanted and writer else None)
    samples = samples and writer
    files = export(out, cfg.output_name, result.steps, None) if writer else {}
    info = sample_grid(cfg, comps, out / "samples", device=device) if samples else {}
    return TaskOutcome(loop=result, adapter_files=files, samples=info, cache_hit=task.cache_hit,
                       snapshots=snaps.entries,
                       base_model_sha256=comps.sha256, live={"components": comps},
                       base_weight_dtype=dtype, model_family=family.name,
                       trainable_dtype=trainable_dtype_name(task.named_trainable()),
                       summary={"held_out_loss": task.held_out.history} if task.held_out
                       else {})


def _train_text(cfg, *, device, out, version, digests, resume, progress, interrupt_at_step,
                on_step, samples, run_loop) -> TaskOutcome:
    from lora_kernel.training.export import adapter_metadata, save_peft_adapter
    from lora_kernel.training.models import model_sha256
    from lora_kernel.training.text import TextTask, load_text_model, sample_completions
    from lora_kernel.training.text_quant import base_dtype_label
    dtype = weight_dtype_name(cfg)
    model, tokenizer = load_text_model(cfg, dtype=torch_dtype(dtype), device=device)
    sha = model_sha256(cfg.base_model)
    if cfg.objective != "sft":  # DPO / ORPO on chosen/rejected pairs
        from lora_kernel.training.text_pref import PreferenceTask
        task = PreferenceTask(cfg, model, tokenizer, device=device)
    else:
        task = TextTask(cfg, model, tokenizer, device=device)
    result = run_loop(cfg, task, output_dir=out, device=device, resume=resume,
                      on_step=on_step, interrupt_at_step=interrupt_at_step, progress=progress)
    from lora_kernel.training.text_adapter import init_adapter_sha256
    extra = {"ss_num_train_steps": str(result.steps)}
    if cfg.init_adapter:  # the adapter this one continued, by content
        extra["lora_enclave.init_adapter_sha256"] = str(init_adapter_sha256(cfg))
    meta = adapter_metadata(cfg, base_model_sha256=sha, dataset_version=version,
                            dataset_digests=digests, extra=extra)
    from lora_kernel.training.distributed import is_rank_zero
    files, samples = {}, samples and is_rank_zero()  # data-parallel: rank 0 alone writes
    if is_rank_zero():
        files = {"peft": str(save_peft_adapter(out / cfg.output_name, task.model, meta))}
    info = sample_completions(cfg, task, out / "samples") if samples else {}
    return TaskOutcome(loop=result, adapter_files=files, samples=info, cache_hit=False,
                       base_model_sha256=sha, live={"model": task.model, "tokenizer": tokenizer},
                       base_weight_dtype=base_dtype_label(cfg, dtype),
                       summary={"held_out_loss": task.eval_history} if task.held else {},
                       trainable_dtype=trainable_dtype_name(task.named_trainable()))
