"""The user's side: what runs as the user in their kernel, their notebooks and their terminal —
the studio, the notebooks' helpers, the client of the hub's runs service and the progress
views. Untrusted: never imports :mod:`lora_kernel.trusted` or :mod:`lora_kernel.cli`; it reaches
the trusted side only over HTTP (the hub) or by starting ``lora run``.

Runs as: the user (their kernel, notebooks and terminal).
"""
