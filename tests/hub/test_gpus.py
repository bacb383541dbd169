"""The GPU pool and hub settings (no hub needed)."""
from __future__ import annotations

import pytest

from hub.gpus import GpuUnavailable, Pool, cuda_env, discover, quota_for
from lora_kernel.common.errors import ConfigError


def test_exclusive_pool_never_hands_a_gpu_out_twice_and_releases(tmp_path):
    pool = Pool(tmp_path / "gpus.json", ["0", "1", "2"])
    assert pool.allocate("server:a/", 2) == ["0", "1"]
    assert pool.allocate("server:a/", 2) == ["0", "1"]          # idempotent for its owner
    with pytest.raises(GpuUnavailable, match="1 free of 3"):
        pool.allocate("run:1", 2)
    assert pool.allocate("run:1", 1) == ["2"]
    # a second Pool object on the same file (the runs service) sees the same holders
    other = Pool(tmp_path / "gpus.json", ["0", "1", "2"])
    assert other.holders() == {"server:a/": ["0", "1"], "run:1": ["2"]}
    assert pool.release("server:a/") == ["0", "1"]
    assert other.allocate("server:b/", 2) == ["0", "1"]
    assert pool.allocate("x", 0) == []


def test_claim_restores_an_allocation_and_refuses_a_taken_gpu(tmp_path):
    pool = Pool(tmp_path / "gpus.json", ["0", "1"])
    assert pool.claim("server:a/", ["1"]) == ["1"]
    assert pool.claim("server:a/", ["1"]) == ["1"]                # again: fine
    with pytest.raises(GpuUnavailable, match="held by server:a/"):
        pool.claim("server:b/", ["1"])
    with pytest.raises(GpuUnavailable, match="no longer in the pool"):
        pool.claim("server:c/", ["7"])
    assert pool.reconcile("run:", []) == []                       # servers untouched
    pool.allocate("run:5", 1)
    assert pool.reconcile("run:", ["run:9"]) == ["run:5"]


def test_shared_pool_spreads_least_loaded_first(tmp_path):
    pool = Pool(tmp_path / "gpus.json", ["0", "1"], exclusive=False)
    assert pool.allocate("a", 1) == ["0"]
    assert pool.allocate("b", 1) == ["1"]
    assert pool.allocate("c", 2) == ["0", "1"]


def test_quota_discovery_and_cuda_env():
    assert quota_for(["researcher"], {"default": 1, "engineer": 2}) == 1
    assert quota_for(["researcher", "engineer"], {"default": 1, "engineer": 2}) == 2
    assert cuda_env([])["CUDA_VISIBLE_DEVICES"] == ""
    assert cuda_env(["1", "2"]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                    "CUDA_VISIBLE_DEVICES": "1,2",
                                    "NVIDIA_VISIBLE_DEVICES": "1,2"}


def test_a_corrupt_pool_file_is_one_clear_error(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="gpus.json is unreadable"):
        Pool(path, ["0"]).allocate("a", 1)


def test_hub_policy_errors_name_the_file_and_key(tmp_path, monkeypatch):
    from hub.settings import load_settings

    monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    assert load_settings().quotas == {"default": 1}               # no file: defaults
    (tmp_path / "hub.yaml").write_text("roles:\n  lora-x: wizard\n")
    with pytest.raises(ConfigError, match=r"hub.yaml: key 'roles.lora-x'.*wizard"):
        load_settings()
    (tmp_path / "hub.yaml").write_text("gpus:\n  quotas: {default: -1}\n")
    with pytest.raises(ConfigError, match="gpus.quotas.default"):
        load_settings()
    (tmp_path / "hub.yaml").write_text("roles:\n  lora-rev: reviewer\ngpus:\n  devices: [0]\n")
    s = load_settings()
    assert s.roles_of(["lora-rev", "other"]) == ["reviewer"] and s.roles_of([]) == ["researcher"]
    assert s.devices == ["0"]


def test_terminals_only_when_asked_for_and_the_firewall_is_in_force(tmp_path, monkeypatch):
    from hub.settings import load_settings, terminals_allowed

    monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    assert load_settings().terminals is False                      # the default: off
    (tmp_path / "hub.yaml").write_text("terminals: yes-please\n")
    with pytest.raises(ConfigError, match="key 'terminals'"):
        load_settings()
    (tmp_path / "hub.yaml").write_text("terminals: true\n")
    assert load_settings().terminals is True
    assert terminals_allowed(True, "required")[0] is True
    allowed, why = terminals_allowed(True, "off")                  # asked, but unfiltered
    assert allowed is False and "firewall is not in force" in why
    assert terminals_allowed(False, "required")[0] is False


def test_nvml_devices_win_over_the_configured_list_and_a_missing_driver_falls_back(monkeypatch):
    """NVML is read through nvidia-ml-py's ``pynvml``; a fake module stands in for the driver
    (no GPU on CI machines); without a driver the configured list applies."""
    import sys
    import types

    calls = []

    class NVMLError(Exception):
        pass

    def fake(count: int | None):  # a driver with ``count`` GPUs, or none (init fails)
        mod = types.ModuleType("pynvml")

        def init():
            calls.append("init")
            if count is None:
                raise NVMLError("Driver Not Loaded")

        mod.nvmlInit = init
        mod.nvmlShutdown = lambda: calls.append("shutdown")
        mod.nvmlDeviceGetCount = lambda: count
        mod.nvmlDeviceGetHandleByIndex = lambda i: i
        mod.nvmlDeviceGetName = lambda h: "NVIDIA H200"
        mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
        mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=141 << 30)
        return mod

    monkeypatch.setitem(sys.modules, "pynvml", fake(2))
    found = discover(["7"])
    assert [(d.index, d.name, d.uuid, d.memory_mb) for d in found] == [
        ("0", "NVIDIA H200", "GPU-0", 141 << 10), ("1", "NVIDIA H200", "GPU-1", 141 << 10)]
    assert calls[-1] == "shutdown"
    monkeypatch.setitem(sys.modules, "pynvml", fake(None))
    assert [d.index for d in discover(["7"])] == ["7"]
    assert discover([]) == []
