"""Benchmark: what a recorded run costs over training directly.

The same training (the demo image config, ``max_train_steps`` chosen so that the training
loop takes about ``--target-seconds``) two ways, each as the command a user types, timed wall
clock from start to exit:

* baseline: ``lora train --config image_lora.yaml -p max_train_steps N -q``
* platform: ``lora run --config image_lora.yaml -p max_train_steps N -q`` — papermill, the
  guarded ``lora`` kernel (egress hook, execution log), the notebook's displays (loss curve,
  sample grid, summary), the sealed run record and the ledger append.

Prints the ratio platform / baseline (issue 13's target: <= 1.02 on a 60-second training) and
the fixed overhead in seconds, also as the median of the per-pair differences with quartiles
(the pairs alternate which command runs first, so that a drift of the machine favours
neither). Both share one home with warm latent caches (a calibration run first).

    .venv/bin/python bench/platform_overhead.py [--target-seconds 60] [--repeat 1]
    .venv/bin/python bench/platform_overhead.py --quick      # a short smoke run
    .venv/bin/python bench/platform_overhead.py --breakdown  # where a run's fixed time goes

``--breakdown [--steps N]`` runs one 2-step (N-step) ``lora run`` in this process with
timers around the runner's steps (pin child, executor start to the first cell, last cell to
the executor's exit, collect, manifest, seal, ledger) and prints them: the fixed cost
outside the notebook.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def lscpu_model() -> str:
    """``lscpu``'s "Model name" (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def lora(*args, env) -> tuple[float, str]:
    """Run ``python -m lora_kernel.cli.main ARGS``; return (wall seconds, stdout).
    Raises on failure."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", *map(str, args)],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"lora {' '.join(map(str, args))} failed ({res.returncode}):\n"
                         f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return wall, res.stdout


def train_seconds(output_dir: Path) -> tuple[float, int]:
    """Training-loop seconds and steps from a ``training_summary.json``."""
    s = json.loads((output_dir / "training_summary.json").read_text())
    return s["seconds"], s["steps"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-seconds", type=float, default=60.0,
                        help="training-loop time to aim for (default 60)")
    parser.add_argument("--steps", type=int, help="max_train_steps (default: calibrated)")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ~5 s of training")
    parser.add_argument("--home", help="working home (default: a temp folder)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the steps of one 2-step lora run (in this process)")
    args = parser.parse_args(argv)
    if args.quick:
        args.target_seconds = 5.0

    home = Path(args.home or tempfile.mkdtemp(prefix="bench_overhead_"))
    try:
        return _breakdown(home, args.steps or 2) if args.breakdown else _bench(args, home)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)


def _breakdown(home: Path, steps: int = 2) -> int:
    """One ``lora run`` (``steps`` steps, demo config) with timers around the runner's steps;
    print when each began and ended (seconds from the start)."""
    from lora_kernel.training.demo_assets import build_demo_assets
    from lora_kernel.trusted import ledger, runner, runseal

    os.environ["LORA_HOME"] = str(home)
    os.environ.setdefault("LORA_STATE", str(home / "state"))
    config = build_demo_assets(home)["image_config"]
    t0 = time.monotonic()
    marks: list[tuple[float, str]] = []

    def timed(owner, name, label):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            marks.append((time.monotonic() - t0, f"{label} start"))
            try:
                return real(*a, **kw)
            finally:
                marks.append((time.monotonic() - t0, f"{label} end"))
        setattr(owner, name, wrapper)

    for owner, name, label in (
            (runner, "_child_json", "pin child"), (runner, "_execute", "executor"),
            (runseal, "collect_evidence", "collect"), (runseal, "build_manifest", "manifest"),
            (runseal, "seal_record", "seal"), (runseal, "_remove_work", "remove work folder")):
        timed(owner, name, label)
    timed(ledger.Ledger, "append_run", "ledger append")

    def progress(chunk: bytes) -> None:
        for line in chunk.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "cell" and rec.get("done") in (0, rec.get("cells")):
                marks.append((time.monotonic() - t0, f"cell {rec['done']}/{rec['cells']}"))
            elif rec.get("event") in ("train_start", "train_end"):
                marks.append((time.monotonic() - t0, rec["event"]))

    ctx = runner.RunContext.local(progress=progress)
    runner.run_config(config, {"max_train_steps": steps, "save_steps": 0}, ctx=ctx)
    marks.append((time.monotonic() - t0, "returned"))
    prev = 0.0
    for t, what in marks:
        print(f"{t:8.2f} s  (+{t - prev:5.2f})  {what}")
        prev = t
    print("fixed (outside the notebook): executor start -> cell 0, last cell -> executor end,"
          " and every runner step")
    return 0


def _bench(args, home: Path) -> int:
    """Calibrate, run the pairs, print the table."""
    from lora_kernel.training.demo_assets import build_demo_assets

    env = dict(os.environ, LORA_HOME=str(home))
    paths = build_demo_assets(home)
    config = paths["image_config"]
    fixed = ["-p", "save_steps", "0", "-q"]

    steps = args.steps
    if steps is None:  # calibrate: seconds per step of the training loop (warms the caches)
        cal = home / "cal"
        lora("train", "--config", config, "-p", "max_train_steps", 20, "-p", "output_dir", cal,
             *fixed, env=env)
        sec, n = train_seconds(cal)
        steps = max(2, round(args.target_seconds / (sec / n)))
        print(f"calibration: {sec / n:.3f} s/step -> max_train_steps {steps}", flush=True)

    def train(i):
        out = home / f"train{i}"
        wall, _ = lora("train", "--config", config, "-p", "max_train_steps", steps,
                       "-p", "output_dir", out, *fixed, env=env)
        return wall, train_seconds(out)[0]

    def run():
        wall, stdout = lora("run", "--config", config, "-p", "max_train_steps", steps,
                            "--home", home, "--state", home / "state", *fixed, env=env)
        record = Path(next(line.split(": ", 1)[1] for line in stdout.splitlines()
                           if line.startswith("record: ")))
        return wall, json.loads((record / "run_result.json").read_text())["seconds"]

    rows = []
    for i in range(args.repeat):  # the order alternates, so that a drift favours neither
        if i % 2:
            (t_run, loop_run), (t_train, loop_train) = run(), train(i)
        else:
            (t_train, loop_train), (t_run, loop_run) = train(i), run()
        rows.append((t_train, t_run, loop_train, loop_run))
        print(f"pair {i + 1}: lora train {t_train:.1f}s (loop {loop_train:.1f}s), "
              f"lora run {t_run:.1f}s (loop {loop_run:.1f}s), "
              f"difference {t_run - t_train:+.2f}s", flush=True)

    diffs = sorted(r[1] - r[0] for r in rows)
    t_train, t_run, loop_train, loop_run = (statistics.median(c) for c in zip(*rows, strict=True))
    import torch
    print()
    print(f"machine: {lscpu_model()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
    print(f"training: demo image config, {steps} steps, median of {args.repeat}")
    print(f"  lora train (baseline)     {t_train:8.1f} s   training loop {loop_train:.1f} s")
    print(f"  lora run (record)         {t_run:8.1f} s   training loop {loop_run:.1f} s")
    print(f"  ratio run / train         {t_run / t_train:8.3f}   (target <= 1.02 at 60 s)")
    print(f"  fixed overhead            {t_run - t_train:8.1f} s   (difference of the medians)")
    print(f"  run - train, per pair     {statistics.median(diffs):8.2f} s   median "
          f"(quartiles {diffs[len(diffs) // 4]:.2f} .. {diffs[(3 * len(diffs)) // 4]:.2f} s)")
    print(f"  loop ratio run / train    {loop_run / loop_train:8.3f}   (in-kernel vs direct)")
    print(f"  overhead outside the loop {(t_run - loop_run) - (t_train - loop_train):8.1f} s   "
          f"(run {t_run - loop_run:.1f} s, train {t_train - loop_train:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
