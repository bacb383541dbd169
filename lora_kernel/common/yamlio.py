"""Reading the YAML files users and admins write (configs, parameters, policies): one loader,
one error shape (:class:`ConfigError` naming the file).

The loader is PyYAML's safe loader with the scalars kohya / diffusers users expect (YAML 1.2
core, not PyYAML's YAML 1.1): ``1e-4`` and ``5E-5`` are numbers, and only ``true`` / ``false``
(any case) are booleans, so ``mixed_precision: no`` stays the string ``"no"``. A key given
twice in one mapping is an error naming both lines, not a silent "last one wins".

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from lora_kernel.common.errors import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2 core booleans, in any case (yes/no/on/off stay strings).
_BOOL = re.compile(r"^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$")
# PyYAML's float pattern, with an exponent allowed without a dot (1e-4) and without a sign
# (1.0e5); a plain integer (no dot, no exponent) is still an int.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (``first`` and ``second`` are 1-based lines)."""

    def __init__(self, key: Any, first: int, second: int, mark: yaml.error.Mark | None) -> None:
        self.key, self.first, self.second = key, first, second
        super().__init__(None, None, f"key {str(key)!r} appears twice", mark)


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core booleans, exponent floats without a dot, and
    duplicate keys refused (:class:`DuplicateKeyError`)."""

    def construct_mapping(self, node: yaml.MappingNode,
                          deep: bool = False) -> dict[Any, Any]:
        """The mapping, after checking no key appears twice (merge keys ``<<`` may be
        overridden, as YAML allows)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line, key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _replace_resolver(tag: str, regexp: re.Pattern[str], first: str) -> None:
    """Give :class:`Loader` ``regexp`` as the implicit resolver of ``tag``, kept at its place in
    each list, for values starting with a character of ``first`` (and none for the others)."""
    Loader.yaml_implicit_resolvers = {
        ch: [(t, regexp if t == tag else r) for t, r in entries if t != tag or ch in first]
        for ch, entries in Loader.yaml_implicit_resolvers.items()}


_replace_resolver(_BOOL_TAG, _BOOL, "tTfF")
_replace_resolver(_FLOAT_TAG, _FLOAT, "-+0123456789.")


def parse_yaml(text: str) -> Any:
    """``text`` parsed with :class:`Loader` (raises ``yaml.YAMLError``, incl.
    :class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=Loader)  # Loader is a SafeLoader: no arbitrary objects


def load_yaml(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """The YAML document in ``path`` (None for an empty file); :class:`ConfigError` naming the
    file when it cannot be read or parsed, or names a key twice. ``what`` says what the file
    is, for the message."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", file=p) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          file=p) from None
    try:
        return parse_yaml(text)
    except DuplicateKeyError as exc:
        err = ConfigError(f"key {str(exc.key)!r} appears twice, at lines {exc.first} and "
                          f"{exc.second}; fix: keep one", file=p)
        err.key = str(exc.key)
        raise err from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}; "
                          "fix: check indentation and quoting", file=p) from None
