"""``lora train`` and ``lora config``: direct training (for debugging) and config checks.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import json
import logging
import sys

from lora_kernel.cli.options import add_home, add_override_args, parse_overrides
from lora_kernel.training.checks import load_config
from lora_kernel.training.config import config_keys


def print_dataset_warnings(cfg) -> None:
    """What validation accepted but noticed in the dataset and the model, one
    ``warning: ...`` line each on stderr (empty captions, duplicate rows, 1x1 images; a
    resolution below the model's own)."""
    for text in [*cfg.key_notes, *cfg.dataset_warnings, *cfg.model_warnings]:
        print(f"warning: {text}", file=sys.stderr)


def cmd_train(args) -> int:
    """Validate the config, train, print where the adapter went."""
    from lora_kernel.training.train import output_dir_lock
    cfg = load_config(args.config, parse_overrides(args.param))
    print_dataset_warnings(cfg)
    with output_dir_lock(cfg.output_dir, source=cfg.source):
        return _train_locked(cfg, args)


def _train_locked(cfg, args) -> int:
    """:func:`cmd_train` while it holds ``output_dir``."""
    from lora_kernel.training.train import prepare_output_dir, train
    resume = args.resume if args.resume not in (None, "latest") else (
        True if args.resume == "latest" else None)
    prepare_output_dir(cfg, resume=bool(resume), overwrite=args.overwrite)
    # The library logs its notes (latent cache hit / written) at INFO: show ours, bare, on
    # stdout for this command only (not the root logger: no third-party INFO chatter).
    notes = logging.getLogger("lora_kernel")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = notes.level
    notes.addHandler(handler)
    notes.setLevel(logging.INFO)
    try:
        res = train(cfg, resume=resume, progress=not args.quiet, samples=not args.no_samples,
                    home=args.home)
    finally:
        notes.removeHandler(handler)
        notes.setLevel(old_level)
    if res.resumed_from:
        print(f"resumed from {res.resumed_from}")
    print(f"trained {res.steps} steps in {res.seconds:.1f}s "
          f"(loss {res.first_loss:.4f} -> {res.final_loss:.4f})")
    for fmt, path in res.adapter_files.items():
        print(f"adapter ({fmt}): {path}")
    if res.samples:
        print(f"samples: {res.samples.get('grid') or res.samples.get('completions')}")
        if res.samples.get("measures"):
            from lora_kernel.training.style_metrics import summary_line
            print(summary_line(res.samples["measures"]))
    print(f"summary: {res.summary_path}")
    return 0


def cmd_config(args) -> int:
    """List the config keys, or validate a config file."""
    if args.from_kohya:
        from lora_kernel.cli.kohya import cmd_from_kohya
        return cmd_from_kohya(args)
    if args.keys or not args.file:
        for key, text in config_keys().items():
            print(f"{key:28s} {text}")
        return 0
    cfg = load_config(args.file, parse_overrides(args.param))
    print_dataset_warnings(cfg)
    print(json.dumps(cfg.to_dict(), indent=1))
    family = ""
    if cfg.model_family:
        from lora_kernel.training.families import family_named
        family = f" (model family: {cfg.model_family} ({family_named(cfg.model_family).title}))"
    from lora_kernel.training.fit import fit_summary
    # the last line: OK, and the memory estimate against each GPU (NVML), before training;
    # an image run also against the usual 24 / 80 GB cards (Flux, SD3.5, SDXL...)
    cards = f"; {memory_line(cfg)}" if cfg.task == "image" else ""
    print(f"{args.file}: OK{family}; {fit_summary(cfg)}{cards}", flush=True)
    return 0


GPU_CARDS_GIB = (24, 80)  # the cards a run is sized for: a 24 GB consumer card, an 80 GB one


def memory_line(cfg) -> str:
    """What ``lora config`` says about memory: the estimate (a lower bound, see
    :func:`lora_kernel.training.models.estimate_training_memory`) and whether the run fits
    this machine's GPU (when it has one) and the usual 24 / 80 GB cards."""
    from lora_kernel.training.checks import _cuda_free_bytes, _gib
    from lora_kernel.training.models import estimate_training_memory
    est = estimate_training_memory(cfg)
    fits = ", ".join(f"{'fits' if est.device <= g * 2 ** 30 else 'does not fit'} a {g} GB GPU"
                     for g in GPU_CARDS_GIB)
    free = _cuda_free_bytes()
    here = ("" if free is None else
            f"; this GPU has {_gib(free)} free: {'fits' if est.device <= free else 'too small'}")
    return (f"memory: training needs about {_gib(est.device)} on the GPU (weights "
            f"{_gib(est.weights)} + activations {_gib(est.activations)}; a lower bound): "
            f"{fits}{here}")


def register(sub) -> None:
    """Add ``train`` and ``config`` to the ``lora`` CLI."""
    p = sub.add_parser("train", help="train a LoRA directly from a YAML config",
                       description="Train an image or text LoRA from a YAML config "
                                   "(see templates/).")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    add_override_args(p)
    add_home(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir (or the one given)")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds an earlier run: delete its checkpoints, TensorBoard "
                        "logs, samples and adapters first (without it, lora train refuses)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--no-samples", action="store_true", help="skip the final samples")
    p.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="list config keys or validate a config file")
    c.add_argument("file", nargs="?", help="config file to validate")
    c.add_argument("--keys", action="store_true", help="list every key with its meaning")
    c.add_argument("--from-kohya", metavar="TOML", default=None,
                   help="convert a kohya sd-scripts / lora-scripts training TOML (and its "
                        "dataset_config) into this platform's YAML; validated before written")
    c.add_argument("-o", "--output", metavar="YAML", default=None,
                   help="with --from-kohya: write the YAML here (default: print it)")
    c.add_argument("--kohya-root", metavar="DIR", default=None,
                   help="with --from-kohya: the folder kohya ran in, which its relative paths "
                        "are relative to (default: the current folder)")
    add_override_args(c)
    c.set_defaults(func=cmd_config)


