"""``lora data``: dataset tools (lint, version, versions, show, diff, contact sheet). Thin:
every command calls one function of :mod:`lora_kernel.training.datatools` or
:mod:`lora_kernel.provenance.datasets` (the snapshot store's dataset versions).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import json

from lora_kernel.cli.options import add_runner, add_state


def cmd_lint(args) -> int:
    from lora_kernel.training.datatools import lint
    report = lint(args.dir, min_size=args.min_size, near_bits=args.near_bits)
    if args.json:
        print(json.dumps({"folder": str(report.folder), "layout": report.layout,
                          "images": report.images,
                          "findings": [vars(f) for f in report.findings]}, indent=2))
    else:
        print(report.table())
    return 0 if report.ok else 2


def cmd_version(args) -> int:
    from lora_kernel.training.datatools import folder_version
    print(folder_version(args.dir))
    return 0


def cmd_diff(args) -> int:
    from lora_kernel.training.datatools import dataset_ref_digests, diff_digests
    a_label, a = dataset_ref_digests(args.a, state=args.state)
    b_label, b = dataset_ref_digests(args.b, state=args.state)
    diff = diff_digests(a, b)
    print(f"--- {a_label}\n+++ {b_label}")
    for line in diff.lines():
        print(line)
    print(f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed")
    return 0


def _through_service(args, request: dict):
    """The runner service's answer when this user cannot read the state directory (a trainer
    in service mode: their own runs' versions), else None."""
    from lora_kernel.cli.audit import _through_service as ask
    return ask(args, request)


def cmd_versions(args) -> int:
    from lora_kernel.provenance.datasets import dataset_versions
    versions = _through_service(args, {"op": "data_versions"})
    if versions is None:
        versions = dataset_versions(args.state)
    if args.json:
        print(json.dumps(versions, indent=1, sort_keys=True))
        return 0
    if not versions:
        print("the snapshot store holds no dataset yet (a recorded training run stores the "
              "dataset it pins)")
        return 0
    print(f"{'VERSION':<36} {'FILES':>5} {'BYTES':>10} {'RUNS':>4}  {'STORED':<20} FIRST RUN")
    for v in versions:
        print(f"{v.get('id', '?'):<36} {len(v.get('files') or {}):>5} "
              f"{int(v.get('bytes') or 0):>10} {len(v['runs']):>4}  "
              f"{str(v.get('stored', ''))[:19]:<20} {v.get('first_run', '')}")
    return 0


def cmd_show(args) -> int:
    from lora_kernel.provenance.datasets import dataset_version
    v = _through_service(args, {"op": "data_show", "version": args.version})
    if v is None:
        v = dataset_version(args.version, args.state)
    if args.json:
        print(json.dumps(v, indent=1, sort_keys=True))
        return 0
    files, sizes = v.get("files") or {}, v.get("sizes") or {}
    print(f"{v['id']}: {len(files)} files, {int(v.get('bytes') or 0)} bytes, stored "
          f"{v.get('stored')} by run {v.get('first_run')}")
    print("runs pinned on it: " + (", ".join(v["runs"]) or "none kept"))
    for key, sha in sorted(files.items()):
        print(f"  {sha[:16]}  {int(sizes.get(key) or 0):>10}  {key}")
    return 0


def cmd_sheet(args) -> int:
    from lora_kernel.training.datatools import contact_sheet
    out = contact_sheet(args.dir, args.output, columns=args.columns, thumb=args.thumb,
                        limit=args.limit)
    print(out)
    return 0


def register(sub) -> None:
    """Add ``data`` (lint, version, versions, show, diff, sheet) to the ``lora`` CLI."""
    from lora_kernel.training.datatools import DEFAULT_MIN_SIZE, NEAR_DUPLICATE_BITS

    p = sub.add_parser("data", help="dataset tools: lint, version, versions, show, diff, sheet",
                       description="Check, identify, compare and preview dataset folders "
                                   "(metadata.csv, metadata.jsonl or kohya layouts).")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    q = dsub.add_parser("lint", help="find problems in a dataset folder (exit 2 on errors)",
                        description="Unreadable/truncated images, missing or non-UTF-8 "
                                    "captions, duplicates and near-duplicates, small images, "
                                    "EXIF rotation, non-RGB modes, stray files. Errors exit "
                                    "2; warnings alone exit 0.")
    q.add_argument("dir")
    q.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                   help=f"warn about images whose short side is below this (default "
                        f"{DEFAULT_MIN_SIZE} px)")
    q.add_argument("--near-bits", type=int, default=NEAR_DUPLICATE_BITS,
                   help=f"dHash distance (of 64 bits) at or below which two images are near "
                        f"duplicates (default {NEAR_DUPLICATE_BITS}; 0: only identical hashes)")
    q.add_argument("--json", action="store_true", help="print the findings as JSON")
    q.set_defaults(func=cmd_lint)

    q = dsub.add_parser("version", help="print the dataset version id manifests record")
    q.add_argument("dir")
    q.set_defaults(func=cmd_version)

    q = dsub.add_parser("versions", help="the dataset versions the snapshot store holds",
                        description="Every dataset version recorded runs were pinned on and "
                                    "the store keeps (content-addressed, stored once), with "
                                    "the kept runs pinned on each.")
    add_state(q)
    add_runner(q)
    q.add_argument("--json", action="store_true", help="print them as JSON")
    q.set_defaults(func=cmd_versions)

    q = dsub.add_parser("show", help="one dataset version of the store: its files and runs")
    q.add_argument("version", metavar="VERSION", help="a ds-… id from `lora data versions`")
    add_state(q)
    add_runner(q)
    q.add_argument("--json", action="store_true", help="print it as JSON")
    q.set_defaults(func=cmd_show)

    q = dsub.add_parser("diff", help="files added, removed, changed between two datasets",
                        description="A and B: dataset folders, run ids whose records pin "
                                    "a dataset, or dataset versions (ds-…) of the store.")
    q.add_argument("a")
    q.add_argument("b")
    add_state(q)
    q.set_defaults(func=cmd_diff)

    q = dsub.add_parser("sheet", help="contact-sheet PNG: thumbnails with captions")
    q.add_argument("dir")
    q.add_argument("-o", "--output", required=True, help="PNG file to write")
    q.add_argument("--columns", type=int, default=6)
    q.add_argument("--thumb", type=int, default=128, help="thumbnail size in pixels")
    q.add_argument("--limit", type=int, default=200, help="at most this many images")
    q.set_defaults(func=cmd_sheet)
