"""Options shared by the ``lora`` sub-commands, defined once.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
from typing import Any

from lora_kernel.training.config import parse_value


def add_home(p: argparse.ArgumentParser) -> None:
    """``--home``: the user's working home."""
    p.add_argument("--home", default=None,
                   help="working home: datasets, models, caches, outputs, run work folders "
                        "(default $LORA_HOME or ./lora_home)")


def add_state(p: argparse.ArgumentParser) -> None:
    """``--state``: the trusted state directory (records, ledger, key)."""
    p.add_argument("--state", default=None,
                   help="state directory holding runs/ and ledger/ (default $LORA_STATE or "
                        "~/.local/state/lora-enclave; the platform's: /var/lib/lora-enclave)")


def add_runner(p: argparse.ArgumentParser) -> None:
    """``--runner``: the runner service's socket (service mode)."""
    p.add_argument("--runner", default=None, metavar="SOCKET",
                   help="runner service socket (default $LORA_RUNNER, else "
                        "/run/lora-enclave/runner.sock if it exists; otherwise a local run)")


def add_override_args(p: argparse.ArgumentParser) -> None:
    """The ``-p/--param KEY VALUE`` option shared by ``train``, ``config`` and ``run``."""
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a config key (repeatable), e.g. -p learning_rate 5e-4")


def parse_overrides(pairs: list[list[str]] | None) -> dict[str, Any]:
    """``-p key value`` pairs as a dict, values parsed like YAML (in the order given)."""
    return {key: parse_value(value) for key, value in pairs or []}
