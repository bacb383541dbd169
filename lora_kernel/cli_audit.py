"""``lora audit``, ``lora review`` and ``lora publish``: thin parsers over
:mod:`lora_kernel.audit`, :mod:`lora_kernel.archive` and :mod:`lora_kernel.review`.

Exit codes: 0 clean, 5 (VerificationError) when anything fails verification, 6 (PolicyRefusal)
when a policy forbids the action, 2 (ConfigError) for bad arguments.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from lora_kernel.errors import ConfigError, VerificationError
from lora_kernel.records import parse_time


def _date(text: str):
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD or ISO time): {text!r}") \
            from None


def _secret(args) -> bytes:
    from lora_kernel.archive import key_material
    if args.key_file:
        return key_material(key_file=args.key_file)
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set")
        return key_material(passphrase=value)
    if sys.stdin.isatty():
        return key_material(passphrase=getpass.getpass("archive passphrase: "))
    raise ConfigError("give --key-file or --passphrase-env (no terminal to ask on)")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def cmd_verify(args) -> int:
    """Verify one run or all; print each problem; VerificationError if any."""
    from lora_kernel.audit import verify
    if not args.run and not args.all:
        raise ConfigError("give a RUN or --all")
    from lora_kernel.ledger import Ledger
    with Ledger(home=args.home, trusted_public_key=args.trusted_key) as led:
        problems = verify(None if args.all else args.run, home=args.home, ledger=led)
    for p in problems:
        print(p)
    if problems:
        raise VerificationError(f"{len(problems)} problem(s) found")
    print(f"OK: {'all runs' if args.all else args.run}, ledger chain, signatures and "
          "published copies verify")
    return 0


def cmd_list(args) -> int:
    """List runs matching the filters."""
    from lora_kernel.audit import list_runs
    rows = list_runs(home=args.home, user=args.user, since=args.since, until=args.until,
                     status=args.status, review=args.review, expired=args.expired)
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'RUN':24s} {'USER':10s} {'STATUS':10s} {'STARTED':22s} {'REVIEW':9s} NOTES")
    for r in rows:
        notes = [n for n, on in (("pruned", r["pruned"]), ("published", r["published"]),
                                 ("EXPIRED", r["expired"])) if on]
        print(f"{r['run_id']:24s} {str(r['user']):10s} {str(r['status']):10s} "
              f"{str(r['started']):22s} {r['review']:9s} {' '.join(notes)}")
    return 0


def cmd_show(args) -> int:
    """Print a run's summary; write the executed notebook as sanitized HTML with --html."""
    from lora_kernel.audit import notebook_path, render_notebook_html, show
    info = show(args.run, home=args.home)
    if args.html:
        Path(args.html).write_text(render_notebook_html(notebook_path(args.run, args.home)),
                                   encoding="utf-8")
        info["html"] = str(args.html)
    if args.json:
        _print_json(info)
    else:
        for key in ("run_id", "user", "host", "status", "started", "ended", "review",
                    "reviewer", "adapter_digest", "dataset_version", "base_model",
                    "base_model_sha256", "seed", "egress_refusals", "published", "html"):
            if key in info:
                print(f"{key:18s} {info[key]}")
        for e in info["ledger"]:
            print(f"ledger seq {e['seq']:<6d} {e['time']} {e['kind']}")
        for p in info["problems"]:
            print(f"PROBLEM {p}")
    if info["problems"]:
        raise VerificationError(f"run {args.run}: {len(info['problems'])} problem(s)")
    return 0


def cmd_lineage(args) -> int:
    """Print every run that used the path / digest / dataset version / base model."""
    from lora_kernel.audit import lineage
    hits = lineage(args.query, home=args.home)
    if args.json:
        _print_json(hits)
    for h in [] if args.json else hits:
        print(f"{h['run_id']:24s} {str(h['user']):10s} {str(h['status']):10s} "
              f"{', '.join(h['matched'])}")
    return 0


def cmd_export(args) -> int:
    """Write an encrypted archive."""
    from lora_kernel.archive import export_archive
    out = export_archive(args.to, since=args.since, secret=_secret(args), home=args.home)
    print(f"exported {len(out['runs'])} run(s), ledger seq {out['ledger_from_seq']}-"
          f"{out['ledger_to_seq']} to {out['to']} (key fingerprint {out['key_fingerprint']})")
    return 0


def cmd_import(args) -> int:
    """Restore and verify an encrypted archive."""
    from lora_kernel.archive import import_archive
    out = import_archive(args.archive, secret=_secret(args), home=args.home)
    print(f"imported {args.archive}: restored {out['restored'] or 'none'}, already present "
          f"{out['skipped'] or 'none'} (key fingerprint {out['key_fingerprint']})")
    return 0


def cmd_prune(args) -> int:
    """Prune records past retention."""
    from lora_kernel.audit import prune
    done = prune(args.runs or None, home=args.home, dry_run=args.dry_run)
    for item in done:
        print(f"{'would prune' if args.dry_run else 'pruned'} {item['run_id']} "
              f"(ended {item['ended']})" + (f", ledger seq {item['seq']}" if "seq" in item else ""))
    if not done:
        print("nothing to prune")
    return 0


def cmd_review(args) -> int:
    """Approve or reject a run."""
    from lora_kernel.review import approve, reject
    fn = approve if args.decision == "approve" else reject
    entry = fn(args.run, args.note, home=args.home)
    print(f"{entry.payload['decision']} {args.run} by {entry.payload['reviewer']} "
          f"(adapter {entry.payload['adapter_digest'][:16]}…, ledger seq {entry.seq})")
    return 0


def cmd_publish(args) -> int:
    """Publish an approved adapter."""
    from lora_kernel.review import publish
    dest = publish(args.run, args.to, args.name, home=args.home)
    print(f"published {args.run} to {dest}")
    return 0


def _home(p) -> None:
    p.add_argument("--home", default=None, help="working home (default $LORA_HOME or ./lora_home)")


def _secret_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key-file", help="file whose bytes the archive key is derived from")
    g.add_argument("--passphrase-env", metavar="VAR",
                   help="environment variable holding the passphrase (asked for if neither)")


def register(sub) -> None:
    """Add ``audit``, ``review`` and ``publish`` to the ``lora`` CLI."""
    audit = sub.add_parser("audit", help="verify, list, show, trace, export, import, prune")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    asub.required = True

    p = asub.add_parser("verify", help="re-hash records, check ledger and published copies")
    p.add_argument("run", nargs="?", help="run id")
    p.add_argument("--all", action="store_true", help="every run")
    p.add_argument("--trusted-key", metavar="PEM",
                   help="ledger public key pinned elsewhere (default: the one beside the ledger)")
    _home(p)
    p.set_defaults(func=cmd_verify)

    p = asub.add_parser("list", help="list runs")
    p.add_argument("--user", help="trainer")
    p.add_argument("--since", type=_date, help="started at or after (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="started before (YYYY-MM-DD)")
    p.add_argument("--status", help="run status, e.g. succeeded, failed")
    p.add_argument("--review", choices=["pending", "approved", "rejected", "void"])
    p.add_argument("--expired", action="store_true", help="only runs with expired publications")
    p.add_argument("--json", action="store_true")
    _home(p)
    p.set_defaults(func=cmd_list)

    p = asub.add_parser("show", help="a run's summary and its notebook as standalone HTML")
    p.add_argument("run")
    p.add_argument("--html", metavar="FILE", help="write the executed notebook as sanitized HTML")
    p.add_argument("--json", action="store_true")
    _home(p)
    p.set_defaults(func=cmd_show)

    p = asub.add_parser("lineage", help="every run that used a file, digest, dataset or model")
    p.add_argument("query", metavar="PATH|SHA256|DATASET_VERSION|BASE_MODEL")
    p.add_argument("--json", action="store_true")
    _home(p)
    p.set_defaults(func=cmd_lineage)

    p = asub.add_parser("export", help="encrypted archive of records and the ledger slice")
    p.add_argument("--since", type=_date, required=True, help="runs sealed at or after DATE")
    p.add_argument("--to", required=True, metavar="FILE")
    _secret_args(p)
    _home(p)
    p.set_defaults(func=cmd_export)

    p = asub.add_parser("import", help="restore and verify an encrypted archive")
    p.add_argument("archive", metavar="FILE")
    _secret_args(p)
    _home(p)
    p.set_defaults(func=cmd_import)

    p = asub.add_parser("prune", help="remove records past retention (policies/retention.yaml)")
    p.add_argument("runs", nargs="*", metavar="RUN", help="only these (refused if too young)")
    p.add_argument("--dry-run", action="store_true")
    _home(p)
    p.set_defaults(func=cmd_prune)

    review = sub.add_parser("review", help="approve or reject a run's adapter")
    review.add_argument("decision", choices=["approve", "reject"])
    review.add_argument("run")
    review.add_argument("--note", required=True, help="the reviewer's reason")
    _home(review)
    review.set_defaults(func=cmd_review)

    pub = sub.add_parser("publish", help="publish an approved adapter")
    pub.add_argument("run")
    pub.add_argument("--to", required=True, metavar="DIR")
    pub.add_argument("--name", help="published name (default: the run id)")
    _home(pub)
    pub.set_defaults(func=cmd_publish)
