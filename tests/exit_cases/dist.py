"""Data-parallel cases (``num_processes``, ``fsdp``, ``rendezvous_port``): refused before any
rank starts (exit 2), and a rank killed mid-run (exit 7, the rank named, nothing left
running). The must-work twins are in ``tests/training/test_distributed.py`` and
``tests/training/test_dist_launch.py``."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from exit_cases import Case

_HELD: list[socket.socket] = []


def _too_many_processes(c: Case) -> list:
    c.monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the run was given one GPU
    return ["config", c.config(num_processes=2)]


def _fsdp_image(c: Case) -> list:
    return ["config", c.config(fsdp=True)]


def _port_in_use(c: Case) -> list:
    c.monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    _HELD.append(busy)  # open while the case runs (the Case itself is not kept)
    return ["config", c.config(num_processes=2, rendezvous_port=busy.getsockname()[1])]


def _kill_rank_one_when_up() -> None:
    """Watch for this process's ranks; SIGKILL rank 1 once both exist (a thread)."""
    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ranks = [p for p in psutil.Process().children(recursive=True)
                 if "lora_kernel.training.dist_worker" in " ".join(_cmdline(p))]
        if len(ranks) == 2:
            time.sleep(2)
            for p in ranks:
                if _environ(p).get("LORA_DIST_RANK") == "1":
                    os.kill(p.pid, signal.SIGKILL)
                    return
        time.sleep(0.3)


def _cmdline(p) -> list:
    import psutil
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _environ(p) -> dict:
    import psutil
    try:
        return p.environ()
    except psutil.Error:
        return {}


def _rank_killed(c: Case) -> list:
    c.monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    threading.Thread(target=_kill_rank_one_when_up, daemon=True).start()
    raw = {"task": "text", "base_model": str((c.demo / "models" / "tiny-llama").resolve()),
           "metadata_path": str((c.demo / "datasets" / "text" / "train.jsonl").resolve()),
           "prompt_column": "prompt", "response_column": "response", "batch_size": 4,
           "num_processes": 2, "max_train_steps": 100000, "save_steps": 0,
           "output_dir": str(c.tmp / "out"), "sample_prompts": []}
    import yaml
    path = c.tmp / "text.yaml"
    path.write_text(yaml.safe_dump(raw))
    return ["train", "--config", path, "--quiet", "--no-samples"]


CASES: dict[str, Callable[[Case], list]] = {
    "`num_processes` larger than the GPUs the run was given": _too_many_processes,
    "`fsdp: true` for an image run": _fsdp_image,
    "`rendezvous_port` already in use on 127.0.0.1": _port_in_use,
    "a rank of a `num_processes` > 1 training killed (SIGKILL)": _rank_killed,
}
SLOW = {"a rank of a `num_processes` > 1 training killed (SIGKILL)"}
