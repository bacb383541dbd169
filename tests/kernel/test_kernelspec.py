"""lora_kernel.kernel.kernelspec: the ``lora`` kernelspec and ``python -m lora_kernel install``."""
from __future__ import annotations

import json
import subprocess
import sys

from jupyter_client.kernelspec import KernelSpecManager

from lora_kernel.kernel import kernelspec


def test_kernel_dict_starts_our_launcher():
    spec = kernelspec.get_kernel_dict("/venv/bin/python")
    assert spec["argv"] == ["/venv/bin/python", "-P", "-m", "lora_kernel", "-f",
                            "{connection_file}"]
    assert spec["display_name"] == "LoRA (guarded)" and spec["language"] == "python"
    assert "env" not in spec
    assert kernelspec.get_kernel_dict(extra_env={"A": "1"})["env"] == {"A": "1"}


def test_write_kernel_spec_writes_json_and_logos(tmp_path):
    folder = kernelspec.write_kernel_spec(tmp_path / "lora")
    spec = json.loads((tmp_path / "lora" / "kernel.json").read_text())
    assert folder == str(tmp_path / "lora") and spec["argv"][0] == sys.executable
    assert list((tmp_path / "lora").glob("logo-*.png"))


def test_install_into_prefix_is_found_by_jupyter(tmp_path):
    path = kernelspec.install(prefix=str(tmp_path))
    assert path.endswith("share/jupyter/kernels/lora")
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share/jupyter/kernels")])
    spec = ksm.get_kernel_spec("lora")
    assert spec.display_name == "LoRA (guarded)" and spec.argv[-1] == "{connection_file}"


def test_install_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lora_kernel", "install", "--prefix",
                           str(tmp_path), "--name", "lora-test"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Installed kernelspec lora-test" in done.stdout
    assert (tmp_path / "share/jupyter/kernels/lora-test/kernel.json").exists()


def test_install_cli_rejects_two_locations(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lora_kernel", "install", "--user",
                           "--prefix", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not allowed with" in done.stderr
