"""The guarded kernel launcher: ``python -m lora_kernel -f {connection_file}``.

Order matters, and is the whole point of this module:

1. drop the current directory from ``sys.path`` (a notebook folder must not shadow modules);
2. set the offline environment (``lora_kernel.common.offline.apply_offline_env``);
3. open the execution log (``lora_kernel.kernel.execlog.ExecLog``);
4. install the egress guard (audit hook, ``policies/egress.yaml``) reporting to the log, and
   the ``trust_remote_code`` refusal;
5. only then import ipykernel and start ``IPKernelApp`` with :class:`GuardedKernel`, which
   logs every execute_request (duration, status and error name come from the reply).

Runs as: the user (their kernel; a recorded run's kernel as the run's user).
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import time
from pathlib import Path

KERNEL_ID_RE = re.compile(r"kernel-(?P<id>[A-Za-z0-9-]+)\.json$")


def kernel_id_from_argv(argv: list[str]) -> str | None:
    """The kernel id in the connection file name (``kernel-<id>.json``), if any."""
    conn = None
    for i, arg in enumerate(argv):
        if arg in ("-f", "--f", "--connection-file", "--ConnectionFileMixin.connection_file"):
            conn = argv[i + 1] if i + 1 < len(argv) else None
        elif arg.startswith(("-f=", "--f=", "--connection-file=")):
            conn = arg.split("=", 1)[1]
    match = KERNEL_ID_RE.search(conn or "")
    return match.group("id") if match else None


def make_kernel_class(execlog):
    """An ``IPythonKernel`` subclass that logs each execution to ``execlog``.

    Wrapping ``do_execute`` (not IPython's pre/post_run_cell events) also covers silent
    executions and gives the reply's status and error name as the frontend sees them.
    """
    from ipykernel.ipkernel import IPythonKernel

    class GuardedKernel(IPythonKernel):
        """IPython kernel with the LoRA Enclave execution log."""

        implementation = "lora_kernel"

        async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                             allow_stdin=False, *, cell_meta=None, cell_id=None):
            """Run the cell as ipykernel does, then log one ``execute`` event."""
            start = time.perf_counter()
            reply = None
            try:
                reply = await super().do_execute(
                    code, silent, store_history, user_expressions, allow_stdin,
                    cell_meta=cell_meta, cell_id=cell_id)
                return reply
            finally:
                execlog.record_execution(code, self.get_parent("shell"), reply,
                                         time.perf_counter() - start, silent=silent,
                                         cell_id=cell_id)

    return GuardedKernel


def main(argv: list[str] | None = None) -> None:
    """Start the guarded kernel (the kernelspec's argv runs this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.path and (sys.path[0] in ("", ".") or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]  # IPython adds the notebook folder back for user imports

    from lora_kernel.common.errors import LoraError
    from lora_kernel.common.offline import apply_offline_env
    from lora_kernel.common.process import die_with_parent, make_undumpable
    from lora_kernel.common.version import __version__
    from lora_kernel.kernel import guard
    from lora_kernel.kernel.execlog import ExecLog, sink_from_env

    apply_offline_env()
    if os.environ.get("LORA_RUN_ID"):  # a recorded run: never outlive its executor, and
        die_with_parent()              # no ptrace or memory reads by the user's processes
        make_undumpable()
    try:
        policy = guard.load_egress_policy()
        log = ExecLog(kernel_id=kernel_id_from_argv(argv), sink=sink_from_env())
    except (LoraError, ValueError, OSError) as exc:
        print(f"lora kernel: not started: {exc}", file=sys.stderr)  # the kernel's stderr
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    guard.install(policy, report=log.record_guard_event)
    guard.install_remote_code_refusal(policy.path)
    log.emit("kernel_start", version=__version__, policy=policy.path,
             python=sys.version.split()[0],
             ipykernel_loaded_before_guard="ipykernel" in sys.modules)
    log.start()
    atexit.register(log.close)

    # No debugger in the guarded kernel (its kernelspec says debugger: false), yet ipykernel
    # imports debugpy at every start (~0.1 s of every run). Hidden while ipykernel looks, so
    # that it records "not available"; a cell may still import debugpy.
    hidden = "debugpy" not in sys.modules
    if hidden:
        sys.modules["debugpy"] = None  # type: ignore[assignment]  # None: ImportError
    try:
        import ipykernel.debugger  # noqa: F401 - caches _is_debugpy_available = False
    finally:
        if hidden and sys.modules.get("debugpy", False) is None:
            del sys.modules["debugpy"]

    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(argv=argv, kernel_class=make_kernel_class(log))
    # Shut down (the loop stopped after a shutdown_request): run the exit handlers — the
    # execution log's kernel_stop and last delivery, ipykernel's connection-file cleanup —
    # then leave without the interpreter's module teardown, which after a training (torch,
    # diffusers, their threads) took ~2 s of every recorded run.
    # IPython's exit handler clears the user's namespace (objects nothing else holds are
    # finalized: files closed and flushed) and then collects the whole heap, which after a
    # training took 0.25 s of every run; gc.freeze() leaves only what is created from now on
    # to that collection. Reference cycles in the user's namespace are not finalized (the
    # process ends next): close files explicitly.
    import gc
    gc.freeze()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
