"""Base-model licences: ``policies/models.yaml`` says which licence each base model is under
(``models:`` entries, matched on the model's folder or file name) and which groups may train
on a licence (``licences:``; a licence without ``allowed_groups`` is open to everyone)::

    models:
      - match: "FLUX.1-dev*"          # fnmatch on the folder / file name (or the full path)
        licence: flux-1-dev-non-commercial
    licences:
      flux-1-dev-non-commercial:
        allowed_groups: [lora-research]

The runner refuses a run whose base model's licence the policy does not allow for the
user's groups (:class:`PolicyRefusal`, exit 6) before anything runs, and pins the licence in
the record (``base_model_licence``); the studio shows it next to each model.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.common.policy import load_policy, policy_path


def _policy() -> dict[str, Any]:
    return load_policy("models", {})


def model_licence(base_model: str | os.PathLike[str]) -> str | None:
    """The licence ``policies/models.yaml`` gives the model at ``base_model`` (the first
    ``models:`` entry whose ``match`` fits its name or path), None when none does. A
    malformed entry is a :class:`ConfigError` naming the policy file."""
    p = Path(base_model)
    for i, entry in enumerate(_policy().get("models") or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("match"), str)
                and isinstance(entry.get("licence"), str)):
            raise ConfigError(f"models[{i}] must be a mapping with match: <name pattern> and "
                              f"licence: <licence id>, got {entry!r}",
                              file=policy_path("models"), key="models")
        pattern = entry["match"]
        if fnmatch.fnmatch(p.name, pattern) or fnmatch.fnmatch(str(p), pattern):
            return str(entry["licence"])
    return None


def allowed_groups(licence: str) -> list[str] | None:
    """The groups that may train on a model under ``licence``; None: everyone."""
    rules = (_policy().get("licences") or {}).get(licence)
    if not isinstance(rules, dict) or rules.get("allowed_groups") is None:
        return None
    groups = rules["allowed_groups"]
    if not isinstance(groups, list):
        raise ConfigError(f"licences.{licence}.allowed_groups must be a list of group names",
                          file=policy_path("models"), key="licences")
    return [str(g) for g in groups]


def check_licence(base_model: str | os.PathLike[str], user: str,
                  groups: Iterable[str]) -> str | None:
    """The licence of ``base_model`` when ``user`` (a member of ``groups``) may train on it;
    :class:`PolicyRefusal` naming the licence and the groups when not."""
    licence = model_licence(base_model)
    if licence is None:
        return None
    allowed = allowed_groups(licence)
    if allowed is not None and not set(groups) & set(allowed):
        raise PolicyRefusal(
            f"{Path(base_model).name} is under the licence {licence!r}, which "
            f"{policy_path('models')} allows only for the groups {', '.join(allowed) or '(none)'}"
            f"; {user} is in none of them; fix: ask an administrator to add you to one, or "
            f"train on a model whose licence allows your group")
    return licence
