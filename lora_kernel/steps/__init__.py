"""A run's user-side steps: the processes the trusted side starts as the run's user — the
runner's children (:mod:`lora_kernel.steps.executor`: pin, run, collect) and a Kubernetes Job's
container (:mod:`lora_kernel.steps.jobstep`). Runs as the run's user; untrusted: never imports
:mod:`lora_kernel.trusted` or :mod:`lora_kernel.cli`, and shares with the trusted side only
what :mod:`lora_kernel.common` defines (:mod:`lora_kernel.common.contract`,
:mod:`lora_kernel.common.runspec`, :mod:`lora_kernel.common.notebooks`).
"""
