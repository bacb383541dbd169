"""Policies: YAML files under ``policies/``, the single source of truth for kernel, runner,
hub and firewall (egress allowlist, data access, GPU quotas, review, retention).

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import load_yaml

_REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def policies_dir() -> Path:
    """The policy folder: ``$LORA_POLICIES`` if set, else the repository's ``policies/``."""
    env = os.environ.get("LORA_POLICIES")
    return Path(env) if env else _REPO_POLICIES


def policy_path(name: str) -> Path:
    """Path of the policy file ``<name>.yaml``."""
    return policies_dir() / f"{name}.yaml"


def load_policy(name: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``<name>.yaml`` as a mapping merged over ``defaults``.

    A missing file yields the defaults; a malformed one raises :class:`ConfigError`
    naming the file.
    """
    path = policy_path(name)
    data: dict[str, Any] = dict(defaults or {})
    if not path.exists():
        return data
    loaded = load_yaml(path, what="policy file") or {}
    if not isinstance(loaded, dict):
        raise ConfigError("must be a YAML mapping", file=path)
    data.update(loaded)
    return data
