"""The training notebooks: where they are and which one a config's task runs. Shared by the
trusted runner (which notebook a ``lora run --config`` executes) and the user-side steps (a
Kubernetes Job picks it the same way). Runs as: whichever account imports it.
"""
from __future__ import annotations

import os
from pathlib import Path

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import load_yaml

__all__ = ["NOTEBOOKS", "config_task", "notebook_dir", "notebook_for_task",
           "training_notebook_digests"]

NOTEBOOKS = {"image": "train_image_lora.ipynb", "text": "train_text_lora.ipynb"}


def notebook_dir() -> Path:
    """Where the training notebooks live: ``$LORA_NOTEBOOKS`` or the checkout's ``notebooks/``."""
    env = os.environ.get("LORA_NOTEBOOKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "notebooks"


def notebook_for_task(task: str) -> Path:
    """The training notebook of ``task`` (``image`` or ``text``)."""
    if task not in NOTEBOOKS:
        raise ConfigError(f"no notebook for task {task!r}; use image or text", key="task")
    path = notebook_dir() / NOTEBOOKS[task]
    if not path.is_file():
        raise ConfigError(f"training notebook {path} not found; fix: set LORA_NOTEBOOKS to the "
                          f"folder holding {NOTEBOOKS[task]}", key="task")
    return path


def config_task(config_path: str | os.PathLike[str]) -> str:
    """The ``task:`` of a config file (``image`` when absent), read without validating it:
    it only picks the notebook, which then validates the whole config as the user."""
    data = load_yaml(config_path, what="config")
    task = data.get("task", "image") if isinstance(data, dict) else "image"
    return str(task)


def training_notebook_digests() -> dict[str, str]:
    """``{sha256: file name}`` of the platform's training notebooks as installed: a run is
    of kind ``training`` (numbers measured by the platform's own loop) only when it executed
    one of these byte for byte; any other notebook that takes a ``config_path`` is the
    user's code and its numbers are self-reported."""
    import hashlib

    out = {}
    for name in NOTEBOOKS.values():
        path = notebook_dir() / name
        if path.is_file():
            out[hashlib.sha256(path.read_bytes()).hexdigest()] = name
    return out
