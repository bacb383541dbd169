"""Data-parallel training inside one rank: which part of each batch this rank trains, the
gradient all-reduce of the LoRA parameters, and who writes (rank 0).

How several processes train the same adapter as one (``num_processes``; the ranks are
started by :mod:`lora_kernel.training.dist_launch`):

* Every rank builds the same batches (``Task.epoch_batches``: the seed's order) and draws the
  same random numbers for the *whole* global batch (flips, noise, timesteps, caption habits)
  from the loop's generator, then trains only its contiguous slice of it
  (:meth:`Shard.part`). Rank r of N with ``batch_size`` B therefore sees exactly what one
  process with batch B x N would have drawn for those examples.
* Each rank's loss is its slice's mean scaled by ``len(slice) x N / len(batch)``
  (:meth:`Shard.weight`), so the mean of the ranks' gradients is the gradient of the global
  batch's mean loss, also for a last batch that does not split evenly. Text losses are
  normalised by the global batch's labelled tokens instead (the same mean).
* After the micro-batches of an optimizer step (``gradient_accumulation_steps``), one fused
  all-reduce averages the LoRA gradients (:func:`sync_gradients`; the LoRA parameters are
  the only ones with gradients: the frozen base is never reduced). This is what DDP does
  with ``no_sync`` during accumulation, without wrapping the model: parameter names,
  checkpoints and exports stay those of one process. The step's loss and the stop flag
  (Ctrl-C / SIGTERM on any rank) ride in the same reduction, so every rank stops at the same
  step.
* Clipping and the optimizer step run on the averaged gradients on every rank, which keeps
  the ranks' adapters identical; rank 0's parameters are broadcast once at the start (as DDP
  does).

Not identical to one process: LoRA dropout (each rank draws its own masks from the global
torch RNG) and float rounding of the reduction (two partial sums added instead of one sum:
about 1e-7 relative on CPU in float32).

Runs as: the user (each rank of a data-parallel training, started by the launcher).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

__all__ = ["Shard", "current_shard", "is_rank_zero", "in_rank", "sync_gradients",
           "broadcast_parameters", "global_batch_size", "zero_loss", "RANK_ENV",
           "WORLD_ENV"]

RANK_ENV = "LORA_DIST_RANK"  # set by the launcher in each rank's environment
WORLD_ENV = "LORA_DIST_WORLD"


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks: ``rank`` of ``world``."""

    rank: int
    world: int

    def part(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of ``n`` examples (ceil(n / world)
        each, the last ranks fewer or none when ``n`` does not split evenly)."""
        per = math.ceil(n / self.world)
        start = min(self.rank * per, n)
        return slice(start, min(start + per, n))

    def size(self, n: int) -> int:
        """Examples this rank trains of a global batch of ``n``."""
        part = self.part(n)
        return part.stop - part.start

    def weight(self, n: int) -> float:
        """The factor on this rank's slice-mean loss so that the ranks' mean gradient is the
        gradient of the global batch's mean loss."""
        return self.size(n) * self.world / n


def in_rank() -> bool:
    """Whether this process is a rank started by the launcher."""
    return os.environ.get(RANK_ENV) is not None


def current_shard() -> Shard | None:
    """This rank's :class:`Shard` while the process group is up; None in one process."""
    if not in_rank():
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Shard(dist.get_rank(), dist.get_world_size())


def is_rank_zero() -> bool:
    """True in one process and in rank 0: the one that writes checkpoints, TensorBoard,
    samples, progress records, adapters and the summary."""
    shard = current_shard()
    return shard is None or shard.rank == 0


def zero_loss(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """A loss of 0 that reaches every trained parameter (a rank whose slice of a short last
    batch is empty still takes part in the all-reduce, with zero gradients)."""
    return sum((p.sum() * 0.0 for p in params), torch.zeros(()))  # type: ignore[return-value]


def sync_gradients(params: list[torch.nn.Parameter], loss: float,
                   stop: bool) -> tuple[float, bool]:
    """Average the gradients of ``params`` over the ranks (one fused all-reduce) and return
    the ranks' mean loss and whether any rank asked to stop."""
    import torch.distributed as dist
    world = dist.get_world_size()
    device = params[0].device if params else torch.device("cpu")
    flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
            .to(torch.float32) for p in params]
    flat.append(torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float32,
                             device=device))
    buffer = torch.cat(flat)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        grad = (buffer[offset:offset + n] / world).view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)
        offset += n
    return float(buffer[offset]) / world, bool(buffer[offset + 1] > 0)


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``params`` (the LoRA init, or a resumed state)."""
    import torch.distributed as dist
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def global_batch_size(cfg) -> int:
    """The examples of one micro-batch over all ranks: ``batch_size`` (per rank) x ranks.
    Every rank builds the batches of this size (the seed's order, as one process with that
    batch would) and trains its :meth:`Shard.part` of each."""
    shard = current_shard()
    return cfg.batch_size * (shard.world if shard is not None else 1)
