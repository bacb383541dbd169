"""The parameters a notebook declares, read without importing papermill.

A papermill notebook declares its parameters in the first cell tagged ``parameters``: each
top-level assignment there (``name = value``, ``name: type = value``, ``a = b = 1``) is one.
``papermill.inspect_notebook`` answers the same for the usual cells, but matches lines with a
pattern, so it also takes an indented assignment and misses ``a = 1; b = 2``; this module
reads the cell as the ``lora`` kernel (always Python) runs it, with :mod:`ast`, and without
``import papermill`` (nbformat, jsonschema, nbclient, jupyter_client: about half a second of
every ``lora run``'s pin step and command line, which only need the names).

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError

PARAMETERS_TAG = "parameters"


def parameters_cell(nb: Any) -> str | None:
    """The source of the first cell tagged ``parameters`` of a notebook's JSON (or None)."""
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list):
        raise ValueError("it has no list of cells")
    for cell in cells:
        meta = cell.get("metadata") if isinstance(cell, dict) else None
        tags = meta.get("tags") if isinstance(meta, dict) else None
        if isinstance(tags, list) and PARAMETERS_TAG in tags:
            source = cell.get("source", "")
            if isinstance(source, list) and all(isinstance(part, str) for part in source):
                return "".join(source)
            if isinstance(source, str):
                return source
            raise ValueError("its parameters cell's source is not text")
    return None


def names_in(source: str) -> list[str]:
    """Names assigned at the top level of a parameters cell, in order. The cell runs in an
    IPython kernel: a cell that is not plain Python is read as IPython reads it (``%magic``,
    ``!shell``, ``x = !cmd``). Raises SyntaxError (or ValueError, MemoryError, RecursionError
    for what :func:`ast.parse` cannot take)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        from IPython.core.inputtransformer2 import TransformerManager

        ipython = TransformerManager()  # type: ignore[no-untyped-call]
        tree = ast.parse(ipython.transform_cell(source))
    names: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None \
                and isinstance(stmt.target, ast.Name):
            targets = [stmt.target.id]
        else:
            continue
        names.extend(t for t in targets if t not in names)
    return names


def declared_parameters(path: str | os.PathLike[str], data: bytes | None = None) -> list[str]:
    """The parameter names ``path`` declares (``data``: its bytes, already read). A file that
    cannot be read, is not a notebook, or whose parameters cell is not Python is a
    :class:`ConfigError` naming it."""
    try:
        raw = data if data is not None else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the notebook: {exc.strerror or exc}", file=path) from None
    try:
        source = parameters_cell(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a readable notebook (.ipynb JSON): {exc}; fix: give a Jupyter "
                          "notebook file", file=path) from None
    if source is None:
        return []
    try:
        return names_in(source)
    except SyntaxError as exc:
        why = f"line {exc.lineno}: {exc.msg}"
    except (ValueError, MemoryError, RecursionError) as exc:
        why = str(exc) or type(exc).__name__
    raise ConfigError(f"its parameters cell is not valid Python ({why}); fix: one "
                      "`name = value` per line in the cell tagged 'parameters'", file=path)
