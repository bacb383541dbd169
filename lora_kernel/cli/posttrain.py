"""``lora resize`` and ``lora convert``: post-training tools whose outputs are sealed records
of kind ``derived`` (:mod:`lora_kernel.trusted.derive`), pinning their source run (its
manifest and adapter digests) or source file (its sha256), so ``lora audit verify``, lineage,
review and publish cover them.

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


def cmd_convert(args) -> int:
    """Convert between kohya, diffusers and PEFT formats; seal the output as derived."""
    from lora_kernel.training.convert import convert_lora
    from lora_kernel.trusted.derive import seal_derived

    source, src = _source_any(args.source, args.state, args.to)
    stem = src.name.removesuffix(".safetensors").removesuffix("_kohya")
    with tempfile.TemporaryDirectory(prefix="lora-convert-") as tmp:
        name = {"kohya": f"{stem}_kohya.safetensors", "diffusers": f"{stem}.safetensors",
                "peft": f"{stem}_peft"}[args.to]
        out = Path(tmp) / name
        info = convert_lora(src, out, args.to)
        outputs = ({f"{name}/{p.name}": p for p in sorted(out.iterdir())} if out.is_dir()
                   else {name: out})
        rec = seal_derived(tool="convert", params={"to": args.to, "from": info["from"],
                                                   "source_file": src.name},
                           source=source, outputs=outputs, state=args.state,
                           measured={"modules": info["modules"]})
        if args.output:
            if out.is_dir():
                shutil.copytree(out, args.output, dirs_exist_ok=True)
            else:
                shutil.copyfile(out, args.output)
    print(f"converted {src.name} ({info['from']}) to {args.to}: {info['modules']} UNet modules")
    print(f"record: {rec.path} (kind derived, from {source.run_id or source.sha256})")
    if args.output:
        print(f"copy: {args.output}")
    return 0


def _source_any(spec: str, state, to: str):
    """Like :func:`_source`, for convert: a run's adapter in another format than ``to``."""
    from lora_kernel.trusted.derive import source_from_file, source_from_run

    path = Path(spec)
    if path.exists():
        return source_from_file(path), path
    source = source_from_run(spec, state=state)
    want = "_kohya.safetensors" if to != "kohya" else ".safetensors"
    files = [rel for rel in source.adapter_files if rel.endswith(want)
             and (to == "kohya") != rel.endswith("_kohya.safetensors")]
    if not files or source.record is None:
        raise ConfigError(f"run {spec} has no image LoRA file to convert to {to}",
                          key="SOURCE")
    return source, source.record / files[0]


def register(sub) -> None:
    """Add ``resize`` and ``convert`` to the ``lora`` CLI."""
    c = sub.add_parser("convert", help="convert a LoRA between kohya, diffusers and PEFT "
                                       "formats as a sealed derived record",
                       description="Convert an SD 1.x/2.x LoRA (a run's adapter or a file) to "
                                   "kohya, diffusers or PEFT format; the output is sealed as a "
                                   "record of kind derived that pins its source.")
    c.add_argument("source", metavar="RUN|FILE", help="a run id, a .safetensors LoRA or a "
                                                      "PEFT folder")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"])
    c.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="also write the converted file (or PEFT folder) here")
    add_state(c)
    c.set_defaults(func=cmd_convert)

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
