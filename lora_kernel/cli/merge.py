"""``lora merge RUN --to DIR [--dtype bf16]``: a text run's adapter merged into its base model,
written as a transformers folder of safetensors shards, and sealed as a record of kind
``derived`` that pins the source run (its manifest and adapter digests) and the base model, so
``verify``, lineage and review cover the merged model.

The source must verify (exit 5 when tampered) and be approved (exit 6); DIR must not exist
or be empty (exit 2). The merge is written beside DIR and renamed into place once the record
is sealed: a failure leaves neither DIR nor a record.

Runs as: the user who merges (local mode, like a local run's sealing).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from lora_kernel.cli.options import add_state
from lora_kernel.common.errors import ConfigError


def cmd_merge(args) -> int:
    """Merge, seal, move into place; print the derived record and the folder."""
    from lora_kernel.training.merge import adapter_folder, merge_text_adapter
    from lora_kernel.trusted.derive import seal_derived, source_from_run

    dest = Path(args.to).resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} already exists and is not an empty folder; fix: --to a new "
                          f"folder (lora merge never overwrites)", key="--to")
    source = source_from_run(args.run, state=args.state, require_approved=True)
    if (source.config or {}).get("task") != "text" or source.record is None:
        raise ConfigError(f"run {args.run} is not a text run (task: "
                          f"{(source.config or {}).get('task')}); fix: lora merge merges a "
                          f"causal-LM adapter into its base model", key="RUN")
    adapter = adapter_folder(source.record, source.adapter_files)
    work = dest.parent / f".{dest.name}.merging"
    if work.exists():
        shutil.rmtree(work)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        measured = merge_text_adapter(source.base_model, adapter, work, dtype=args.dtype,
                                      base_sha256=source.base_model_sha256 or None)
        rec = seal_derived(tool="merge", params={"dtype": args.dtype}, source=source,
                           outputs={f"merged/{p.name}": p for p in sorted(work.iterdir())},
                           state=args.state, task="text",
                           measured={"max_abs_logit_diff": measured["max_abs_logit_diff"]})
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"merged {args.run} into its base model ({args.dtype}): {dest}")
    print(f"record: {rec.path} (kind derived, ledger seq {rec.ledger_seq}); adapter-on-base "
          f"vs merged logits differ by at most {measured['max_abs_logit_diff']:.2e}")
    return 0


def register(sub) -> None:
    """Add ``merge`` to the ``lora`` CLI."""
    p = sub.add_parser("merge", help="merge an approved text run's adapter into its base model",
                       description="Write the run's base model with its LoRA merged as a "
                                   "transformers folder (safetensors shards), sealed as a "
                                   "derived record pinning the run.")
    p.add_argument("run", metavar="RUN", help="the run id (lora audit list)")
    p.add_argument("--to", required=True, metavar="DIR", help="new folder for the merged model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the merged weights (default fp32)")
    add_state(p)
    p.set_defaults(func=cmd_merge)
