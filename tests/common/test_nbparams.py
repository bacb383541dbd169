"""The parameters a notebook declares (lora_kernel.common.nbparams), read without papermill:
the same names papermill's inspect_notebook finds, and one clear error for what is not a
notebook."""
from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest
from nbtools import write_notebook

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.nbparams import declared_parameters

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_shipped_notebooks_declare_what_papermill_finds(name):
    path = ROOT / "notebooks" / name
    assert declared_parameters(path) == [p for p in papermill.inspect_notebook(str(path))]


def test_assignments_annotations_multiline_values_and_magics(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", "\n".join([
        "%matplotlib inline",
        "alpha = 1  # a comment",
        "beta: float = 0.5",
        "gamma: 'int' = 3",
        "delta = {",
        "    'x': 1,  # inside",
        "}",
        "# only a comment = 1",
        "alpha = 2",
        "untyped: int",
    ]), "print(alpha)")
    names = declared_parameters(nb)
    assert names == ["alpha", "beta", "gamma", "delta"]
    assert set(names) == set(papermill.inspect_notebook(str(nb)))
    # only the top level: papermill's line patterns would also take an indented assignment
    nested = write_notebook(tmp_path / "nested.ipynb", "a = 1\nif a:\n    inner = 2")
    assert declared_parameters(nested) == ["a"]


def test_ipython_syntax_is_read_as_the_kernel_reads_it(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb",
                        "files = !ls\nhome = %env HOME\nprint?\na = 1; b = 2\nc = d = 3", "")
    assert declared_parameters(nb) == ["files", "home", "a", "b", "c", "d"]


def test_first_tagged_cell_only_and_none_without_one(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", "a = 1", "b = 2")
    data = json.loads(nb.read_text())
    data["cells"][1]["metadata"]["tags"] = ["parameters"]
    nb.write_text(json.dumps(data))
    assert declared_parameters(nb) == ["a"]
    for cell in data["cells"]:
        cell["metadata"].pop("tags")
    nb.write_text(json.dumps(data))
    assert declared_parameters(nb) == []


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not a readable notebook"),
    (b'{"cells": 3}', "no list of cells"),
    (b"\xff\xfe", "not a readable notebook"),
    (b"", "not a readable notebook"),
    (b"[]", "no list of cells"),
    (b'{"cells": [{"metadata": {"tags": ["parameters"]}, "source": [1, 2]}]}',
     "source is not text"),
    (b'{"cells": [{"metadata": {"tags": ["parameters"]}, "source": {"a": 1}}]}',
     "source is not text"),
])
def test_not_a_notebook_is_refused_naming_the_file(tmp_path, content, says):
    bad = tmp_path / "bad.ipynb"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as info:
        declared_parameters(bad)
    assert info.value.exit_code == 2 and str(bad) in str(info.value)


def test_unreadable_and_broken_parameters_cell_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the notebook"):
        declared_parameters(tmp_path / "missing.ipynb")
    nb = write_notebook(tmp_path / "nb.ipynb", "a = (1,", "print(a)")
    with pytest.raises(ConfigError, match=r"parameters cell is not valid Python \(line 1") \
            as info:
        declared_parameters(nb)
    assert "fix:" in str(info.value) and str(nb) in str(info.value)
    for cell in ("x = 1\x00", "x = " + "-" * 200_000 + "1"):  # what ast.parse cannot take
        write_notebook(nb, cell, "")
        with pytest.raises(ConfigError, match="parameters cell is not valid Python"):
            declared_parameters(nb)
