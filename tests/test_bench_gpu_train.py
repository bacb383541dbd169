"""``bench/gpu_train.py --tiny`` (issue 13's GPU training benchmark) runs on CPU: every
variant — ``lora train`` eager and compiled, the bare loop, for text Trainer+peft, and the
SDXL rows (issue 22: lora train, bare loop, the dreambooth_lora_sdxl-style loop), the Flux
rows (issue 25: lora train in bf16 and nf4 + checkpointing, the dreambooth_lora_flux loop) —
trains and reports a positive, finite throughput, the ratios are printed, and
``--write-docs`` fills only the tiny block of its section (never the GPU rows)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "gpu_train.py"
VARIANTS = {"image": ["lora train eager", "lora train compiled", "lora train fp32 weights",
                      "bare loop", "diffusers+peft"],
            "text": ["lora train eager", "lora train compiled", "bare loop", "Trainer+peft"],
            "sdxl": ["lora train eager", "lora train gc batch 1", "bare loop",
                     "diffusers+peft"],
            "flux": ["lora train", "lora train nf4 gc", "diffusers+peft"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_train")
    home, state = tmp / "home", tmp / "state"
    state.mkdir()
    docs = tmp / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other benchmark\n\nkept as it is\n")
    env = dict(os.environ, LORA_HOME=str(home), LORA_STATE=str(state), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LORA_PROGRESS_FILE", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--home", str(home), "--json",
         str(tmp / "results.json"), "--write-docs", "--docs", str(docs)],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=600, check=False)
    results = (json.loads((tmp / "results.json").read_text())
               if (tmp / "results.json").exists() else None)
    return proc, results, docs


def test_exits_zero(tiny_run):
    proc, _, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_every_variant_reports_a_positive_finite_throughput(tiny_run):
    proc, results, _ = tiny_run
    assert results is not None, proc.stderr[-4000:]
    assert results["tiny"] is True
    got = {(r["task"], r["variant"]): r for r in results["results"]}
    for task, names in VARIANTS.items():
        for name in names:
            r = got[(task, name)]
            assert r["ok"], r
            for key in ("steps_per_s", "items_per_s", "first_step_s"):
                assert math.isfinite(r[key]) and r[key] > 0, (task, name, key, r[key])
            assert r["mfu"] is None  # CPU: "n/a"
            assert r["peak_mem_bytes"] > 0
            assert r["measured_steps"] >= 1 and r["warmup_steps"] >= 1
            # the printed table has the row, with its throughput and MFU n/a
            row = re.search(rf"^{task}\s+{re.escape(name)}\s+([0-9.]+)\s+([0-9.,]+) "
                            rf"(images|tokens)/s\s+n/a\s", proc.stdout, re.M)
            assert row, (task, name, proc.stdout)
            assert float(row.group(1)) > 0


def test_ratios_and_targets_are_printed(tiny_run):
    proc, _, _ = tiny_run
    out = proc.stdout
    for line in ("ratio image lora-train compiled / eager: ",
                 "ratio image lora-train eager / bare loop: ",
                 "ratio image lora-train eager / diffusers+peft: ",
                 "ratio image lora-train eager / fp32 weights (half-precision frozen weights' "
                 "gain): ",
                 "ratio text lora-train compiled / eager: ",
                 "ratio text lora-train eager / bare loop: ",
                 "ratio text lora-train eager / Trainer+peft: ",
                 "ratio text lora-train best / Trainer+peft: ",
                 "ratio sdxl lora-train eager / bare loop: ",
                 "ratio sdxl lora-train eager / diffusers+peft (dreambooth_lora_sdxl): ",
                 "ratio flux lora-train / diffusers+peft (dreambooth_lora_flux): "):
        match = re.search(re.escape(line) + r"([0-9.]+)x", out)
        assert match and float(match.group(1)) > 0, (line, out)
    assert "target image lora train >= 12 steps/s on H200: n/a" in out
    assert "target sdxl peak memory <= 16 GiB (gc, batch 1): n/a here" in out
    assert "target flux nf4 peak memory <= 22 GiB (gc, batch 1): n/a here" in out
    assert "peak for MFU: n/a" in out


def test_write_docs_fills_only_the_tiny_block(tiny_run):
    _, _, docs = tiny_run
    text = docs.read_text()
    assert "## Other benchmark\n\nkept as it is\n" in text
    assert text.count("## GPU training benchmark (bench/gpu_train.py)") == 1
    gpu = text.split("<!-- gpu_train.py: gpu results start -->")[1].split(
        "<!-- gpu_train.py: gpu results end -->")[0]
    assert "Not measured yet." in gpu and "|" not in gpu
    tiny = text.split("<!-- gpu_train.py: tiny results start -->")[1].split(
        "<!-- gpu_train.py: tiny results end -->")[0]
    assert "| image | lora train compiled |" in tiny
    assert "| text | Trainer+peft |" in tiny
    assert "| sdxl | diffusers+peft |" in tiny
    assert "| flux | lora train nf4 gc |" in tiny
    assert "torch " in tiny and "transformers " in tiny and "peft " in tiny


def test_gpus_2_on_cpu_is_a_gloo_smoke_row_of_data_parallel_scaling(tmp_path):
    """Issue 26: ``--gpus 2`` trains the tiny SD on 1 process and on 2 (gloo on CPU, the
    same batch per process), both report a throughput, and the efficiency line is printed
    (on CPU it says the path works, not how a GPU server scales)."""
    env = dict(os.environ, LORA_HOME=str(tmp_path / "home"), LORA_STATE=str(tmp_path),
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LORA_PROGRESS_FILE", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--gpus", "2", "--only", "image", "--home",
         str(tmp_path / "home"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = {r["variant"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    one, two = got["lora train 1 GPU"], got["lora train 2 GPUs"]
    for r in (one, two):
        assert r["ok"] and math.isfinite(r["steps_per_s"]) and r["steps_per_s"] > 0, r
    assert two["items_per_s"] == pytest.approx(two["steps_per_s"] * 2 * 4)  # global batch
    line = re.search(r"^scaling image 2 GPUs: efficiency ([0-9.]+) = ", proc.stdout, re.M)
    assert line and float(line.group(1)) > 0, proc.stdout
    assert "CPU gloo smoke row" in proc.stdout
