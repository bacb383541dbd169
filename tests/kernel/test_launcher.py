"""lora_kernel.kernel.launcher: the kernel starts guarded, offline, and logs from the first
event."""
from __future__ import annotations

import pytest

from lora_kernel.kernel.launcher import kernel_id_from_argv


@pytest.mark.parametrize("argv, expected", [
    (["-f", "/run/kernel-0a1b-2c.json"], "0a1b-2c"),
    (["--f=/x/kernel-abc.json"], "abc"),
    (["-f", "/x/other.json"], None),
    ([], None),
])
def test_kernel_id_from_connection_file(argv, expected):
    assert kernel_id_from_argv(argv) == expected


@pytest.mark.slow
def test_kernel_is_offline_guarded_and_logged_from_the_start(lora_kernel):
    k = lora_kernel(env={"HTTPS_PROXY": "http://proxy.example:3128",
                         "http_proxy": "http://proxy.example:3128", "HF_HUB_OFFLINE": "0"})
    res = k.run_json(r'''
import os, sys, json
from lora_kernel.kernel import guard
keys = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK", "WANDB_MODE", "GRADIO_ANALYTICS_ENABLED",
        "HTTPS_PROXY", "http_proxy"]
print(json.dumps({"env": {k: os.environ.get(k) for k in keys}, "guard": guard.installed(),
                  "impl": get_ipython().kernel.implementation}))
''')
    assert res["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                          "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                          "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
                          "GRADIO_ANALYTICS_ENABLED": "False", "HTTPS_PROXY": None,
                          "http_proxy": None}
    assert res["guard"] is True and res["impl"] == "lora_kernel"
    start = k.events()[0]
    assert start["type"] == "kernel_start" and start["seq"] == 1
    assert start["ipykernel_loaded_before_guard"] is False
    assert start["policy"].endswith("egress.yaml")


@pytest.mark.slow
def test_kernel_refuses_to_start_on_a_malformed_policy(lora_kernel):
    with pytest.raises(RuntimeError):
        lora_kernel(policy="allow: [{cidr: not-a-network}]\n")


@pytest.mark.slow
def test_graceful_shutdown_finalizes_the_users_objects_and_logs_kernel_stop(lora_kernel,
                                                                            tmp_path):
    """The kernel leaves with os._exit after a gc.freeze(); what the user's namespace alone
    held is still finalized at shutdown (a file left open is flushed and closed)."""
    out = tmp_path / "unclosed.txt"
    k = lora_kernel()
    assert k.run(f"""
fh = open({str(out)!r}, "w", buffering=1 << 20)
fh.write("x" * 1000)
class Marker:
    def __del__(self):
        open({str(out)!r} + ".del", "w").write("finalized")
m = Marker()
""")["status"] == "ok"
    assert out.read_text() == ""  # still in the buffer
    k.shutdown()
    assert out.read_text() == "x" * 1000
    assert (tmp_path / "unclosed.txt.del").read_text() == "finalized"
    assert k.events()[-1]["type"] == "kernel_stop"


@pytest.mark.slow
def test_kernel_offers_no_debugger_but_a_cell_may_import_debugpy(lora_kernel):
    k = lora_kernel()
    k.kc.kernel_info()
    info = k.kc.get_shell_msg(timeout=10)["content"]
    assert "debugger" not in info.get("supported_features", [])
    assert k.run_json("import json, debugpy, ipykernel.debugger as d\n"
                      "print(json.dumps([d._is_debugpy_available, bool(debugpy.__version__)]))"
                      ) == [False, True]
