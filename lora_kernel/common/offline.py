"""The offline environment: variables that stop ML libraries from even trying the network.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY")


def offline_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a copy of ``environ`` (default ``os.environ``) with the offline variables set
    and proxies removed; suitable for a child process."""
    env = dict(os.environ if environ is None else environ)
    env.update(OFFLINE_VARS)
    for var in PROXY_VARS:
        env.pop(var, None)
    return env


def apply_offline_env() -> None:
    """Set the offline variables in this process (CLI and kernel launcher call this)."""
    os.environ.update(OFFLINE_VARS)
    for var in PROXY_VARS:
        os.environ.pop(var, None)
