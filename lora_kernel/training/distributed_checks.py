"""Checks of the data-parallel keys (``num_processes``, ``fsdp``, ``rendezvous_port``): the
schema part (called by :class:`~lora_kernel.training.config.TrainConfig`) and the part that
looks at this machine (the GPUs the run was given, the rendezvous port; called by the checking
loader). Each refusal is a :class:`ConfigError` naming the key and the fix (exit 2), before
anything loads or starts.

"The GPUs the run was given": the entries of ``CUDA_VISIBLE_DEVICES`` when it is set (the hub's
spawner and the runs service set it to the run's GPUs; empty: none), else the GPUs torch sees.
Without GPUs (CPU), ``num_processes`` above 1 trains on the gloo backend: an explicit number
(``auto`` is 1 there), for tests and the CPU equality proof.

Runs as: the user (the config checks of their kernel, ``lora train`` / ``lora config``, or a
recorded run's steps).
"""
from __future__ import annotations

import os
import socket

from lora_kernel.common.errors import ConfigError

__all__ = ["check_distributed_keys", "check_distributed_env", "gpus_given",
           "resolve_num_processes", "port_free"]

RENDEZVOUS_HOST = "127.0.0.1"  # the ranks meet on loopback only (egress policy unchanged)


def check_distributed_keys(cfg) -> None:
    """The schema checks: ``num_processes`` is ``auto`` or a whole number >= 1,
    ``rendezvous_port`` in 0..65535, ``fsdp`` only for text, several processes only for
    the tasks that shard their batches (image, text SFT)."""
    file = cfg.source or "<config>"
    n = str(cfg.num_processes).strip()
    if n != "auto" and not (n.isdigit() and int(n) >= 1):
        raise ConfigError(f"must be auto or a whole number >= 1, got {cfg.num_processes!r}; "
                          f"fix: num_processes: auto (the GPUs the run was given) or e.g. 2",
                          file=file, key="num_processes")
    if not 0 <= int(cfg.rendezvous_port) <= 65535:
        raise ConfigError(f"must be a TCP port in 0..65535, got {cfg.rendezvous_port}; fix: "
                          f"rendezvous_port: 0 (a free port on 127.0.0.1)", file=file,
                          key="rendezvous_port")
    if cfg.fsdp and cfg.task == "image":
        raise ConfigError("fsdp shards a text model's frozen base over the ranks; image runs "
                          "(SD, SDXL, Flux, SD3) train data-parallel without it; fix: "
                          "fsdp: false (num_processes alone spreads the batches)",
                          file=file, key="fsdp")
    if n != "auto" and int(n) > 1 and cfg.task == "text" \
            and getattr(cfg, "objective", "sft") != "sft":
        raise ConfigError(f"num_processes {n}: objective {cfg.objective} (preference pairs) "
                          f"does not train on several processes yet; fix: num_processes: 1, "
                          f"or objective: sft", file=file, key="num_processes")


def gpus_given() -> int:
    """The GPUs this process was given (see the module docstring)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_num_processes(cfg) -> int:
    """``num_processes`` as a number: ``auto`` is the GPUs given (at least 1)."""
    n = str(cfg.num_processes).strip()
    if n == "auto":
        return max(1, gpus_given())
    return int(n)


def port_free(port: int, host: str = RENDEZVOUS_HOST) -> bool:
    """Whether ``host:port`` can be bound now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_distributed_env(cfg) -> None:
    """The machine checks: no more processes than GPUs given (on a GPU machine); ``fsdp``
    needs CUDA; a fixed ``rendezvous_port`` must be free on 127.0.0.1."""
    if os.environ.get("LORA_DIST_RANK") is not None:
        return  # a rank of a run whose launcher checked all this (its port is now taken)
    file = cfg.source or "<config>"
    n = resolve_num_processes(cfg)
    given = gpus_given()
    if given and n > given:
        raise ConfigError(f"num_processes {n} but the run was given {given} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}"
                          f"); fix: num_processes: auto, or ask for {n} GPUs (lora run --gpus "
                          f"{n}, the studio's GPU field)", file=file, key="num_processes")
    if cfg.fsdp:
        raise ConfigError("fsdp: true is not built in this version (sharding the frozen base "
                          "needs CUDA ranks, and FSDP over a PEFT model is not yet tested "
                          "here); fix: fsdp: false (num_processes alone trains data-parallel "
                          "with the whole base on each GPU)", file=file, key="fsdp")
    port = int(cfg.rendezvous_port)
    if n > 1 and port and not port_free(port):
        raise ConfigError(f"rendezvous_port {port} on {RENDEZVOUS_HOST} is in use by another "
                          f"process, so the ranks could not meet there; fix: rendezvous_port: "
                          f"0 (a free port is picked) or another free port", file=file,
                          key="rendezvous_port")
