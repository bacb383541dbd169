"""Compiled training (issue 13, ``compile: true``) on the tiny demo Llama, on CPU: the loss
curve matches eager, nothing recompiles between steps, and the adapter reloads in PEFT."""
from __future__ import annotations

import os

import pytest
import torch

from lora_kernel.training import loop
from lora_kernel.training.checks import load_config
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow
STEPS = 4
# The production backend, inductor (C++ codegen with gcc on CPU), made this module take
# ~110 s on 2 shared cores, so the tests compile with aot_eager (dynamo graph capture and
# AOTAutograd, no codegen) unless LORA_TEST_COMPILE_BACKEND says otherwise:
#   LORA_TEST_COMPILE_BACKEND=inductor .venv/bin/pytest tests/training/test_compile.py
BACKEND = os.environ.get("LORA_TEST_COMPILE_BACKEND", "aot_eager")
RTOL = 1e-3


def _run(demo_home, tmp_path_factory, compile_mode: str, on_step=None):
    cfg = load_config(demo_home / "demo" / "text_lora.yaml",
                      {"output_dir": str(tmp_path_factory.mktemp(f"text-{compile_mode}")),
                       "save_steps": 0, "max_train_steps": STEPS, "sample_prompts": [],
                       "compile": compile_mode})
    return cfg, train(cfg, progress=False, home=demo_home, log=lambda m: None,
                      on_step=on_step)


@pytest.fixture(scope="module")
def runs(demo_home, tmp_path_factory):
    """An eager and a compiled run of the same config; compile counts after each step."""
    saved = {k: os.environ.get(k) for k in (loop.COMPILE_BACKEND_ENV, "TORCHINDUCTOR_CACHE_DIR")}
    os.environ[loop.COMPILE_BACKEND_ENV] = BACKEND
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    from torch._dynamo.utils import counters
    try:
        _, eager = _run(demo_home, tmp_path_factory, "false")
        torch._dynamo.reset()
        counters.clear()
        per_step: dict[int, int] = {}

        def count(step, loss, lr):
            per_step[step] = sum(counters["stats"].values()) + counters["frames"]["ok"]

        cfg, compiled = _run(demo_home, tmp_path_factory, "true", on_step=count)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return eager, compiled, per_step, cfg


def test_compile_key_is_validated(demo_home):
    from lora_kernel.common.errors import ConfigError
    path = demo_home / "demo" / "text_lora.yaml"
    assert load_config(path).compile == "auto"
    assert load_config(path, {"compile": True}).compile == "true"
    assert load_config(path, {"compile": False}).compile == "false"
    with pytest.raises(ConfigError, match="compile"):
        load_config(path, {"compile": "sometimes"})


def test_auto_is_on_only_for_long_cuda_runs(demo_home):
    cfg = load_config(demo_home / "demo" / "text_lora.yaml")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not loop.compile_enabled(cfg, cpu, 10_000)
    assert not loop.compile_enabled(cfg, cuda, loop.COMPILE_MIN_STEPS - 1)
    assert loop.compile_enabled(cfg, cuda, loop.COMPILE_MIN_STEPS)
    forced = load_config(demo_home / "demo" / "text_lora.yaml", {"compile": True})
    assert loop.compile_enabled(forced, cpu, 1)
    off = load_config(demo_home / "demo" / "text_lora.yaml", {"compile": False})
    assert not loop.compile_enabled(off, cuda, 10_000)


def test_compiled_loss_curve_matches_eager(runs):
    eager, compiled, _, _ = runs
    assert len(eager.losses) == len(compiled.losses) == STEPS  # every step's loss is kept
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses),
                               rtol=RTOL, atol=1e-5)


def test_no_recompiles_between_steps(runs):
    _, _, per_step, _ = runs
    assert per_step[1] > 0, per_step  # it did compile
    assert per_step[2] == per_step[STEPS], per_step


def test_compiled_run_adapter_reloads_in_peft(runs):
    from peft import PeftModel

    from lora_kernel.training.models import load_causal_lm
    _, res, _, cfg = runs
    trained, tok = res.live["model"], res.live["tokenizer"]
    assert getattr(trained, "_compiled_call_impl", None) is None  # eager again after the loop
    base, _ = load_causal_lm(cfg.base_model)
    reloaded = PeftModel.from_pretrained(base, res.adapter_files["peft"])
    ids = tok("Q: what is the code for apple? A:", return_tensors="pt").input_ids
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits,
                                   reloaded(input_ids=ids).logits, atol=0, rtol=0)
