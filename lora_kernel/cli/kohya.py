"""``lora config --from-kohya FILE.toml [-o out.yaml]``: convert a kohya / lora-scripts
training TOML into our YAML config, report what became of each key, and validate the result
(with the same loader as ``lora config``) before anything is written.

Runs as: whoever runs ``lora``: the user.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lora_kernel.common.atomic import atomic_write
from lora_kernel.training.checks import validate_config
from lora_kernel.training.kohya_config import convert_kohya


def cmd_from_kohya(args) -> int:
    """Convert, print the key report on stderr, validate, then write (``-o``) or print."""
    conv = convert_kohya(args.from_kohya, root=args.kohya_root)
    for line in conv.report():
        print(line, file=sys.stderr)
    out = Path(args.output) if args.output else None
    where = out.resolve() if out is not None else Path(args.from_kohya).with_suffix(".yaml")
    cfg = validate_config(dict(conv.config), source=where, base_dir=where.parent)
    for note in [*cfg.key_notes, *cfg.dataset_warnings, *cfg.model_warnings]:
        print(f"warning: {note}", file=sys.stderr)
    text = conv.to_yaml()
    if out is None:
        sys.stdout.write(text)
        return 0
    atomic_write(out, text)
    print(f"{out}: written; it validates (lora config {out}); "
          f"{len(conv.unmapped)} key(s) not mapped", flush=True)
    return 0
