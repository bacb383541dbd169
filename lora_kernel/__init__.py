"""LoRA Enclave: offline LoRA training, the guarded kernel and sealed audit records.

Everything in this package runs in a user's environment. Importing it has no side
effects: the egress guard is installed explicitly by the kernel launcher
(``python -m lora_kernel``) and the offline environment by the CLI.
"""
from lora_kernel.common.version import __version__, version_info

__all__ = ["__version__", "version_info"]
