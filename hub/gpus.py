"""GPU discovery and the allocation pool that the spawner and the runs service share.

Plain helpers (no jupyterhub import). The pool is one JSON file guarded by an exclusive
``flock``; every change rewrites it atomically, so two processes (the hub and the runs service)
never hand out the same GPU, and a restarted hub finds what was allocated.

File: ``{"v": 1, "holders": {"<owner>": ["0", "1"], ...}}`` where an owner is a string such as
``server:alice/`` or ``run:20261126-...``. Devices are CUDA indices as strings.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.errors import ConfigError, PolicyRefusal


class GpuUnavailable(PolicyRefusal):
    """Not enough free GPUs in the pool, or more than the quota allows."""


@dataclass(frozen=True)
class Device:
    index: str
    name: str = "gpu"
    uuid: str | None = None
    memory_mb: int | None = None


def nvml_devices() -> list[Device] | None:
    """The GPUs NVML reports, or None when no NVIDIA driver (or no nvidia-ml-py) is present."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError_LibraryNotFound / DriverNotLoaded, etc.
        return None
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(Device(str(i), name if isinstance(name, str) else name.decode(),
                                pynvml.nvmlDeviceGetUUID(handle), int(mem.total) // (1 << 20)))
        return found
    finally:
        pynvml.nvmlShutdown()


def discover(configured: Iterable[str] | None = None) -> list[Device]:
    """NVML's GPUs when a driver is present, else the ``configured`` indices, else none (CPU)."""
    found = nvml_devices()
    if found:
        return found
    return [Device(str(d)) for d in (configured or [])]


def quota_for(roles: Iterable[str], quotas: dict[str, Any]) -> int:
    """How many GPUs one server or run of a user with ``roles`` may hold: the largest quota
    among the roles, else ``quotas['default']`` (1)."""
    values = [int(quotas[r]) for r in roles if r in quotas]
    return max(values) if values else int(quotas.get("default", 1))


class Pool:
    """Allocation of ``devices`` to owners, persisted in ``path``."""

    def __init__(self, path: str | os.PathLike[str], devices: Iterable[str],
                 exclusive: bool = True) -> None:
        self.path = Path(path)
        self.devices = [str(d) for d in devices]
        self.exclusive = exclusive

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, list[str]]]:
        """The holders table, under the lock; changes are written back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            holders = self._read()
            before = json.dumps(holders, sort_keys=True)
            yield holders
            if json.dumps(holders, sort_keys=True) != before:
                self._write(holders)

    def _read(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"GPU pool file {self.path} is unreadable ({exc}); fix: stop the "
                              "hub and runs service, remove it; running servers are re-claimed "
                              "from the hub's state at the next start") from None
        holders = data.get("holders", {}) if isinstance(data, dict) else {}
        return {str(k): [str(d) for d in v] for k, v in holders.items()}

    def _write(self, holders: dict[str, list[str]]) -> None:
        atomic_write(self.path, json.dumps({"v": 1, "holders": holders}, sort_keys=True,
                                           indent=1), mode=0o600)

    def holders(self) -> dict[str, list[str]]:
        with self._locked() as holders:
            return {k: list(v) for k, v in holders.items()}

    def _load(self, holders: dict[str, list[str]]) -> dict[str, int]:
        load = {d: 0 for d in self.devices}
        for devs in holders.values():
            for d in devs:
                if d in load:
                    load[d] += 1
        return load

    def allocate(self, owner: str, count: int) -> list[str]:
        """Give ``owner`` ``count`` GPUs (the same ones again if it already holds some)."""
        if count <= 0:
            return []
        with self._locked() as holders:
            if owner in holders:
                return list(holders[owner])
            load = self._load(holders)
            if self.exclusive:
                free = [d for d in self.devices if load[d] == 0]
            else:
                free = sorted(self.devices, key=lambda d: (load[d], self.devices.index(d)))
            if len(free) < count:
                busy = len(self.devices) - len([d for d in self.devices if load[d] == 0])
                raise GpuUnavailable(
                    f"{count} GPU(s) asked for, {len(free)} free of {len(self.devices)} "
                    f"({busy} in use); fix: ask for fewer, or wait for a server or run to stop")
            chosen = sorted(free[:count], key=self.devices.index)
            holders[owner] = chosen
            return list(chosen)

    def claim(self, owner: str, devices: Iterable[str]) -> list[str]:
        """Re-claim exactly ``devices`` for ``owner`` (a server restored after a hub restart).
        Refuses a device another owner holds exclusively, or one no longer in the pool."""
        wanted = [str(d) for d in devices]
        if not wanted:
            return []
        with self._locked() as holders:
            for d in wanted:
                if d not in self.devices:
                    raise GpuUnavailable(f"GPU {d} held by {owner} is no longer in the pool")
                others = [o for o, devs in holders.items() if o != owner and d in devs]
                if self.exclusive and others:
                    raise GpuUnavailable(f"GPU {d} is held by {others[0]}; {owner} cannot "
                                         "re-claim it")
            holders[owner] = wanted
            return wanted

    def release(self, owner: str) -> list[str]:
        """Free what ``owner`` holds (nothing if it holds nothing)."""
        with self._locked() as holders:
            return holders.pop(owner, [])

    def reconcile(self, prefix: str, live: Iterable[str]) -> list[str]:
        """Release every owner starting with ``prefix`` that is not in ``live`` (servers or
        runs that ended while their manager was down). Returns the released owners."""
        keep = set(live)
        with self._locked() as holders:
            gone = [o for o in holders if o.startswith(prefix) and o not in keep]
            for owner in gone:
                del holders[owner]
            return gone


def cuda_env(devices: list[str]) -> dict[str, str]:
    """The CUDA variables for a process given ``devices`` (none: no GPU is visible)."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(devices),
            "NVIDIA_VISIBLE_DEVICES": ",".join(devices) or "void"}
