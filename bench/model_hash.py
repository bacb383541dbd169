"""Benchmark: what the pin step pays for the base model with and without the digest cache.

Before the cache (issue 13) every ``lora run`` hashed the base model in full in its pin step
(and again in the kernel); now a run whose model's stat key (real path, device, inode, size,
mtime_ns, ctime_ns of every file) matches a cached entry only stats it. Measures both on the
demo SD model and on a random single file of ``--mib`` MiB (page cache warm: a second read).

    .venv/bin/python bench/model_hash.py [--mib 512]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the single-file model")
    args = parser.parse_args(argv)
    import yaml

    from lora_kernel.common.digests import path_sha256, stat_key
    from lora_kernel.training.demo_assets import build_demo_assets

    home = Path(tempfile.mkdtemp(prefix="bench_hash_"))
    try:
        paths = build_demo_assets(home)
        config = Path(paths["image_config"])
        base = (config.parent / yaml.safe_load(config.read_text())["base_model"]).resolve()
        big = home / "big.safetensors"
        with open(big, "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        for name, p in (("demo SD folder", base), (f"{args.mib} MiB single file", big)):
            files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files) / 2**20
            path_sha256(p)  # warm the page cache
            t0 = time.perf_counter()
            path_sha256(p)
            t1 = time.perf_counter()
            stat_key(p)
            t2 = time.perf_counter()
            print(f"{name} ({size:.1f} MiB, {len(files)} files): full hash (before) "
                  f"{t1 - t0:.3f} s, stat key (after, cache hit) {(t2 - t1) * 1000:.2f} ms, "
                  f"ratio {(t1 - t0) / (t2 - t1):.0f}x")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
