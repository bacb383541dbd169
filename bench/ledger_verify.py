"""Benchmark: verify a 10,000-entry ledger (chain + checkpoint signatures + signed head).

Prints the verify time and its ratio to a baseline measured in the same run: reading the same
rows from SQLite and computing one plain sha256 per row over the same stored bytes (the least
any hash-chain check must do). Target: verify <= 2 s for 10,000 entries.

    .venv/bin/python bench/ledger_verify.py [--entries 10000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from lora_kernel.trusted.ledger import Ledger


def fill(led: Ledger, n: int) -> None:
    """Append ``n`` entries shaped like real ones (mostly runs, some reviews/publications)."""
    for i in range(n):
        run = f"run-{i // 3:06d}"
        if i % 3 == 0:
            led.append("run", run, {"manifest_sha256": f"{i:064x}", "adapter_digest": f"{i:064x}",
                                    "user": "alice", "status": "succeeded",
                                    "started": "2026-01-01T00:00:00Z",
                                    "ended": "2026-01-01T00:10:00Z", "dataset_version": "ds-1",
                                    "base_model_sha256": "ab" * 32,
                                    "notebook_source_sha256": "cd" * 32})
        elif i % 3 == 1:
            led.append("review", run, {"decision": "approved", "reviewer": "bob",
                                       "note": "looks fine", "adapter_digest": f"{i:064x}"})
        else:
            led.append("publication", run, {"name": f"adapter-{i}", "to": "/srv/published",
                                            "expires": "2027-01-01"})


def baseline(path: Path) -> None:
    """Read every row and sha256 its stored bytes once."""
    db = sqlite3.connect(path)
    for row in db.execute("SELECT seq, time, kind, subject, payload, prev_hash, hash "
                          "FROM entries ORDER BY seq"):
        hashlib.sha256("\x1f".join(map(str, row)).encode()).hexdigest()
    db.close()


def timed(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger(state=tmp, durable=False)
        t0 = time.perf_counter()
        fill(led, args.entries)
        build = time.perf_counter() - t0
        total = led.head()[0]
        problems = led.verify()
        assert problems == [], problems
        t_verify = timed(led.verify, args.repeat)
        t_base = timed(lambda: baseline(led.path), args.repeat)
        led.close()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"ledger: {args.entries} entries + checkpoints = {total} rows "
          f"(built in {build:.1f}s, {1e3 * build / total:.2f} ms/append without fsync)")
    print(f"verify (chain + signatures + head), median of {args.repeat}: {t_verify:.3f} s "
          f"({1e6 * t_verify / total:.1f} us/entry); target <= 2 s: "
          f"{'met' if t_verify <= 2 else 'MISSED'}")
    print(f"baseline (read rows + one sha256 each): {t_base:.3f} s")
    print(f"ratio verify/baseline: {t_verify / t_base:.1f}x")


if __name__ == "__main__":
    main()
