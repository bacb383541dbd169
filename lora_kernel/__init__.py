"""LoRA Enclave: offline LoRA training, the guarded kernel and sealed audit records.

The package is split by who may run it (see README "Trust boundary"): ``common`` (neutral),
``kernel`` and ``training`` (the user's side, untrusted), ``provenance`` (read-only
verifiers), ``trusted`` (the service account's side) and ``cli``. Importing it has no side
effects: the egress guard is installed explicitly by the kernel launcher
(``python -m lora_kernel``) and the offline environment by the CLI.

Runs as: whichever account imports the package.
"""
from lora_kernel.common.version import __version__, version_info

__all__ = ["__version__", "version_info"]
