"""Training throughput of ``lora train`` against a minimal plain diffusers+peft loop.

Part 1 — tiny model, same data, same steps, batch size and LoRA: steps/s and peak memory
(max RSS of a child process per variant) of

* ``plain``:  a minimal diffusers+peft loop (VAE and text encoder every step, no caching),
* ``ours-cold``: ``lora train`` with an empty cache (first run, builds the latent cache),
* ``ours-warm``: ``lora train`` again (second run, caches hit).

Target: ours-warm >= 1.0x plain.

Part 2 — a full-size SD1.5-architecture UNet (random weights, 512 px, batch 1): the share
of our step time spent in UNet forward+backward, the floor no trainer can beat.
Target: >= 90 %.

Part 3 — quality beside the speed (issue 27): ``lora train`` on the demo config as shipped
(its own steps, with samples) and the style measures of its sample grid
(``lora_kernel.training.style_metrics``): the LoRA's gain in magenta stripe energy over the
pre-trained base, and the prompt adherence of both columns, against the floors the tests hold
the training code to. A faster loop that learns worse shows here as FAIL. Beside it the text
quality row: ``lora train`` on the demo text config as shipped and the exact-match rate of
its greedy completions on held-out demo prompts, base vs LoRA
(``lora_kernel.training.text_metrics``), against the LoRA floor and the base ceiling. And the
SDXL quality row: ``lora train`` on the demo SDXL config as shipped (the pre-trained tiny
SDXL, ``lora_kernel.training.demo_sdxl_pretrain``), sampled with ``SDXL_QUALITY_PROMPTS`` at
seeds 0 and 1 (the config itself samples one prompt), same measures and floors.

    .venv/bin/python bench/train_throughput.py            # both parts
    .venv/bin/python bench/train_throughput.py --skip-full  # tiny model only
    .venv/bin/python bench/train_throughput.py --skip-full --skip-speed  # quality row only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 200


def _plain(home: Path, steps: int) -> dict:
    """The baseline: diffusers' training example's loop (bench/gpu_train.py), fp32, CPU."""
    from gpu_train import diffusers_peft_loop  # bench/ is this script's folder

    from lora_kernel.training.checks import load_config
    config = home / "demo" / "image_lora.yaml"
    cfg = load_config(config)
    r = diffusers_peft_loop(str(config), cfg.base_model, batch=cfg.batch_size, warmup=1,
                            steps=steps)
    return {"steps": steps, "seconds": steps / r["steps_per_s"],
            "steps_per_s": r["steps_per_s"]}


def _ours(home: Path, steps: int, out: Path) -> dict:
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    cfg = load_config(home / "demo" / "image_lora.yaml",
                      {"max_train_steps": steps, "save_steps": 0, "output_dir": str(out)})
    res = train(cfg, progress=False, home=home, samples=False, log=lambda m: None)
    return {"steps": res.steps, "seconds": res.seconds, "steps_per_s": res.steps / res.seconds,
            "cache_hit": res.cache_hit}


def _quality(home: Path, out: Path, config: str = "image_lora.yaml",
             overrides: dict | None = None) -> dict:
    """A demo config as shipped (the image one by default; ``overrides`` on top), with
    samples: its measures (style and adherence for images, held-out exact match for text)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    cfg = load_config(home / "demo" / config,
                      {"save_steps": 0, "output_dir": str(out), **(overrides or {})})
    res = train(cfg, progress=False, home=home, log=lambda m: None)
    return {"steps": res.steps, "seconds": res.seconds, "steps_per_s": res.steps / res.seconds,
            "measures": res.samples["measures"]}


# the SDXL quality row's sample prompts (tests/training/test_sdxl_style.py uses the same)
SDXL_QUALITY_PROMPTS = ["a red circle in enclave style", "a blue square in enclave style",
                        "a green triangle in enclave style"]


def text_quality_line(q: dict) -> str:
    """The text quality row: exact-match rates, bounds and PASS / FAIL."""
    from lora_kernel.training.text_metrics import learned
    m = q["measures"]
    return (f"quality  demo text config, {q['steps']} steps ({q['steps_per_s']:.2f} steps/s): "
            f"held-out exact match base {m['base']['exact_match']:.0%} LoRA "
            f"{m['lora']['exact_match']:.0%} of {m['lora']['prompts']} (LoRA floor "
            f"{m['exact_match_floor']:.0%}, base ceiling {m['base_ceiling']:.0%}) "
            f"{'PASS' if learned(m) else 'FAIL'}")


def quality_line(q: dict, what: str = "demo config") -> str:
    """The quality row: measures, floors and PASS / FAIL."""
    m = q["measures"]
    ok = (m["style_gain"] >= m["style_gain_floor"]
          and (m["lora"]["adherence"] or 0.0) >= m["adherence_floor"])
    return (f"quality  {what}, {q['steps']} steps ({q['steps_per_s']:.2f} steps/s): "
            f"style gain {m['style_gain']:+.3f} (floor {m['style_gain_floor']:+.3f}), "
            f"adherence base {m['base']['adherence']:.0%} LoRA {m['lora']['adherence']:.0%} "
            f"(floor {m['adherence_floor']:.0%}) {'PASS' if ok else 'FAIL'}")


def _child(variant: str, home: Path, steps: int) -> dict:
    """Run one variant in a fresh process; return its numbers and peak RSS."""
    cmd = [sys.executable, __file__, "--child", variant, "--home", str(home),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _full_unet_share(steps: int = 3) -> dict:
    """Share of an SD1.5-size training step spent inside UNet forward+backward."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lora_kernel.training.checks import validate_config
    from lora_kernel.training.loop import run_loop
    from lora_kernel.training.models import bundled_config
    cfg_dir = bundled_config("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir / "unet"))
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(cfg_dir / "scheduler"))
    unet.requires_grad_(False)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    timer = {"unet": 0.0}

    class FullTask:
        """Our loop's real task contract with cached latents/embeddings (as on a warm run)."""

        latents = torch.randn(1, 4, 64, 64)
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim)

        def param_groups(self):
            return [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": 1e-4}]

        def named_trainable(self):
            return {n: p for n, p in unet.named_parameters() if p.requires_grad}

        def epoch_batches(self, epoch):
            return [[0]]

        def batch_size_of(self, batch):
            return 1

        def eval_batches(self):
            return [[0]]

        def train_mode(self, enabled):
            unet.train(enabled)

        def loss(self, batch, generator):
            if torch.is_grad_enabled():
                timer["step_start"] = time.perf_counter()
            noise = torch.randn(self.latents.shape, generator=generator)
            t = torch.randint(0, 1000, (1,), generator=generator)
            noisy = sched.add_noise(self.latents, noise, t)
            if not torch.is_grad_enabled():  # run_loop's evaluation passes: not timed
                return torch.nn.functional.mse_loss(unet(noisy, t, self.hidden).sample, noise)
            start = time.perf_counter()
            pred = unet(noisy, t, self.hidden).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            timer["unet"] += time.perf_counter() - start
            # Backward is timed here; the loop's own backward then runs on a detached leaf
            # (free), while clipping, optimizer, scheduler and logging run as in training.
            start = time.perf_counter()
            loss.backward()
            timer["unet"] += time.perf_counter() - start
            return loss.detach().requires_grad_()

    raw = {"base_model": str(cfg_dir), "max_train_steps": steps, "learning_rate": 1e-4,
           "output_dir": tempfile.mkdtemp(), "resolution": 512}
    cfg = validate_config(raw, check_paths=False)
    step_times = []

    def on_step(step, loss, lr):
        step_times.append(time.perf_counter() - timer["step_start"])

    task = FullTask()
    timer["unet"] = 0.0
    res = run_loop(cfg, task, output_dir=Path(raw["output_dir"]), device=torch.device("cpu"),
                   progress=False, on_step=on_step)
    return {"steps": res.steps, "loop_seconds": sum(step_times), "unet_seconds": timer["unet"],
            "params_lora": sum(p.numel() for p in task.named_trainable().values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["plain", "ours", "quality", "text-quality",
                                            "sdxl-quality"])
    ap.add_argument("--home", type=Path)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="part 3 (quality) only")
    args = ap.parse_args()
    if args.child:
        if args.child == "quality":
            out = _quality(args.home, Path(tempfile.mkdtemp()))
        elif args.child == "text-quality":
            out = _quality(args.home, Path(tempfile.mkdtemp()), "text_lora.yaml")
        elif args.child == "sdxl-quality":
            out = _quality(args.home, Path(tempfile.mkdtemp()), "sdxl_lora.yaml",
                           {"sample_prompts": SDXL_QUALITY_PROMPTS, "sample_seeds": [0, 1]})
        else:
            out = _plain(args.home, args.steps) if args.child == "plain" else _ours(
                args.home, args.steps, Path(tempfile.mkdtemp()))
        out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    from lora_kernel.training.demo_assets import build_demo_assets
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["LORA_HOME"] = str(home)
        build_demo_assets(home)
        quality = _child("quality", home, args.steps)
        text_quality = _child("text-quality", home, args.steps)
        sdxl_quality = _child("sdxl-quality", home, args.steps)
        if args.skip_speed:
            print(quality_line(quality))
            print(quality_line(sdxl_quality, "demo SDXL config"))
            print(text_quality_line(text_quality))
            return
        plain = _child("plain", home, args.steps)
        cold = _child("ours", home, args.steps)
        warm = _child("ours", home, args.steps)
    print(f"tiny SD, {args.steps} steps, batch from demo config (CPU, {os.cpu_count()} cores)")
    print(f"{'variant':12s} {'steps/s':>8s} {'ratio':>6s} {'peak RSS MB':>12s}")
    for name, r in (("plain", plain), ("ours-cold", cold), ("ours-warm", warm)):
        print(f"{name:12s} {r['steps_per_s']:8.2f} {r['steps_per_s'] / plain['steps_per_s']:6.2f}"
              f" {r['max_rss_mb']:12.0f}")
    print(f"ours-warm / plain = {warm['steps_per_s'] / plain['steps_per_s']:.2f}x "
          f"(target >= 1.0x); cache hit on warm run: {warm['cache_hit']}")
    print(quality_line(quality))
    print(quality_line(sdxl_quality, "demo SDXL config"))
    print(text_quality_line(text_quality))
    if not args.skip_full:
        full = _full_unet_share()
        share = full["unet_seconds"] / full["loop_seconds"]
        print(f"SD1.5-size UNet, 512 px, batch 1, {full['steps']} steps: loop "
              f"{full['loop_seconds']:.1f}s, UNet fwd+bwd {full['unet_seconds']:.1f}s, "
              f"share {share:.1%} (target >= 90%)")


if __name__ == "__main__":
    main()
