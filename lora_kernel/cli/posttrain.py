"""``lora resize``: post-training tools whose outputs are sealed records of kind ``derived``
(:mod:`lora_kernel.trusted.derive`), pinning their source run (its manifest and adapter
digests) or source file (its sha256), so ``lora audit verify``, lineage, review and publish
cover them.

Runs as: whoever runs ``lora``: the user (the record is sealed as in a local run).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lora_kernel.cli.options import add_state
from lora_kernel.common.errors import ConfigError


def _source(spec: str, state):
    """``(DerivedSource, the kohya-format file to read)`` of a run id or a file path."""
    from lora_kernel.trusted.derive import source_from_file, source_from_run

    path = Path(spec)
    if path.exists():
        source = source_from_file(path)
        return source, path
    source = source_from_run(spec, state=state)
    kohya = [rel for rel in source.adapter_files if rel.endswith("_kohya.safetensors")]
    if not kohya or source.record is None:
        raise ConfigError(f"run {spec} has no kohya-format adapter (*_kohya.safetensors) to "
                          f"resize; fix: resize an image run's adapter", key="SOURCE")
    return source, source.record / kohya[0]


def cmd_resize(args) -> int:
    """Resize by SVD, seal the output as a derived record, report the energy kept."""
    from lora_kernel.training.resize import resize_lora
    from lora_kernel.trusted.derive import seal_derived

    source, src = _source(args.source, args.state)
    name = src.name.replace("_kohya.safetensors", "").replace(".safetensors", "")
    out_name = f"{name}-r{args.rank}_kohya.safetensors"
    with tempfile.TemporaryDirectory(prefix="lora-resize-") as tmp:
        out = Path(tmp) / out_name
        report = resize_lora(src, out, args.rank)
        measured = {"energy_kept": report.energy_kept,
                    "min_module_energy_kept": report.min_module_energy,
                    "modules": len(report.modules)}
        rec = seal_derived(tool="resize", params={"rank": args.rank,
                                                  "method": "svd (kohya resize_lora)",
                                                  "source_file": src.name},
                           source=source, outputs={out_name: out}, state=args.state,
                           measured=measured)
        if args.output:
            shutil.copyfile(out, args.output)
    print(f"resized {src.name} to rank {args.rank}: energy kept {report.energy_kept:.4f} "
          f"(Frobenius, whole adapter; lowest module {report.min_module_energy:.4f}, "
          f"{len(report.modules)} modules)")
    print(f"record: {rec.path} (kind derived, from "
          f"{source.run_id or source.sha256})")
    if args.output:
        print(f"copy: {args.output}")
    if args.json:
        print(json.dumps({"record": rec.run_id, **report.to_dict()}, indent=1))
    return 0


def register(sub) -> None:
    """Add ``resize`` to the ``lora`` CLI."""
    p = sub.add_parser("resize", help="resize a LoRA to a lower rank (SVD, kohya's method) "
                                      "as a sealed derived record",
                       description="Resize a kohya-format LoRA (a run's adapter or a file) "
                                   "to --rank by SVD and seal the result as a record of "
                                   "kind derived that pins its source.")
    p.add_argument("source", metavar="RUN|FILE", help="a run id or a kohya-format .safetensors")
    p.add_argument("--rank", type=int, required=True, help="the new rank")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="also write the resized file here")
    p.add_argument("--json", action="store_true", help="print the per-module report as JSON")
    add_state(p)
    p.set_defaults(func=cmd_resize)
