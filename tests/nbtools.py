"""Notebooks for tests (importable from every test folder: tests/ is on sys.path through
tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path


def write_notebook(path: Path, *cells: str) -> Path:
    """A notebook for the ``lora`` kernel: the first cell tagged ``parameters``, then code
    cells; its folders are made, and it is readable by everyone (a run's user reads it)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "lora", "display_name": "LoRA (guarded)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(cells[0], metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells[1:]]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    os.chmod(path, 0o644)
    return path
