"""The training loop shared by image and text LoRA: optimizer, LR schedule, gradient
accumulation, progress, TensorBoard, checkpoints and exact resume, Ctrl-C handling.

The task modules (:mod:`lora_kernel.training.image`, :mod:`lora_kernel.training.text`) supply a
:class:`Task`: the trainable parameters, the batches of an epoch and the loss of a batch.
Everything random the loop or a task draws comes from RNGs whose states are saved in
each checkpoint, and the data position is saved too, so a resumed run ends with the same
adapter as an uninterrupted one (on CPU, to float tolerance).

Checkpoints are pickle-free: tensors in ``.safetensors``, everything else in JSON.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_kernel.common.contract import PROGRESS_ENV
from lora_kernel.common.errors import ConfigError, TrainingInterrupted
from lora_kernel.training.optimizers import flatten_optimizer_state, unflatten_optimizer_state

# Keys whose change between a checkpoint and a resumed run is harmless.
RESUME_FREE_KEYS = {"max_train_steps", "epochs", "save_steps", "output_dir", "sample_prompts",
                    "sample_steps", "sample_seeds", "max_new_tokens", "logging_steps",
                    "output_name", "record_dataset_paths", "cache_latents", "keep_checkpoints",
                    "deterministic", "compile", "eval_steps", "save_every_n_epochs",
                    "sample_every_n_steps", "sample_every_n_epochs", "rendezvous_port"}


class Task(Protocol):
    """What a task module gives the loop."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (``{"params": [...], "lr": float}``)."""

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by stable name (checkpointed)."""

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of example indices) of ``epoch``, deterministic in the seed."""

    def loss(self, batch: list[int], generator: torch.Generator) -> torch.Tensor:
        """The loss of one micro-batch; all randomness drawn from ``generator``."""

    def batch_size_of(self, batch: list[int]) -> int:
        """Examples (images / sequences) in a batch, for throughput."""

    def train_mode(self, enabled: bool) -> None:
        """Switch the trained modules between train and eval mode (dropout)."""

    def eval_batches(self) -> list[list[int]]:
        """Every example once, in a fixed order, in batches (for the evaluation pass)."""


@dataclass
class LoopResult:
    """What a finished (or interrupted) loop reports."""

    steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    examples_per_second: float = 0.0
    resumed_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None


@torch.no_grad()
def evaluate(task: Task, cfg, device: torch.device) -> float:
    """Mean loss over the whole dataset with fixed noise (seeded apart from training).

    The same noise, timesteps and batches every call, so the value before and after
    training measures what the LoRA learned, free of the noise of training losses.
    Touches no global RNG, so calling it does not change the training trajectory.
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 7919)
    task.train_mode(False)
    total, count = 0.0, 0
    try:
        for batch in task.eval_batches():
            with autocast_context(cfg, device):
                total += task.loss(batch, gen).item() * len(batch)
            count += len(batch)
    finally:
        task.train_mode(True)
    return total / max(1, count)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# cuBLAS needs a fixed workspace for reproducible results (set before its first use).
CUBLAS_WORKSPACE = ":4096:8"


def determinism_wanted(cfg, device: torch.device) -> bool:
    """``deterministic`` resolved for ``device``: unset means on for CPU, off for CUDA."""
    value = getattr(cfg, "deterministic", None)
    if value is None:
        return device.type != "cuda"
    return bool(value)


def apply_determinism(cfg, device: torch.device) -> bool:
    """Make the kernels deterministic when ``cfg.deterministic`` (resolved) asks for it:
    ``torch.use_deterministic_algorithms(True)`` (warn-only: an op without a deterministic
    kernel warns rather than stops training), and on CUDA the cudnn flags and
    ``CUBLAS_WORKSPACE_CONFIG``. Off: PyTorch's defaults again. Returns the resolved value."""
    on = determinism_wanted(cfg, device)
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
    return on


def total_steps(cfg, batches_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_train_steps`` or epochs × ceil(batches / accumulation)."""
    if cfg.max_train_steps:
        return int(cfg.max_train_steps)
    return cfg.epochs * max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))


def autocast_context(cfg, device: torch.device):
    """The autocast context for ``mixed_precision`` (a no-op for ``no``)."""
    if cfg.mixed_precision == "no":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA GPU; fix: use mixed_precision: bf16 or no on CPU",
                          file=cfg.source, key="mixed_precision")
    return torch.autocast(device.type, dtype=dtype)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries (second Ctrl-C aborts)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a widget's worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# -- checkpoints -----------------------------------------------------------------------

def _rng_state(generator: torch.Generator) -> tuple[dict, dict]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state(),
               "rng.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict, generator: torch.Generator) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_meta = meta["numpy"]
    np.random.set_state((np_meta[0], tensors["rng.numpy_keys"].numpy().astype(np.uint32),
                         np_meta[1], np_meta[2], np_meta[3]))
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(path: Path, *, step: int, epoch: int, batch_in_epoch: int,
                    named: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler, generator: torch.Generator, config: dict,
                    result: LoopResult) -> Path:
    """Write a resumable checkpoint folder atomically (``path`` appears complete or not at all).

    A full disk (or quota) is a :class:`ConfigError` naming the folder and the last complete
    checkpoint, and the half-written ``.partial`` folder is removed, as on any other failure."""
    tmp = path.with_name(path.name + ".partial")
    try:
        return _write_checkpoint(tmp, path, step=step, epoch=epoch,
                                 batch_in_epoch=batch_in_epoch, named=named,
                                 optimizer=optimizer, scheduler=scheduler,
                                 generator=generator, config=config, result=result)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            last = latest_checkpoint(path.parent.parent)
            raise ConfigError(
                f"no space left to write checkpoint {path.name} ({exc.strerror}); nothing "
                f"half-written was kept; the last complete checkpoint is "
                f"{last.name if last else 'none'}; fix: free space on that disk (or set "
                f"output_dir on another one), then lora train --resume",
                file=str(path.parent.parent), key="output_dir") from None
        raise


def _write_checkpoint(tmp: Path, path: Path, *, step: int, epoch: int, batch_in_epoch: int,
                      named: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                      scheduler, generator: torch.Generator, config: dict,
                      result: LoopResult) -> Path:
    """:func:`save_checkpoint`'s writing: everything into ``tmp``, then renamed to ``path``."""
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()},
              str(tmp / "adapter_state.safetensors"))
    opt = optimizer.state_dict()
    opt_tensors, opt_meta = flatten_optimizer_state(opt["state"])
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state(generator)
    save_file({k: v.contiguous() for k, v in rng_tensors.items()},
              str(tmp / "rng.safetensors"))
    state = {
        "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": opt_meta,
        "scheduler": scheduler.state_dict(), "rng": rng_meta, "config": config,
        "losses": result.losses, "lrs": result.lrs,
        "eval_loss_before": result.eval_loss_before,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _json_default(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if torch.is_tensor(obj):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints under ``<output_dir>/checkpoints``, oldest step first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``<output_dir>/checkpoints``, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at (its ``state.json``), or None when that
    file is missing or unreadable."""
    try:
        return int(json.loads((Path(path) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep_checkpoints``; 0 keeps all);
    return the deleted folders."""
    if keep <= 0:
        return []
    old = checkpoints(output_dir)[:-keep]
    for path in old:
        shutil.rmtree(path)
    return old


class ProgressFile:
    """Progress records for ``lora run``: one JSON object per line appended to the file named
    by ``$LORA_PROGRESS_FILE`` (set by the run's executor, which relays them to the terminal);
    a no-op without it. ``train_start`` (step, total, task, resumed_from), one ``step`` per
    optimizer step (step, total, start, loss, lr, elapsed seconds) and ``train_end``.

    Progress is a display, not evidence: if the file cannot be written, the records stop and
    training goes on.
    """

    def __init__(self, path: str | None = None):
        path = path if path is not None else os.environ.get(PROGRESS_ENV)
        self._fh = None
        if path:
            try:
                self._fh = open(path, "a", encoding="utf-8", buffering=1)
            except OSError:
                self._fh = None

    def write(self, event: str, **fields) -> None:
        """Append one record (flushed: the executor tails the file)."""
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps({"event": event, **fields}) + "\n")
        except (OSError, ValueError):
            self.close()

    def close(self) -> None:
        """Close the file (further writes are dropped)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None


def load_checkpoint(path: Path, *, named: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler, generator: torch.Generator,
                    config: dict, source: str | None) -> dict:
    """Restore adapter, optimizer, scheduler and RNG states; return the checkpoint's state."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise ConfigError(f"{path} is not a checkpoint (no state.json); fix: pass a "
                          f"checkpoints/checkpoint-N folder or use --resume alone",
                          file=source, key="--resume")
    state = json.loads((path / "state.json").read_text())
    diffs = sorted(k for k in set(config) | set(state["config"])
                   if k not in RESUME_FREE_KEYS and config.get(k) != state["config"].get(k))
    if diffs:
        raise ConfigError(f"cannot resume from {path}: the config changed in {', '.join(diffs)}; "
                          f"fix: restore those values or start a new run", file=source,
                          key=diffs[0])
    weights = load_file(str(path / "adapter_state.safetensors"))
    missing = set(named) ^ set(weights)
    if missing:
        raise ConfigError(f"checkpoint {path} does not match the model's LoRA layers "
                          f"({len(missing)} differ); fix: resume with the same target_modules",
                          file=source, key="target_modules")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    opt_state = unflatten_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                          state["optimizer_scalars"])
    optimizer.load_state_dict({"state": opt_state,
                               "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"], generator)
    return state


# -- compiled training ------------------------------------------------------------------
COMPILE_MIN_STEPS = 200  # compile: auto turns on from this many optimizer steps (CUDA only)
COMPILE_BACKEND_ENV = "LORA_COMPILE_BACKEND"  # tests: e.g. aot_eager (default: inductor)


def compile_enabled(cfg, device: torch.device, n_steps: int) -> bool:
    """``compile: true`` always; ``auto`` for CUDA runs of at least
    :data:`COMPILE_MIN_STEPS` optimizer steps (compiling costs tens of seconds up front)."""
    mode = str(getattr(cfg, "compile", "auto"))
    if mode == "true":
        return True
    return mode == "auto" and device.type == "cuda" and n_steps >= COMPILE_MIN_STEPS


def compile_module(task) -> torch.nn.Module:
    """``torch.compile`` the task's trained network (the UNet, or the causal LM with its
    LoRA) in place (``nn.Module.compile``: the module object, its parameters and state dict
    stay what they were, so checkpoints and export see no ``_orig_mod`` wrapper). The compile
    cache goes to ``<LORA_HOME>/cache/torch_compile`` unless ``TORCHINDUCTOR_CACHE_DIR`` is
    set. Undo with :func:`uncompile_module`."""
    from lora_kernel.common.paths import lora_home

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        cache = lora_home() / "cache" / "torch_compile"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    comps = getattr(task, "comps", None)
    module = comps.unet if comps is not None else task.model
    module.compile(backend=os.environ.get(COMPILE_BACKEND_ENV) or "inductor")
    return module


def uncompile_module(module: torch.nn.Module) -> None:
    """Back to eager after the loop (evaluation and sampling shapes would only recompile)."""
    module._compiled_call_impl = None


# -- the loop --------------------------------------------------------------------------

def run_loop(cfg, task: Task, *, output_dir: Path, device: torch.device,
             resume: str | Path | bool | None = None,
             on_step: Callable[[int, float, float], None] | None = None,
             interrupt_at_step: int | None = None, progress: bool = True,
             after_step: Callable[[int, int, int], None] | None = None) -> LoopResult:
    """Train ``task`` per ``cfg``; return losses and timing.

    ``after_step(step, epochs_done_before, epochs_done_after)`` runs after each optimizer
    step (snapshots and samples during training, :mod:`lora_kernel.training.snapshots`).

    ``resume``: True for the latest checkpoint in ``output_dir``, or a checkpoint path.
    ``interrupt_at_step`` simulates a Ctrl-C after that optimizer step (for tests).
    Raises :class:`TrainingInterrupted` after saving a checkpoint when interrupted.
    """
    seed_everything(cfg.seed)
    loop = _Loop(cfg, task, Path(output_dir), device)
    loop.start(resume)  # a checkpoint's state, or the loss before training
    report = _Report(cfg, loop, progress)
    compiled_module = compile_module(task) if loop.compiled else None
    try:
        with _StopFlag() as stop:
            loop.stop_flag = stop
            while loop.at.step < loop.n_steps:
                t0 = time.perf_counter()
                epochs_before = loop.epochs_done()
                step_loss, step_examples, lr = loop.optimizer_step()
                report.step(step_loss, step_examples, lr, time.perf_counter() - t0)
                after = getattr(task, "after_step", None)
                if after is not None:  # a task's periodic work (held-out loss, samples)
                    after(loop.at.step, loop.n_steps, report.writer, loop.output_dir)
                if on_step is not None:
                    on_step(loop.at.step, step_loss, lr)
                if after_step is not None:
                    after_step(loop.at.step, epochs_before, loop.epochs_done())
                if cfg.save_steps and (loop.at.step % cfg.save_steps == 0
                                       or loop.at.step == loop.n_steps):
                    loop.checkpoint()  # the last step too, so a longer run can continue it
                if loop.stopping() or (interrupt_at_step is not None
                                       and loop.at.step == interrupt_at_step):
                    path = loop.checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {loop.at.step}/{loop.n_steps}; checkpoint saved "
                        f"to {path}; resume: run the same command (same config and -p "
                        f"overrides) with --resume")
    finally:
        if compiled_module is not None:
            uncompile_module(compiled_module)
        report.close()
    result = report.finish()
    result.eval_loss_after = evaluate(task, cfg, device)
    return result


@dataclass
class _Position:
    """Where the loop is: optimizer steps done, the epoch and the batch within it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class _Loop:
    """The training state of :func:`run_loop`: the random generator, optimizer and scheduler
    over the task's trainable parameters, the position, and the result being built."""

    def __init__(self, cfg, task: Task, output_dir: Path, device: torch.device) -> None:
        from lora_kernel.training.optimizers import build_optimizer, build_scheduler

        self.cfg, self.task, self.output_dir, self.device = cfg, task, output_dir, device
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.named = task.named_trainable()
        self.n_steps = total_steps(cfg, len(task.epoch_batches(0)))
        self.compiled = compile_enabled(cfg, device, self.n_steps)
        self.optimizer = build_optimizer(cfg, task.param_groups(),
                                         fused=self.compiled and device.type == "cuda")
        self.scheduler = build_scheduler(cfg, self.optimizer, self.n_steps)
        self.config = cfg.to_dict()
        self.result = LoopResult(steps=0)
        self.at = _Position()
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.batches: list = []
        from lora_kernel.training.distributed import current_shard
        self.shard = current_shard()  # data-parallel: this rank's part of each batch
        self.stop_flag: _StopFlag | None = None
        self.synced_stop = False  # data-parallel: some rank asked to stop (same on all)

    def stopping(self) -> bool:
        """Ctrl-C / SIGTERM asked the loop to stop after this step (data-parallel: on any
        rank, as agreed in the step's all-reduce, so that every rank stops together)."""
        if self.shard is not None:
            return self.synced_stop
        return self.stop_flag is not None and self.stop_flag.signum is not None

    def start(self, resume: str | Path | bool | None) -> None:
        """Continue from a checkpoint (``resume``), or measure the loss before training."""
        cfg, result = self.cfg, self.result
        if resume:
            ckpt = latest_checkpoint(self.output_dir) if resume is True else Path(resume)
            if ckpt is None:
                raise ConfigError(f"--resume: no checkpoint under "
                                  f"{self.output_dir / 'checkpoints'}; fix: use the output_dir "
                                  f"(and other -p overrides) of the run to continue, make sure "
                                  f"it had save_steps > 0, or drop --resume",
                                  file=cfg.source, key="output_dir")
            done = checkpoint_step(ckpt)
            if done is not None and done >= self.n_steps:
                raise ConfigError(
                    f"--resume: nothing to resume: {ckpt} is at step {done} of "
                    f"{self.n_steps}, the run finished; fix: raise max_train_steps (or epochs) "
                    f"above {done} to train longer, or start again without --resume",
                    file=cfg.source, key="max_train_steps" if cfg.max_train_steps else "epochs")
            state = load_checkpoint(ckpt, named=self.named, optimizer=self.optimizer,
                                    scheduler=self.scheduler, generator=self.generator,
                                    config=self.config, source=cfg.source)
            self.at = _Position(state["step"], state["epoch"], state["batch_in_epoch"])
            result.losses, result.lrs = list(state["losses"]), list(state["lrs"])
            result.resumed_from = str(ckpt)
            result.eval_loss_before = state.get("eval_loss_before")
        else:
            result.eval_loss_before = evaluate(self.task, cfg, self.device)
        if self.shard is not None:  # every rank starts from rank 0's adapter, as DDP does
            from lora_kernel.training.distributed import broadcast_parameters
            broadcast_parameters(self.params)
        self.batches = self.task.epoch_batches(self.at.epoch)

    def epochs_done(self) -> int:
        """Epochs whose every batch has been trained on."""
        return self.at.epoch + (1 if self.at.batch_in_epoch >= len(self.batches) else 0)

    def optimizer_step(self) -> tuple[float, int, float]:
        """One optimizer step over ``gradient_accumulation_steps`` batches; returns its loss,
        the examples it saw and the learning rate it used."""
        cfg, at, accum = self.cfg, self.at, self.cfg.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_examples = 0.0, 0
        for _ in range(accum):
            if at.batch_in_epoch >= len(self.batches):
                at.epoch, at.batch_in_epoch = at.epoch + 1, 0
                self.batches = self.task.epoch_batches(at.epoch)
            batch = self.batches[at.batch_in_epoch]
            at.batch_in_epoch += 1
            with autocast_context(cfg, self.device):
                loss = (self.task.loss(batch, self.generator) if self.shard is None
                        else self.task.loss(batch, self.generator, shard=self.shard))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {at.step + 1}; lower "
                    f"learning_rate (now {cfg.learning_rate}) or enable max_grad_norm")
            (loss / accum).backward()
            step_loss += loss.item() / accum
            step_examples += self.task.batch_size_of(batch)
        if self.shard is not None:  # the ranks' mean gradient, loss and stop request
            from lora_kernel.training.distributed import sync_gradients
            asked = self.stop_flag is not None and self.stop_flag.signum is not None
            step_loss, self.synced_stop = sync_gradients(self.params, step_loss, asked)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        at.step += 1
        self.result.losses.append(step_loss)
        self.result.lrs.append(lr)
        return step_loss, step_examples, lr

    def checkpoint(self) -> Path:
        """Save a checkpoint at the current step; prune the old ones (data-parallel: rank 0
        alone writes; the others get the path it writes)."""
        at, result = self.at, self.result
        if self.shard is not None and self.shard.rank != 0:
            return self.output_dir / "checkpoints" / f"checkpoint-{at.step}"
        path = save_checkpoint(self.output_dir / "checkpoints" / f"checkpoint-{at.step}",
                               step=at.step, epoch=at.epoch, batch_in_epoch=at.batch_in_epoch,
                               named=self.named, optimizer=self.optimizer,
                               scheduler=self.scheduler, generator=self.generator,
                               config=self.config, result=result)
        result.checkpoints.append(str(path))
        gone = {str(p) for p in prune_checkpoints(self.output_dir, self.cfg.keep_checkpoints)}
        result.checkpoints = [p for p in result.checkpoints if p not in gone]
        return path


class _NoWriter:
    """The TensorBoard writer of a rank other than 0: it writes nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Report:
    """Where :func:`run_loop` reports: TensorBoard scalars, the progress bar and the progress
    records (``train_start``, ``step``, ``train_end``); and the timing of the result."""

    def __init__(self, cfg, loop: _Loop, progress: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        if os.environ.get("LORA_RUN_ID"):  # a papermill batch run: text bar, in the record
            from tqdm.std import tqdm
        else:  # terminal or live notebook: widget when a front-end shows it
            from tqdm.auto import tqdm

        self.cfg, self.loop = cfg, loop
        step = loop.at.step
        writes = loop.shard is None or loop.shard.rank == 0  # data-parallel: rank 0 reports
        self.writer = (SummaryWriter(log_dir=str(loop.output_dir / "tb"), purge_step=step or None)
                       if writes else _NoWriter())
        self.bar = tqdm(total=loop.n_steps, initial=step, desc=f"{cfg.task} LoRA", unit="step",
                        disable=not (progress and writes), dynamic_ncols=True, mininterval=0.5)
        self.t_start = time.perf_counter()
        self.examples = 0
        self.start_step = step
        self.records = ProgressFile(None if writes else "")
        self.ranks = 1 if loop.shard is None else loop.shard.world
        self.records.write("train_start", step=step, total=loop.n_steps, task=cfg.task,
                           resumed_from=loop.result.resumed_from)

    def step(self, step_loss: float, step_examples: int, lr: float, seconds: float) -> None:
        """Report one optimizer step."""
        cfg, at, n_steps = self.cfg, self.loop.at, self.loop.n_steps
        self.examples += step_examples
        if at.step % cfg.logging_steps == 0 or at.step == n_steps:
            self.writer.add_scalar("train/loss", step_loss, at.step)
            self.writer.add_scalar("train/learning_rate", lr, at.step)
            self.writer.add_scalar("train/examples_per_second", step_examples / seconds,
                                   at.step)
            self.writer.add_scalar("train/epoch",
                                   at.epoch + at.batch_in_epoch / len(self.loop.batches),
                                   at.step)
        self.bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)
        elapsed = time.perf_counter() - self.t_start
        self.records.write("step", step=at.step, total=n_steps, start=self.start_step,
                           loss=step_loss, lr=lr, elapsed=round(elapsed, 3),
                           **({} if self.ranks == 1 else {  # global step, all ranks' rate
                               "ranks": self.ranks,
                               "examples_per_second": round(self.examples / elapsed, 3)
                               if elapsed else 0.0}))

    def close(self) -> None:
        self.records.write("train_end", step=self.loop.at.step, total=self.loop.n_steps)
        self.records.close()
        self.bar.close()
        self.writer.flush()
        self.writer.close()

    def finish(self) -> LoopResult:
        """The result with its steps, time and throughput."""
        result = self.loop.result
        result.steps = self.loop.at.step
        result.seconds = time.perf_counter() - self.t_start
        result.examples_per_second = self.examples / result.seconds if result.seconds else 0.0
        return result
