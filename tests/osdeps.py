"""OS packages some tests need (Chromium, nftables...): a skip on a developer's machine, a
failure where the suite must run everything.

``make setup`` installs them when it runs as root (``.ci/os-packages.sh``) and prints the
command to run otherwise. A test that cannot find one calls :func:`missing`: it skips, unless
``LORA_TEST_STRICT=1`` (set by ``.ci/run``), where it fails — a green CI must mean that the
browser and firewall tests ran, not that they were skipped.
"""
from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("LORA_TEST_STRICT") == "1"


def missing(what: str) -> None:
    """Skip (or, under ``LORA_TEST_STRICT=1``, fail) because ``what`` is not installed."""
    why = f"{what} is missing; fix: sudo bash .ci/os-packages.sh (make setup does it as root)"
    if STRICT:
        pytest.fail(f"{why} [LORA_TEST_STRICT=1: a missing OS package is a failure]",
                    pytrace=False)
    pytest.skip(why, allow_module_level=True)
