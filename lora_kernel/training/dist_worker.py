"""One rank of a data-parallel training: ``python -m lora_kernel.training.dist_worker SPEC``.

Started by :mod:`lora_kernel.training.dist_launch` (never by hand). Before anything else the
rank ties its life to the launcher's (``PR_SET_PDEATHSIG``: the launcher killed, the rank
dies too), applies the offline environment and installs the kernel's egress guard
(:mod:`lora_kernel.kernel.guard`, the same policy file): the audit hook of the kernel does not
pass to child processes, so each rank guards itself. The ranks meet on 127.0.0.1 only
(``MASTER_ADDR``/``MASTER_PORT`` from the launcher; the rendezvous and gloo/nccl sockets are
C-level and loopback, which the policy allows). Then it re-validates the spec's config with
the same checking loader and trains (:func:`lora_kernel.training.train.train`); rank 0 writes
the result for the launcher.

Exit codes: 0, a :class:`~lora_kernel.common.errors.LoraError`'s own (2 config, 4 egress, 130
interrupted, ...), 1 for a crash (traceback on its log).

Runs as: the user (a rank started by their training: kernel, ``lora train`` or recorded run).
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

__all__ = ["enter_rank", "main"]

RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # ranks that never meet fail instead of hanging


def enter_rank() -> tuple[int, int]:
    """What every rank does first: die with the launcher, go offline, install the egress
    guard (refusals reported on this rank's stderr), join the process group on loopback.
    Returns ``(rank, world)``."""
    from lora_kernel.common.offline import apply_offline_env
    from lora_kernel.common.process import die_with_parent
    from lora_kernel.kernel import guard
    from lora_kernel.training.dist_launch import BACKEND_ENV, PARENT_ENV
    from lora_kernel.training.distributed import RANK_ENV, WORLD_ENV

    die_with_parent(int(os.environ[PARENT_ENV]))
    apply_offline_env()
    rank, world = int(os.environ[RANK_ENV]), int(os.environ[WORLD_ENV])

    def report(event) -> None:
        if event.kind == "refusal":
            print(f"rank {rank}: egress guard: {event.message or event.destination}",
                  file=sys.stderr, flush=True)

    policy = guard.load_egress_policy()
    if not guard.installed():
        guard.install(policy, report=report)
        guard.install_remote_code_refusal(policy.path)
    import torch
    import torch.distributed as dist
    backend = os.environ.get(BACKEND_ENV, "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                            world_size=world, timeout=RENDEZVOUS_TIMEOUT)
    return rank, world


def main(argv: list[str] | None = None) -> int:
    """Run one rank of the spec file ``argv[0]``; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(argv[0]).read_text())
    from lora_kernel.common.errors import LoraError
    try:
        rank, _world = enter_rank()
    except LoraError as exc:
        print(f"rank {os.environ.get('LORA_DIST_RANK')}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    import torch.distributed as dist

    from lora_kernel.training.checks import validate_config
    from lora_kernel.training.train import train
    try:
        cfg = validate_config(spec["config"], source=spec["source"])
        res = train(cfg, resume=spec["resume"], progress=bool(spec["progress"]) and rank == 0,
                    samples=bool(spec["samples"]), home=spec["home"])
        if rank == 0:
            tmp = Path(spec["result"] + ".partial")
            tmp.write_text(json.dumps(res.to_dict(), indent=1, default=str))
            tmp.rename(spec["result"])
    except LoraError as exc:
        print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (RuntimeError, dist.DistError) as exc:
        if not _peer_gone(exc):
            raise  # a crash: its traceback on this rank's output
        # another rank ended (the launcher names it); this one's traceback would only hide it
        print(f"rank {rank}: stopped: another rank is gone ({str(exc).splitlines()[0][:200]})",
              file=sys.stderr, flush=True)
        return 1
    if dist.is_initialized():  # a clean end only: with a peer gone this would wait for it
        dist.destroy_process_group()
    return 0


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer rank ended (gloo / nccl)."""
    import torch.distributed as dist
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer",
                            "gloo", "NCCL", "Broken pipe"))


if __name__ == "__main__":
    sys.exit(main())
