"""lora_kernel.training.fit and bench/llm_memory.py: the memory a language-model run needs in
fp32, bf16 and nf4, on the tiny demo model and on a Llama-3-8B layout (meta device), and what
``lora config`` says about the machine's GPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lora_kernel.training.checks import load_config
from lora_kernel.training.fit import Gpu, fit_summary

REPO = Path(__file__).resolve().parents[2]
GIB = 2 ** 30


def _bench():
    spec = importlib.util.spec_from_file_location("llm_memory", REPO / "bench" / "llm_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_8b_llama_fits_a_24_gib_card_in_bf16_and_nf4_but_not_fp32():
    rows = {r["row"]: r for r in _bench().run(seq=2048, batch=1)}
    assert 8.0e9 < rows["fp32"]["params"] < 8.1e9
    assert rows["fp32"]["weights"] == 2 * rows["bf16"]["weights"]
    # 4-bit layers (~0.52 B/weight) + bf16 embeddings and head: about a third of bf16's
    assert rows["nf4"]["weights"] < 0.4 * rows["bf16"]["weights"]
    assert [rows[k]["fits_24gib"] for k in ("fp32", "bf16", "nf4")] == [False, True, True]


def test_lora_config_says_whether_the_run_fits_each_gpu(demo_home):
    cfg = load_config(demo_home / "demo" / "chat_lora.yaml")
    line = fit_summary(cfg, [Gpu(0, "NVIDIA RTX 4090", 24 * GIB, 20 * GIB)])
    assert line.startswith("memory estimate") and " in nf4 " in line
    assert line.endswith("; GPU 0 NVIDIA RTX 4090 (24.0 GiB) fits")
    tiny = fit_summary(cfg, [Gpu(0, "toy", 2 ** 10, 2 ** 10)])  # the refusal's twin
    assert "does NOT fit" in tiny and "gradient_checkpointing: true" in tiny
    assert "no GPU seen" in fit_summary(cfg, [])


def test_lora_config_prints_it_on_its_last_line(demo_home, capsys):
    from lora_kernel.cli import main as cli
    assert cli.main(["config", str(demo_home / "demo" / "chat_lora.yaml")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(str(demo_home / "demo" / "chat_lora.yaml") + ": OK; memory estimate")
