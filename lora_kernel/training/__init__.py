"""Training (untrusted side: runs as the user, inside the kernel or ``lora train``).

The one config validator, datasets, safe model loading, the loop and its tasks, exports, demo
assets. Never imports :mod:`lora_kernel.trusted`.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
