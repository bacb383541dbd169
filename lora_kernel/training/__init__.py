"""Training (untrusted side: runs as the user, inside the kernel or ``lora train``).

The one config validator, datasets, safe model loading, the loop and its tasks, exports, demo
assets. Never imports :mod:`lora_kernel.trusted`.
"""
