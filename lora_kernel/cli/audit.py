"""``lora audit``, ``lora review`` and ``lora publish``: thin parsers over
:mod:`lora_kernel.provenance.audit` (read-only), :mod:`lora_kernel.trusted.recovery`,
:mod:`lora_kernel.trusted.retention`, :mod:`lora_kernel.trusted.archive` and
:mod:`lora_kernel.trusted.review`. Who acts is the OS user (local mode) or, through the runner
service, the socket's peer (service mode) — never an environment variable.

Exit codes: 0 clean, 5 (VerificationError) when anything fails verification, 6 (PolicyRefusal)
when a policy forbids the action, 2 (ConfigError) for bad arguments, 3 (NoMatch) when
``audit lineage`` finds no run.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from lora_kernel.cli.options import add_home, add_runner, add_state
from lora_kernel.common.errors import ConfigError, LoraError, NoMatch, VerificationError
from lora_kernel.common.timeutil import parse_time


def _date(text: str):
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD or ISO time): {text!r}") \
            from None


def _secret(args) -> bytes:
    from lora_kernel.trusted.archive import key_material
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


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell; the last column is not padded."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        print(" ".join([*cells, row[-1]]).rstrip())


def _cell(value) -> str:
    """A value as a table or summary cell: None is "-", containers compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _short_time(text) -> str:
    """An ISO time to the second (``2025-01-31T12:00:00Z``); anything else as it is."""
    try:
        return parse_time(str(text)).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return _cell(text)


def _recover(state) -> None:
    """Seal stale runs first (local mode, where this user owns the state directory). A ledger
    without its signing key beside it is an auditor's copy, only read: sealing there would
    make a new key and sign with it."""
    from lora_kernel.common.paths import ledger_path, runs_dir
    from lora_kernel.provenance.ledger import KEY_NAME

    if not os.access(runs_dir(state), os.W_OK):
        return
    ledger = ledger_path(state)
    if ledger.exists() and not (ledger.parent / KEY_NAME).exists():
        return
    from lora_kernel.trusted.recovery import leftovers, recover

    try:
        recovered = recover(state=state)
    except (OSError, LoraError) as exc:  # a full state store: verify reports what is unsealed
        print(f"could not seal stale runs: {exc}")
        recovered = []
    for rec in recovered:
        print(f"recovered {rec.run_id}: sealed as failed ({rec.error})")
    for left in leftovers(state):
        print(f"leftover {left.path}: {left.what}")


def _unsealed(state) -> list:
    """Runs still announced in ``.active`` whose runner is gone: they ended without a record
    (e.g. the state store was full even for a minimal one); a problem until recovered."""
    from lora_kernel.common.paths import ledger_path, runs_dir
    from lora_kernel.provenance.ledger import KEY_NAME
    from lora_kernel.provenance.records import Problem
    from lora_kernel.trusted.runseal import stale_runs

    if not os.access(runs_dir(state) / ".active", os.W_OK):  # none, or an auditor's view
        return []
    ledger = ledger_path(state)
    if ledger.exists() and not (ledger.parent / KEY_NAME).exists():
        return []  # an auditor's copy (no signing key): only read, never locked or sealed
    try:
        stale = stale_runs(state)
    except (OSError, LoraError) as exc:
        return [Problem("unsealed", "runs/.active", f"cannot read the active runs: {exc}")]
    return [Problem("unsealed", run.run_id, "the run ended without a sealed record (its "
                    "runner is gone); fix: free space in the state store, then `lora audit "
                    "recover` seals it as failed") for run in stale]


def cmd_verify(args) -> int:
    """Verify one run or all; print each problem; VerificationError if any."""
    from lora_kernel.provenance.audit import list_runs, trust_statement, verify

    if not args.run and not args.all:
        raise ConfigError("give a RUN or --all")
    if args.all:
        _recover(args.state)
    problems = verify(None if args.all else args.run, state=args.state,
                      trusted_key=args.trusted_key, inputs=args.inputs)
    if args.all:
        problems += _unsealed(args.state)
    checked = len(list_runs(state=args.state, verify=False)) if args.all else 1
    for p in problems:
        print(p)
    print(trust_statement(args.state, args.trusted_key))
    if problems:
        raise VerificationError(f"{len(problems)} problem(s) found in {checked} run(s)")
    what = "inputs, " if args.inputs else ""
    print(f"OK: {checked} run(s) ({'all' if args.all else args.run}): records, {what}ledger "
          "chain, signatures and published copies verify")
    return 0


def cmd_recover(args) -> int:
    """Seal stale runs as failed; report leftover staging folders."""
    from lora_kernel.trusted.service import call, runner_socket

    sock = runner_socket(args.runner)
    if sock is not None:
        for rec in call(sock, {"op": "recover"}):
            print(f"recovered {rec['run_id']}: sealed as failed ({rec['error']})")
        return 0
    from lora_kernel.trusted.recovery import leftovers, recover

    recs = recover(state=args.state)
    for rec in recs:
        print(f"recovered {rec.run_id}: sealed as failed ({rec.error})")
    lefts = leftovers(args.state)
    for left in lefts:
        print(f"leftover {left.path}: {left.what}")
    if not recs and not lefts:
        print("nothing to recover")
    return 0


def cmd_key(args) -> int:
    """Print the ledger's public key fingerprint (to pin) or PEM."""
    from lora_kernel.provenance.ledger import LedgerReader, trust_root

    with LedgerReader(state=args.state) as led:
        root = trust_root(led.dir)
        pub = led.pub_path
    for p in root.problems:
        print(p)
    if args.pem:
        if root.problems:  # never hand out a key its pin disowns as "the" ledger key
            raise VerificationError("the public key beside the ledger does not match its pin; "
                                    "not printing it")
        if not pub.is_file():
            raise ConfigError(f"no public key at {pub} yet (made with the first record)")
        print(pub.read_text(encoding="utf-8"), end="")
        return 0
    print(f"key_fingerprint: {root.fingerprint}   # {root.source}; pin it in "
          "policies/ledger.yaml")
    if root.problems:
        raise VerificationError("the ledger key does not match its pin")
    return 0


def _through_service(args, request: dict) -> Any:
    """The runner service's answer to an audit ``request`` when this user cannot read the
    state directory and the service runs (a trainer on the hub); None: read it here."""
    from lora_kernel.common.paths import state_dir
    from lora_kernel.trusted.service import call, runner_socket

    if args.state is not None:
        return None
    root = state_dir(None)
    if os.access(root, os.R_OK | os.X_OK) and os.access(root / "runs", os.R_OK | os.X_OK):
        return None
    sock = runner_socket(getattr(args, "runner", None))
    if sock is None:
        return None
    return call(sock, request)


def _hub_runs() -> list | None:
    """In a hub user's server (``$LORA_RUNS_URL`` and the server's hub token set, no state
    directory of one's own): the caller's submissions from the runs service, else None."""
    from lora_kernel.common.paths import ledger_path

    url, token = os.environ.get("LORA_RUNS_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    if not url or not token:
        return None
    try:
        if ledger_path(None).exists():  # a state directory of one's own: local mode
            return None
    except OSError:  # the platform's state, not readable by users: the service answers
        pass
    from lora_kernel.user.runs_client import RunsClient

    return RunsClient(url, token).list()


def _print_hub_runs(subs: list) -> None:
    table = [[str(s.get("run_id") or "-"), _cell(s.get("user")), _cell(s.get("status")),
              _short_time(dt.datetime.fromtimestamp(s["submitted"], dt.UTC).isoformat())
              if s.get("submitted") else "-", Path(str(s.get("path") or "-")).name,
              str(s.get("id"))] for s in subs]
    _print_table(["RUN", "USER", "STATUS", "SUBMITTED", "NOTEBOOK/CONFIG", "SUBMISSION"], table)
    print("(your runs, from the hub's runs service; reviews and records: the audit service)")


def cmd_list(args) -> int:
    """List runs matching the filters; a run that does not verify is marked TAMPERED."""
    from lora_kernel.provenance.audit import list_runs
    columns = [c.strip() for c in (args.columns or "").split(",") if c.strip()]
    if args.state is None and not columns:
        subs = _hub_runs()
        if subs is not None:
            if args.json:
                _print_json(subs)
            else:
                _print_hub_runs(subs)
            return 0
    rows = _through_service(args, {
        "op": "audit_list", "user": args.user, "status": args.status, "review": args.review,
        "expired": args.expired, "columns": columns,
        "since": args.since.isoformat() if args.since else None,
        "until": args.until.isoformat() if args.until else None})
    if rows is None:
        rows = list_runs(state=args.state, user=args.user, since=args.since, until=args.until,
                         status=args.status, review=args.review, expired=args.expired,
                         columns=columns)
    if args.json:
        _print_json(rows)
        return 0
    table = []
    for r in rows:
        notes = [n for n, on in (("TAMPERED", not r["verified"]), ("pruned", r["pruned"]),
                                 ("published", r["published"]), ("EXPIRED", r["expired"])) if on]
        table.append([r["run_id"], _cell(r["user"]), _cell(r["kind"]), _cell(r["status"]),
                      _short_time(r["started"]) if r["started"] else "-", _cell(r["review"]),
                      *(_cell(r["columns"][c]) for c in columns), " ".join(notes)])
    _print_table(["RUN", "USER", "KIND", "STATUS", "STARTED", "REVIEW",
                  *(c.upper() for c in columns), "NOTES"], table)
    return 0


def _show_line(key: str, info: dict) -> str | None:
    """One ``lora audit show`` line for ``key`` (None: the run has no such field)."""
    if key not in info:
        return None
    value = info[key]
    if key == "config":
        essentials = info.get("config_essentials") or {}  # none once a record is pruned
        value = " ".join(f"{k}={_cell(v)}" for k, v in essentials.items()) or None
    elif key == "notebook":
        value = f"{value.get('name') or '-'} sha256 {value.get('sha256') or '-'}"
    elif key == "run_as" and isinstance(value, dict):
        value = f"{value.get('name')} (uid {value.get('uid')})"
    elif key == "dataset_version" and "dataset_files" in info:
        value = f"{_cell(value)} ({info['dataset_files']} files)"
    elif key == "published":
        value = ", ".join(value) or None
    elif key == "review_steps":  # approvals of adapters saved mid-run (review approve --step)
        if not value:
            return None
        value = "; ".join(f"step {step}: {what}" for step, what in value.items())
    return f"{key:18s} {_cell(value)}"


SHOW_FIELDS = ("run_id", "kind", "status", "error", "user", "uid", "identity", "run_as",
               "isolation", "inputs_read_from", "host",
               "started", "ended", "review", "reviewer", "review_steps", "notebook",
               "parameters", "config",
               "dataset_version", "base_model", "base_model_sha256", "adapter_digest", "seed",
               "egress_refusals", "published", "html")


def cmd_show(args) -> int:
    """Print a run's summary; write the executed notebook as sanitized HTML with --html."""
    from lora_kernel.provenance.audit import notebook_path, render_notebook_html, show
    info = _through_service(args, {"op": "audit_show", "run": args.run})
    if info is None:
        info = show(args.run, state=args.state)
    elif args.html:
        raise ConfigError("--html needs the record's notebook, which the runner service does "
                          "not send; fix: open the run in the audit service's pages")
    if args.html:
        Path(args.html).write_text(render_notebook_html(notebook_path(args.run, args.state)),
                                   encoding="utf-8")
        info["html"] = str(args.html)
    if args.json:
        _print_json(info)
    else:
        for key in SHOW_FIELDS:
            line = _show_line(key, info)
            if line is not None:
                print(line)
        for pub in info["publications"]:
            state = f"withdrawn (seq {pub['withdrawn']})" if pub["withdrawn"] else \
                f"expires {pub['expires']}"
            print(f"publication seq {pub['seq']:<6d} {pub['path']} by {pub['published_by']}, "
                  f"{state}")
        for r in info.get("replays", []):
            print(f"replay seq {r['seq']:<6d} {r['time']} {r['replay_run']}: {r['verdict']}")
        for e in info["ledger"]:
            print(f"ledger seq {e['seq']:<6d} {e['time']} {e['kind']}")
        for p in info["problems"]:
            print(f"PROBLEM {p}")
    if info["problems"]:
        raise VerificationError(f"run {args.run}: {len(info['problems'])} problem(s)")
    return 0


def cmd_lineage(args) -> int:
    """Print every run that used the path / digest / dataset version / base model; NoMatch
    (exit 3) when none did."""
    from lora_kernel.provenance.audit import lineage
    hits = lineage(args.query, state=args.state)
    if args.json:
        _print_json(hits)
    for h in [] if args.json else hits:
        print(f"{h['run_id']:24s} {str(h['user']):10s} {str(h['status']):10s} "
              f"{', '.join(h['matched'])}")
    if not hits:
        raise NoMatch(f"no run used {args.query} (compared with every run's input and output "
                      "digests, dataset version and base model; a path is matched by its "
                      "contents' sha256)")
    return 0


def cmd_replay(args) -> int:
    """Re-execute a run from its pinned inputs; print the verdict; exit 0 (identical / within
    tolerance), 5 (differs), 2 (inputs changed: nothing run)."""
    from lora_kernel.trusted.replay import replay_run

    out = replay_run(args.run, home=args.home, state=args.state, to=args.to,
                     timeout=args.timeout, log=print)
    v = out.verdict
    if args.json:
        _print_json({"run_id": out.run_id, "replay_run": out.record.run_id,
                     "record": str(out.record.path), "ledger_seq": out.ledger_seq,
                     "kept": str(out.kept) if out.kept else None, **v})
    else:
        print(f"replay run    {out.record.run_id} (record {out.record.path}, ledger seq "
              f"{out.ledger_seq})")
        print(f"verdict       {v.get('verdict')}: {v.get('reason')}")
        if v.get("max_abs_diff") is not None:
            print(f"adapter       max abs diff {v.get('max_abs_diff'):.3g}")
        if v.get("loss_max_abs_diff") is not None:
            print(f"losses        max abs diff {v.get('loss_max_abs_diff'):.3g}, correlation "
                  f"{v.get('loss_correlation')}")
        for line in out.package_differences:
            print(f"package       {line} (differs from the record)")
        if out.kept:
            print(f"adapter kept  {out.kept}")
    if not out.ok:
        raise VerificationError(f"replay of run {args.run} differs from its record: "
                                f"{v.get('reason')}")
    return 0


def cmd_export(args) -> int:
    """Write an encrypted archive."""
    from lora_kernel.trusted.archive import export_archive
    out = export_archive(args.to, since=args.since, secret=_secret(args), state=args.state)
    print(f"exported {len(out['runs'])} run(s), ledger seq {out['ledger_from_seq']}-"
          f"{out['ledger_to_seq']} to {out['to']} (key fingerprint {out['key_fingerprint']})")
    return 0


def cmd_import(args) -> int:
    """Restore and verify an encrypted archive."""
    from lora_kernel.trusted.archive import import_archive
    out = import_archive(args.archive, secret=_secret(args), state=args.state,
                         trusted_key=args.trusted_key)
    print(f"imported {args.archive}: restored {out['restored'] or 'none'}, already present "
          f"{out['skipped'] or 'none'} (key fingerprint {out['key_fingerprint']}; ledger "
          f"signed by {out['signer_key_fingerprint'][:16]}…, trusted by {out['trusted_by']})")
    if out["trusted_by"] == "unpinned":
        print("warning: no trusted key given and no pin in policies/ledger.yaml: the archive's "
              "own key was taken; give --trusted-key PROD.pem", file=sys.stderr)
    return 0


def cmd_prune(args) -> int:
    """Prune records past retention."""
    from lora_kernel.trusted.retention import prune
    done = prune(args.runs or None, state=args.state, dry_run=args.dry_run)
    for item in done:
        print(f"{'would prune' if args.dry_run else 'pruned'} {item['run_id']} "
              f"(ended {item['ended']})" + (f", ledger seq {item['seq']}" if "seq" in item else ""))
    if not done:
        print("nothing to prune")
    return 0


def cmd_review(args) -> int:
    """Approve or reject a run."""
    from lora_kernel.trusted.service import call, runner_socket

    sock = runner_socket(args.runner)
    if sock is not None:
        out = call(sock, {"op": "review", "decision": args.decision, "run": args.run,
                          "note": args.note, "step": args.step})
        seq, payload = out["seq"], out["payload"]
    else:
        from lora_kernel.trusted.review import approve, reject

        fn = approve if args.decision == "approve" else reject
        entry = fn(args.run, args.note, state=args.state, step=args.step)
        seq, payload = entry.seq, entry.payload
    which = f"step {args.step}'s adapter" if args.step is not None else "adapter"
    print(f"{payload['decision']} {args.run} by {payload['reviewer']} "
          f"({which} {payload['adapter_digest'][:16]}…, ledger seq {seq})")
    return 0


def cmd_publish(args) -> int:
    """Publish an approved adapter, or withdraw a run's publication (--withdraw RUN)."""
    from lora_kernel.trusted.service import call, runner_socket

    if args.withdraw:
        return _withdraw(args)
    if not args.run or not args.to:
        raise ConfigError("give RUN and --to DIR (or --withdraw RUN)")
    if args.note is not None:
        raise ConfigError("--note goes with --withdraw (a publication takes no note)")
    sock = runner_socket(args.runner)
    if sock is not None:
        dest = call(sock, {"op": "publish", "run": args.run, "to": str(Path(args.to).resolve()),
                           "name": args.name, "step": args.step})["path"]
    else:
        from lora_kernel.trusted.review import publish

        dest = publish(args.run, args.to, args.name, state=args.state, step=args.step)
    print(f"published {args.run} to {dest}")
    return 0


def _withdraw(args) -> int:
    """Withdraw a run's publications (or the one named --name): folder removed, ledger entry."""
    from lora_kernel.trusted.service import call, runner_socket

    if args.run or args.to:
        raise ConfigError("--withdraw RUN takes no other RUN and no --to (the ledger knows "
                          "where it was published)")
    note = args.note or ""
    sock = runner_socket(args.runner)
    if sock is not None:
        done = [(e["seq"], e["payload"]) for e in call(sock, {
            "op": "withdraw", "run": args.withdraw, "note": note, "name": args.name})]
    else:
        from lora_kernel.trusted.review import withdraw

        done = [(e.seq, e.payload) for e in withdraw(args.withdraw, note, name=args.name,
                                                     state=args.state)]
    for seq, p in done:
        gone = "folder removed" if p["removed"] else "folder was already gone"
        print(f"withdrew {args.withdraw} from {p['path']} by {p['by']} ({gone}; publication "
              f"seq {p['publication_seq']}, ledger seq {seq})")
    return 0


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
                   help="the ledger's public key, obtained out of band (default: the key beside "
                        "the ledger, only as far as policies/ledger.yaml or pin.json pins it)")
    p.add_argument("--inputs", action="store_true",
                   help="also re-hash each run's dataset files and base model against its "
                        "manifest and name what drifted")
    add_state(p)
    p.set_defaults(func=cmd_verify)

    p = asub.add_parser("recover", help="seal runs whose runner died as failed; report "
                                        "leftover staging folders")
    add_state(p)
    add_runner(p)
    p.set_defaults(func=cmd_recover)

    p = asub.add_parser("key", help="the ledger key's fingerprint (to pin) or --pem")
    p.add_argument("--pem", action="store_true", help="print the public key PEM")
    add_state(p)
    p.set_defaults(func=cmd_key)

    p = asub.add_parser("list", help="list runs")
    p.add_argument("--user", help="trainer")
    p.add_argument("--since", type=_date, help="started at or after (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="started before (YYYY-MM-DD)")
    p.add_argument("--status", choices=["succeeded", "failed"], help="run status")
    p.add_argument("--review", choices=["pending", "approved", "rejected", "void"])
    p.add_argument("--expired", action="store_true", help="only runs with expired publications")
    p.add_argument("--columns", metavar="KEY,KEY",
                   help="also show these config keys, e.g. learning_rate,lora_rank")
    p.add_argument("--json", action="store_true")
    add_state(p)
    add_runner(p)
    p.set_defaults(func=cmd_list)

    p = asub.add_parser("show", help="a run's summary and its notebook as standalone HTML")
    p.add_argument("run")
    p.add_argument("--html", metavar="FILE", help="write the executed notebook as sanitized HTML")
    p.add_argument("--json", action="store_true")
    add_state(p)
    add_runner(p)
    p.set_defaults(func=cmd_show)

    p = asub.add_parser("lineage", help="every run that used a file, digest, dataset or model")
    p.add_argument("query", metavar="PATH|SHA256|DATASET_VERSION|BASE_MODEL")
    p.add_argument("--json", action="store_true")
    add_state(p)
    p.set_defaults(func=cmd_lineage)

    p = asub.add_parser("replay", help="re-execute a run from its pinned inputs and compare "
                                       "the adapter (identical / within tolerance / differs)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--to", metavar="DIR", help="keep the replayed adapter files in DIR")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="fail the replay run after this long")
    p.add_argument("--json", action="store_true")
    add_home(p)
    add_state(p)
    p.set_defaults(func=cmd_replay)

    p = asub.add_parser("export", help="encrypted archive of records and the ledger slice")
    p.add_argument("--since", type=_date, required=True, help="runs sealed at or after DATE")
    p.add_argument("--to", required=True, metavar="FILE")
    _secret_args(p)
    add_state(p)
    p.set_defaults(func=cmd_export)

    p = asub.add_parser("import", help="restore and verify an encrypted archive")
    p.add_argument("archive", metavar="FILE")
    p.add_argument("--trusted-key", metavar="PEM",
                   help="the exporting (production) ledger's public key; default: the "
                        "policies/ledger.yaml pin")
    _secret_args(p)
    add_state(p)
    p.set_defaults(func=cmd_import)

    p = asub.add_parser("prune", help="remove records past retention (policies/retention.yaml)")
    p.add_argument("runs", nargs="*", metavar="RUN", help="only these (refused if too young)")
    p.add_argument("--dry-run", action="store_true")
    add_state(p)
    p.set_defaults(func=cmd_prune)

    review = sub.add_parser("review", help="approve or reject a run's adapter")
    review.add_argument("decision", choices=["approve", "reject"])
    review.add_argument("run")
    review.add_argument("--note", required=True, help="the reviewer's reason")
    review.add_argument("--step", type=int, default=None, metavar="N",
                        help="the adapter the run saved at step N (save_every_n_epochs / "
                             "save_steps) instead of its final one")
    add_state(review)
    add_runner(review)
    review.set_defaults(func=cmd_review)

    pub = sub.add_parser("publish", help="publish an approved adapter, or withdraw one")
    pub.add_argument("run", nargs="?")
    pub.add_argument("--to", metavar="DIR", help="folder to publish into (required to publish)")
    pub.add_argument("--name", help="published name (default: the run id); with --withdraw, "
                                    "only the publication of that name")
    pub.add_argument("--withdraw", metavar="RUN",
                     help="withdraw RUN's publication: remove the published folder and record "
                          "it in the ledger (a reviewer or the publisher)")
    pub.add_argument("--note", help="why it is withdrawn (with --withdraw)")
    pub.add_argument("--step", type=int, default=None, metavar="N",
                     help="publish the adapter the run saved at step N (the one approved "
                          "with --step N)")
    add_state(pub)
    add_runner(pub)
    pub.set_defaults(func=cmd_publish)
