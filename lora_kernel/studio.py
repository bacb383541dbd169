"""The researcher studio, moved to :mod:`lora_kernel.user.studio` (the user's side).

This name stays because saved studio notebooks import it
(``from lora_kernel.studio import studio``): it *is* that module (one module object, so
``lora_kernel.studio`` and ``lora_kernel.user.studio`` share state and patches).
Runs as: the user (in their kernel).
"""
import sys

from lora_kernel.user import studio as _module

sys.modules[__name__] = _module
