"""The training notebooks' helpers, moved to :mod:`lora_kernel.user.notebook` (the user's side).

This name stays because installed training notebooks import it
(``import lora_kernel.notebook as lk``): it *is* that module (one module object, so
``lora_kernel.notebook`` and ``lora_kernel.user.notebook`` share state and patches).
Runs as: the user (in their kernel).
"""
import sys

from lora_kernel.user import notebook as _module

sys.modules[__name__] = _module
