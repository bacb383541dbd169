"""Demo configs for tests: a config of the session's demo assets (``demo_home``) with absolute
paths and some keys changed, written to a fresh temp file (shared by the training tests)."""
from __future__ import annotations

from pathlib import Path

import yaml


def write_config(demo_home: Path, tmp_path: Path, name: str, **changes) -> Path:
    """The demo config ``name`` with absolute paths and ``changes``, as a temp file."""
    demo = demo_home / "demo"
    data = yaml.safe_load((demo / name).read_text())
    for key in ("train_data_dir", "metadata_path", "base_model"):
        if data.get(key):
            data[key] = str((demo / data[key]).resolve())
    data.update(changes)
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
