"""Reproducers of the README's bad-input table (``tests/test_exit_codes.py`` runs them).

Each module in this package defines ``CASES = {README case text: reproducer}`` and may define
``SLOW = {case, ...}`` (cases that start a kernel or train). A reproducer takes a
:class:`Case` and returns the ``lora`` argv to run.
"""
from __future__ import annotations

from pathlib import Path

import yaml


class Case:
    """What a reproducer needs: a temp folder, a copy of the demo config, sealed records."""

    def __init__(self, tmp_path: Path, demo_home: Path, make_run, monkeypatch) -> None:
        self.tmp = tmp_path
        self.demo = demo_home / "demo"
        self.make_run = make_run
        self.monkeypatch = monkeypatch

    def config(self, **changes) -> Path:
        """The demo image config with ``changes`` (None removes a key), in a temp file."""
        data = yaml.safe_load((self.demo / "image_lora.yaml").read_text())
        for key in ("train_data_dir", "metadata_path", "base_model"):
            if data.get(key):
                data[key] = str((self.demo / data[key]).resolve())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def policies(self, review: str) -> None:
        pdir = self.tmp / "policies"
        pdir.mkdir(exist_ok=True)
        (pdir / "review.yaml").write_text(review)
        self.monkeypatch.setenv("LORA_POLICIES", str(pdir))
