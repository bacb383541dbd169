"""The environment of a recorded run's kernel: nothing from the requester's home runs or is
read before (or instead of) the pinned notebook.

Runs as: the run's user (the executor's ``run`` step, before it starts the kernel).

A kernel started with the user's ordinary environment runs code the executed notebook does
not show: IPython startup files (``~/.ipython/profile_default/startup/*.py``), kernel config
(``ipython_kernel_config.py``: ``exec_lines``, extensions) from ``~/.ipython`` or
``~/.jupyter``, a ``lora`` kernelspec of the same name in ``~/.local/share/jupyter/kernels``,
``usercustomize`` and ``.pth`` files in the user's site-packages, ``PYTHONPATH`` /
``PYTHONSTARTUP``, a matplotlibrc. And caches in the user's home (latents keyed by the
claimed dataset version, compiled kernels) can be edited to train on something else.

:func:`apply_recorded_run_environment` points every one of those paths at fresh folders under
the run's work folder (``<work>/.env/``, made here, mode 0700) and drops the variables that add
user code; the latent and compile caches go to ``<work>/.env/cache`` (per run, never reused
from a folder the user could fill beforehand: run ids are unguessable). The kernel itself
makes itself non-dumpable (:func:`lora_kernel.kernel.launcher.main`), so another process of
the same user cannot ptrace it or read its memory.

What this does not stop: a process of the same uid acting *during* the run (writing into the
work folder, signalling the kernel — which fails the run). Isolating a run from its
requester's uid entirely needs a run account (issue 20, item 2; docs/security.md).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["CLEAN_DIRS", "DROPPED", "apply_recorded_run_environment"]

#: Variables that point Python or the kernel at per-user code or config. (``PYTHONPATH``,
#: ``JUPYTER_PATH`` and ``JUPYTER_CONFIG_PATH`` stay: in service mode the runner builds the
#: environment itself, so they are the platform's; in local mode the user is the runner.)
DROPPED = ("PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONINSPECT", "JUPYTER_PLATFORM_DIRS",
           "IPYTHON_DIR", "MPLRC", "BROWSER", "LD_PRELOAD")

#: Variable -> folder under ``<work>/.env``.
CLEAN_DIRS = {
    "IPYTHONDIR": "ipython",
    "JUPYTER_CONFIG_DIR": "jupyter/config",
    "JUPYTER_DATA_DIR": "jupyter/data",
    "JUPYTER_RUNTIME_DIR": "jupyter/runtime",
    "MPLCONFIGDIR": "matplotlib",
    "XDG_CONFIG_HOME": "xdg/config",
    "XDG_CACHE_HOME": "xdg/cache",
    "LORA_CACHE_DIR": "cache",
    "TORCHINDUCTOR_CACHE_DIR": "cache/torch_compile",
    "TRITON_CACHE_DIR": "cache/triton",
}


def apply_recorded_run_environment(work: Path,
                                   environ: MutableMapping[str, str] | None = None) -> Path:
    """Make ``<work>/.env`` afresh and point ``environ`` (default: this process's, which the
    kernel inherits) at it; return the folder."""
    env = os.environ if environ is None else environ
    root = Path(work) / ".env"
    if root.is_symlink() or root.exists():  # never reuse what someone else put there
        if root.is_symlink():
            root.unlink()
        else:
            shutil.rmtree(root)
    root.mkdir(mode=0o700)
    for var, rel in CLEAN_DIRS.items():
        path = root / rel
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env[var] = str(path)
    for var in DROPPED:
        env.pop(var, None)
    env["PYTHONNOUSERSITE"] = "1"  # no usercustomize / .pth from ~/.local
    return root
