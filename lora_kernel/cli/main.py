"""The ``lora`` command line. It only builds arguments and calls one library function;
library errors become messages and exit codes here (see :mod:`lora_kernel.common.errors`).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lora_kernel.common.errors import LoraError
from lora_kernel.common.offline import apply_offline_env
from lora_kernel.common.version import __version__

# Modules that add sub-commands: each defines ``register(subparsers)`` and sets
# ``func`` on its parsers to a callable taking the parsed ``args`` and returning an exit code.
COMMAND_MODULES = [
    "lora_kernel.cli.train",
    "lora_kernel.cli.assets",
    "lora_kernel.cli.audit",
    "lora_kernel.cli.run",
    "lora_kernel.cli.runner",
    "lora_kernel.cli.data",
    "lora_kernel.cli.label",
    "lora_kernel.cli.firewall",
    "lora_kernel.cli.posttrain",
    "lora_kernel.cli.merge",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="lora", description="LoRA Enclave: offline LoRA training with sealed audit records.")
    parser.add_argument("--version", action="version", version=f"lora-enclave {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lora`` console script."""
    apply_offline_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraError as exc:
        print(f"lora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `lora config --keys | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"lora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
