"""Benchmark: what the guarded kernel's execution log (and egress hook) cost per cell.

Two measurements, each against a baseline taken in the same run:

1. end to end: mean round-trip of a trivial cell (``x = 1``) through jupyter_client in a
   stock ipykernel (baseline) and in the ``lora`` kernel (guard + execution log);
2. in process: ``ExecLog.record_execution`` for a typical cell, local file only and with
   the hub spool, against building the same event dict without writing it (baseline).

    .venv/bin/python bench/kernel_log_overhead.py [--cells 300]

Target: the log adds < 1 ms per cell.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _kernel_round_trips(spec_dir: str, name: str, cells: int, env: dict) -> list[float]:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[spec_dir]))
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        times = []
        for i in range(cells + 20):  # 20 warm-up cells
            start = time.perf_counter()
            msg_id = kc.execute("x = 1")
            while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
                pass  # e.g. a late kernel_info_reply
            if i >= 20:
                times.append(time.perf_counter() - start)
        return times
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def end_to_end(cells: int) -> tuple[float, float]:
    """Median seconds per cell: (stock ipykernel, lora kernel)."""
    from ipykernel.kernelspec import write_kernel_spec as write_stock

    from lora_kernel.kernel.kernelspec import write_kernel_spec

    tmp = Path(tempfile.mkdtemp(prefix="lkbench"))
    write_stock(str(tmp / "kernels" / "stock"))
    write_kernel_spec(tmp / "kernels" / "lora")
    env = {**os.environ, "LORA_HOME": str(tmp / "home"), "PYTHONWARNINGS": "ignore"}
    base, lora = [], []
    for _ in range(2):  # interleave to spread machine noise over both
        base += _kernel_round_trips(str(tmp / "kernels"), "stock", cells // 2, env)
        lora += _kernel_round_trips(str(tmp / "kernels"), "lora", cells // 2, env)
    return statistics.median(base), statistics.median(lora)


def in_process(n: int = 5000) -> dict:
    """Mean seconds per call of the log's own work."""
    from lora_kernel.kernel.execlog import ExecLog, HttpSink

    tmp = Path(tempfile.mkdtemp(prefix="lkbench"))
    code = "import torch\nloss = train_step(batch)\nprint(f'{loss=:.4f}')\n" * 4
    parent = {"header": {"session": "s" * 32, "msg_id": "m" * 40, "username": "alice"},
              "metadata": {"cellId": "c" * 36}}
    reply = {"status": "ok", "execution_count": 7}
    results = {}

    start = time.perf_counter()
    for _ in range(n):
        dict(parent["header"], code=code, status=reply["status"], duration_ms=1.0)
    results["baseline (build a dict)"] = (time.perf_counter() - start) / n

    local = ExecLog(home=tmp, user="bench", environ={})
    start = time.perf_counter()
    for _ in range(n):
        local.record_execution(code, parent, reply, 0.001)
    results["record_execution, local file"] = (time.perf_counter() - start) / n
    local.close()

    spooled = ExecLog(home=tmp, user="bench2", environ={},
                      sink=HttpSink("http://127.0.0.1:9/unreachable"))
    start = time.perf_counter()
    for _ in range(n):
        spooled.record_execution(code, parent, reply, 0.001)
    results["record_execution, file + hub spool"] = (time.perf_counter() - start) / n
    spooled.spool.close(remove_if_drained=False)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}")
    res = in_process()
    base = res["baseline (build a dict)"]
    print("in process (mean per call):")
    for name, secs in res.items():
        print(f"  {name:38s} {secs * 1e6:8.1f} us   ratio {secs / base:6.1f}x baseline")
    stock, lora = end_to_end(args.cells)
    print(f"end to end, {args.cells} cells of 'x = 1' (median execute_request -> reply):")
    print(f"  stock ipykernel (baseline)  {stock * 1e3:7.3f} ms")
    print(f"  lora kernel (guard + log)   {lora * 1e3:7.3f} ms")
    print(f"  ratio {lora / stock:.3f}x, added {(lora - stock) * 1e3:+.3f} ms per cell "
          f"(target < 1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
