"""Launch and supervise the ranks of a data-parallel training (``num_processes`` > 1).

:func:`launch` is what :func:`lora_kernel.training.train.train` does instead of training when
the config asks for several processes: it writes the run's spec (the resolved config) to
``<output_dir>/.dist/spec.json``, starts N processes ``python -m
lora_kernel.training.dist_worker`` that meet on ``127.0.0.1`` (``rendezvous_port``, or a free
port picked by binding port 0) over torch.distributed (gloo on CPU, nccl on CUDA), and waits:

* each rank installs the kernel's egress guard itself before anything else (an audit hook
  does not pass to child processes), dies with its launcher (``PR_SET_PDEATHSIG``), and is
  listed by the launcher's log (``rank R: pid P``) and in the result's ``distributed.ranks``;
* a rank that dies (an error, SIGKILL, out of memory) fails the run: the other ranks are
  stopped (SIGTERM, then SIGKILL), nothing is left running, and :class:`RunFailed` names the
  rank, how it ended and the end of its log;
* Ctrl-C / SIGTERM to the launcher is passed to every rank; they stop at the same step,
  rank 0 saves a checkpoint, and :class:`TrainingInterrupted` is raised as in one process.

Rank 0's result (``.dist/result.json``) is what the launcher returns.

Runs as: the user (their kernel, ``lora train``, or a recorded run's kernel as the run's user).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_kernel.common.errors import RunFailed, TrainingInterrupted
from lora_kernel.training.distributed import RANK_ENV, WORLD_ENV
from lora_kernel.training.distributed_checks import (
    RENDEZVOUS_HOST,
    gpus_given,
    resolve_num_processes,
)

__all__ = ["wants_launch", "launch", "spawn_ranks", "supervise", "free_port", "RankProcess",
           "WORKER_MODULE", "PARENT_ENV", "BACKEND_ENV"]

WORKER_MODULE = "lora_kernel.training.dist_worker"
PARENT_ENV = "LORA_DIST_PARENT"  # the launcher's pid: a rank exits if it is not its parent
BACKEND_ENV = "LORA_DIST_BACKEND"
STOP_GRACE_S = 3.0  # a rank asked to stop gets this long before SIGKILL
LOG_TAIL = 1500  # characters of a failed rank's log in the error


def wants_launch(cfg) -> bool:
    """Whether :func:`train` must start ranks: several processes asked for, and this process
    is not itself a rank."""
    return os.environ.get(RANK_ENV) is None and resolve_num_processes(cfg) > 1


def free_port(host: str = RENDEZVOUS_HOST) -> int:
    """A TCP port free on ``host`` now (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RankProcess:
    """One started rank: its number, process and log file (None: it writes to ours)."""

    rank: int
    proc: subprocess.Popen
    log: Path | None
    stopped_by_us: bool = False

    def describe(self) -> dict:
        """``{"rank", "pid", "exit_code"}`` for the result and the record."""
        return {"rank": self.rank, "pid": self.proc.pid, "exit_code": self.proc.returncode}


def spawn_ranks(argv: list[str], n: int, *, port: int, backend: str, work: Path,
                log: Callable[[str], None]) -> list[RankProcess]:
    """Start ``argv`` as ranks 0..n-1 on 127.0.0.1:``port``. Rank 0 writes to this process's
    stdout/stderr (progress bar, notes), the others to ``work/rank-R.log``."""
    ranks: list[RankProcess] = []
    try:
        for r in range(n):
            env = dict(os.environ)
            env.update({RANK_ENV: str(r), WORLD_ENV: str(n), "RANK": str(r),
                        "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                        "MASTER_ADDR": RENDEZVOUS_HOST, "MASTER_PORT": str(port),
                        BACKEND_ENV: backend, PARENT_ENV: str(os.getpid())})
            # the cores shared out (as torchrun does): N ranks each with every core's worth
            # of OpenMP threads spin in each other's barriers (steps 10-20x slower on CPU)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
            logfile = None if r == 0 else work / f"rank-{r}.log"
            out = None if logfile is None else open(logfile, "wb")  # noqa: SIM115
            try:
                # a session of its own: a terminal's Ctrl-C reaches the launcher alone, which
                # passes one SIGTERM on (PR_SET_PDEATHSIG still ends the rank with it)
                proc = subprocess.Popen(argv, env=env, stdout=out,
                                        stderr=None if out is None else subprocess.STDOUT,
                                        start_new_session=True)
            finally:
                if out is not None:
                    out.close()
            ranks.append(RankProcess(r, proc, logfile))
            log(f"rank {r}/{n}: pid {proc.pid} ({backend} on {RENDEZVOUS_HOST}:{port})")
    except BaseException:
        stop_ranks(ranks)
        raise
    return ranks


def stop_ranks(ranks: list[RankProcess]) -> None:
    """End every rank still running: SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; wait
    for each (no zombie, no orphan)."""
    live = [r for r in ranks if r.proc.poll() is None]
    for r in live:
        r.stopped_by_us = True
        _signal(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for r in live:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(r.proc, signal.SIGKILL)
            r.proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _tail(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text[-LOG_TAIL:]


def supervise(ranks: list[RankProcess], *, poll_s: float = 0.05) -> None:
    """Wait for every rank. A rank that fails stops the others and raises :class:`RunFailed`
    naming it; Ctrl-C / SIGTERM here is passed on to the ranks, and their clean stop raises
    :class:`TrainingInterrupted`. Nothing is left running when this returns or raises."""
    asked: list[int] = []

    def forward(signum, frame):  # once: a second signal would abort a rank's checkpoint
        if asked:
            return
        asked.append(signum)
        for r in ranks:
            if r.proc.poll() is None:
                _signal(r.proc, signal.SIGTERM)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: no forwarding
            pass
    try:
        while True:
            codes = [r.proc.poll() for r in ranks]
            if all(c == 0 for c in codes):
                return
            failed = [r for r, c in zip(ranks, codes, strict=True) if c not in (None, 0)]
            if asked and all(c is not None for c in codes):
                if all(c in (0, TrainingInterrupted.exit_code) for c in codes):
                    raise TrainingInterrupted(
                        "interrupted: every rank stopped at the same step and rank 0 saved a "
                        "checkpoint; resume: run the same command with --resume")
                _fail(ranks, failed)
            elif failed and not asked:
                _fail(ranks, failed)
            time.sleep(poll_s)
    finally:
        stop_ranks(ranks)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _fail(ranks: list[RankProcess], failed: list[RankProcess]) -> None:
    """Stop the others and raise :class:`RunFailed` for the rank that failed first (one
    killed by a signal before one that errored: a peer's death makes the others error)."""
    first = sorted(failed, key=lambda r: (r.proc.returncode >= 0, r.rank))[0]
    stop_ranks(ranks)
    others = ", ".join(f"rank {r.rank} (pid {r.proc.pid}) {_how(r.proc.returncode)}"
                       + (" (stopped)" if r.stopped_by_us else "")
                       for r in ranks if r is not first)
    tail = _tail(first.log)
    raise RunFailed(
        f"rank {first.rank} of {len(ranks)} (pid {first.proc.pid}) {_how(first.proc.returncode)}"
        f"; the training failed and the other ranks were stopped ({others}); nothing was "
        f"exported" + (f"; the end of its log ({first.log}):\n{tail}" if tail else
                       f" (its log {first.log} is empty)" if first.log else
                       " (its messages are above)")
        + "\nfix: see why the rank ended (out of memory, a killed process, its error above); "
          "the last checkpoint (if any) resumes with --resume")


def launch(cfg, *, resume, progress: bool, samples: bool, home,
           log: Callable[[str], None]) -> dict:
    """Train ``cfg`` on ``num_processes`` ranks; return rank 0's result (a
    :class:`~lora_kernel.training.train.TrainResult` as a dict) with ``distributed.ranks``
    (each rank's pid and exit code) added, also to ``training_summary.json``."""
    n = resolve_num_processes(cfg)
    out = Path(cfg.output_dir)
    work = out / ".dist"
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    spec = {"config": cfg.to_dict(), "source": cfg.source,
            "resume": str(resume) if isinstance(resume, (str, Path)) else resume,
            "progress": progress, "samples": samples,
            "home": str(home) if home is not None else None, "result": str(result_path)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1, default=str))
    port = int(cfg.rendezvous_port) or free_port()
    backend = "nccl" if gpus_given() and _cuda() else "gloo"
    log(f"data-parallel training: {n} processes, {backend}, batch {cfg.batch_size} per rank "
        f"(global {cfg.batch_size * n})")
    ranks = spawn_ranks([sys.executable, "-m", WORKER_MODULE, str(spec_path)], n, port=port,
                        backend=backend, work=work, log=log)
    supervise(ranks)
    result = json.loads(result_path.read_text())
    result.setdefault("distributed", {})["ranks"] = [r.describe() for r in ranks]
    summary_path = Path(result.get("summary_path") or out / "training_summary.json")
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["distributed"] = result["distributed"]
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    return result


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def distributed_facts(cfg) -> dict:
    """What a rank's result and summary record of the data-parallel setup (empty in one
    process): processes, backend, where they met, the batch per rank, the effective batch
    (per rank x processes x accumulation) and the learning rate it was trained with (not
    scaled: the mean gradient of the global batch is what one process with that batch
    takes)."""
    from lora_kernel.training.distributed import current_shard
    shard = current_shard()
    if shard is None:
        return {}
    return {"num_processes": shard.world, "backend": os.environ.get(BACKEND_ENV, "gloo"),
            "rendezvous": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
            "batch_size_per_rank": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "effective_batch_size": cfg.batch_size * shard.world
            * cfg.gradient_accumulation_steps,
            "learning_rate": cfg.learning_rate}
