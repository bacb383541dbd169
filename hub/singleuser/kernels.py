"""Single-user server side: only the ``lora`` kernel exists and can start.

The spawner starts every server with
``--ServerApp.kernel_spec_manager_class=hub.kernels.LoraOnlyKernelSpecManager``. The launcher
lists only allowed kernels, and a request for any other name — the launcher, ``POST
/api/kernels {"name": "python3"}``, ``POST /api/sessions`` — is answered 403 before anything is
started. Command-line options outrank the user's own ``~/.jupyter`` config files.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

from jupyter_client.kernelspec import KernelSpecManager
from tornado import web
from traitlets import Set, Unicode

ALLOWED = {"lora"}


class LoraOnlyKernelSpecManager(KernelSpecManager):
    """A kernel-spec manager that knows only the allowed kernels (default: ``lora``)."""

    lora_kernels = Set(Unicode(), default_value=set(ALLOWED),
                       help="Kernel names users may start.").tag(config=True)

    def find_kernel_specs(self) -> dict[str, str]:
        return {name: path for name, path in super().find_kernel_specs().items()
                if name in self.lora_kernels}

    def get_kernel_spec(self, kernel_name: str):  # type: ignore[no-untyped-def]
        if kernel_name not in self.lora_kernels:
            raise web.HTTPError(403, f"kernel {kernel_name!r} is not allowed here; every "
                                     f"notebook runs in {', '.join(sorted(self.lora_kernels))}")
        return super().get_kernel_spec(kernel_name)
