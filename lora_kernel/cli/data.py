"""``lora data``: dataset tools (lint, version, diff, contact sheet). Thin: every command calls
one function of :mod:`lora_kernel.training.datatools`.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import json

from lora_kernel.cli.options import add_state


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


def cmd_sheet(args) -> int:
    from lora_kernel.training.datatools import contact_sheet
    out = contact_sheet(args.dir, args.output, columns=args.columns, thumb=args.thumb,
                        limit=args.limit)
    print(out)
    return 0


def register(sub) -> None:
    """Add ``data`` (lint, version, diff, sheet) to the ``lora`` CLI."""
    from lora_kernel.training.datatools import DEFAULT_MIN_SIZE, NEAR_DUPLICATE_BITS

    p = sub.add_parser("data", help="dataset tools: lint, version, diff, sheet",
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

    q = dsub.add_parser("diff", help="files added, removed, changed between two datasets",
                        description="A and B: dataset folders, or run ids whose records pin "
                                    "a dataset.")
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
