"""``lora demo-assets``: build the tiny demo models, datasets and configs (no download).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations


def cmd_demo_assets(args) -> int:
    """Build the demo assets into ``<home>/demo`` and print where everything went."""
    from lora_kernel.training.demo_assets import build_demo_assets
    paths = build_demo_assets(args.home, seed=args.seed)
    for key, path in paths.items():
        print(f"{key:20s} {path}")
    return 0


def register(sub) -> None:
    """Add ``demo-assets`` to the ``lora`` CLI."""
    p = sub.add_parser(
        "demo-assets", help="build the tiny demo models, datasets and configs",
        description="Generate, deterministically and offline, a tiny Stable Diffusion model "
                    "(folder and single .safetensors), a tiny Llama, an image and a text "
                    "dataset and two ready-to-run configs into <home>/demo.")
    p.add_argument("--home", default=None,
                   help="working home (default: $LORA_HOME, else ./lora_home)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight init (default 0)")
    p.set_defaults(func=cmd_demo_assets)
