"""The ``lora`` kernelspec, built from functions like ipykernel's ``kernelspec`` module.

Runs as: the user (their kernel; a recorded run's kernel as the run's user).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lora_kernel.common.contract import KERNEL_NAME

DISPLAY_NAME = "LoRA (guarded)"


def make_kernel_cmd(executable: str | None = None) -> list[str]:
    """The kernel's argv: our launcher, which installs the guard before ipykernel loads.

    ``-P`` keeps the notebook's folder out of ``sys.path`` while the launcher starts, so
    a ``lora_kernel/`` or ``socket.py`` next to a notebook cannot replace the launcher.
    """
    return [executable or sys.executable, "-P", "-m", "lora_kernel", "-f", "{connection_file}"]


def get_kernel_dict(executable: str | None = None, extra_env: dict | None = None) -> dict:
    """The content of ``kernel.json``."""
    spec = {
        "argv": make_kernel_cmd(executable),
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False, "lora_enclave": {"guarded": True}},
    }
    if extra_env:
        spec["env"] = dict(extra_env)
    return spec


def write_kernel_spec(path: str | os.PathLike | None = None, executable: str | None = None,
                      extra_env: dict | None = None) -> str:
    """Write ``kernel.json`` (and ipykernel's logos when available) into ``path``
    (a new temp folder when ``None``); return the folder."""
    folder = (Path(path) if path is not None
              else Path(tempfile.mkdtemp(suffix="_kernels")) / KERNEL_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:  # ipykernel without logos: the spec works without them
        RESOURCES = None
    if RESOURCES and os.path.isdir(RESOURCES):
        for name in os.listdir(RESOURCES):
            if name.startswith("logo"):
                shutil.copy(os.path.join(RESOURCES, name), folder / name)
    (folder / "kernel.json").write_text(
        json.dumps(get_kernel_dict(executable, extra_env), indent=1) + "\n", encoding="utf-8")
    return str(folder)


def install(user: bool = False, prefix: str | None = None, sys_prefix: bool = False,
            kernel_name: str = KERNEL_NAME, executable: str | None = None) -> str:
    """Install the kernelspec with jupyter_client's ``KernelSpecManager``.

    ``user`` installs into the user's Jupyter data dir; ``prefix`` into
    ``<prefix>/share/jupyter/kernels``; ``sys_prefix`` is ``prefix=sys.prefix`` (the venv).
    Returns the installed folder.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if sys_prefix:
        prefix = sys.prefix
    with tempfile.TemporaryDirectory() as tmp:
        src = write_kernel_spec(Path(tmp) / kernel_name, executable)
        return KernelSpecManager().install_kernel_spec(
            src, kernel_name=kernel_name, user=user, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_kernel install [--user | --sys-prefix | --prefix P] [--name N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_kernel install",
                                     description="Install the 'lora' (guarded) kernelspec.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into sys.prefix ({sys.prefix})")
    where.add_argument("--prefix", help="install into PREFIX/share/jupyter/kernels")
    parser.add_argument("--name", default=KERNEL_NAME, help="kernelspec name (default lora)")
    args = parser.parse_args(argv)
    path = install(user=args.user, prefix=args.prefix, sys_prefix=args.sys_prefix,
                   kernel_name=args.name)
    print(f"Installed kernelspec {args.name} in {path}")
    return 0
