"""The README's bad-input table is a contract: every row is reproduced through the real
``lora`` entry point, gets the exit code the README states, names what is wrong, and never
shows a traceback. A row without a reproducer (or a reproducer without a row) fails.

Reproducers live in ``tests/exit_cases/`` (one module per topic, each with ``CASES``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- exit-code-cases:start -->", "<!-- exit-code-cases:end -->"


def readme_cases() -> dict[str, int]:
    """``{case: exit code}`` from the README table between the markers."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index(START) + len(START):text.index(END)]
    out = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0]] = int(cells[1])
    return out


def _load() -> tuple[dict, set]:
    import importlib
    import pkgutil

    import exit_cases

    cases, slow = {}, set()
    for info in pkgutil.iter_modules(exit_cases.__path__):
        mod = importlib.import_module(f"exit_cases.{info.name}")
        dup = set(cases) & set(mod.CASES)
        assert not dup, f"cases defined twice: {dup}"
        cases.update(mod.CASES)
        slow |= set(getattr(mod, "SLOW", ()))
    return cases, slow


REPRODUCERS, SLOW = _load()


def test_every_row_has_a_reproducer_and_every_reproducer_a_row():
    assert set(readme_cases()) == set(REPRODUCERS)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in readme_cases()])
def test_readme_exit_code(case, tmp_path, demo_home, make_run, monkeypatch, capsys,
                          lora_kernel_prefix):
    from lora_kernel.cli import main as cli

    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    from exit_cases import Case

    argv = [str(a) for a in REPRODUCERS[case](Case(tmp_path, demo_home, make_run, monkeypatch))]
    code = cli.main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == readme_cases()[case], f"lora {' '.join(argv)}\n{text}"
    assert "Traceback" not in text
    if code != 0:
        assert re.search(r"error|problem|refus|not |failed", text, re.I), text
