"""Shared pytest fixtures for the LoRA Enclave test suite.

pytest only loads ``conftest.py`` files, so every shared fixture lives here; engineers
append their fixtures below with a line in this list.

Fixtures
--------
lora_home_tmp
    A fresh working home (``LORA_HOME``) in a temp folder for one test.
lora_kernel_prefix (session)
    A temp prefix with the ``lora`` kernelspec installed (``share/jupyter/kernels/lora``),
    added to ``JUPYTER_PATH`` so that ``KernelManager(kernel_name="lora")`` finds it.
lora_kernel (function)
    Factory: ``lora_kernel(env=..., policy=..., netns=...)`` starts a *fresh* guarded kernel
    with ``jupyter_client`` and returns a ``KernelSession`` (``.run(code)`` -> result dict,
    ``.home``, ``.km``); shut down after the test. Audit hooks cannot be removed, so tests
    never share a kernel process.
"""
