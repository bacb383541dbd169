"""Reading the YAML files users and admins write (configs, parameters, policies): one loader,
one error shape (:class:`ConfigError` naming the file)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from lora_kernel.common.errors import ConfigError


def load_yaml(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """The YAML document in ``path`` (None for an empty file); :class:`ConfigError` naming the
    file when it cannot be read or parsed. ``what`` says what the file is, for the message."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", file=p) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          file=p) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}; "
                          "fix: check indentation and quoting", file=p) from None
