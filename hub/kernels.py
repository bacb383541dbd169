"""The single-user server's kernel spec manager — moved to :mod:`hub.singleuser.kernels`. This
name stays because installed deployments start servers with
``--ServerApp.kernel_spec_manager_class=hub.kernels.LoraOnlyKernelSpecManager``: it *is* that
module (one module object). Runs as: the user (in their single-user server).
"""
import sys

from hub.singleuser import kernels as _module

sys.modules[__name__] = _module
