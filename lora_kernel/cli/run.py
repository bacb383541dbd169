"""``lora run`` and ``lora demo``: recorded notebook runs (papermill, kernel ``lora``).

    lora run --config my.yaml [-p key value ...]     the training notebook of the config's task
    lora run NOTEBOOK [-f params.yaml] [-p k v ...]  any parameterized notebook
    lora demo [-p key value ...]                     demo assets + the image notebook + verify

Local mode runs in this process (as this user, state under this account); service mode
(``--runner SOCKET``, ``$LORA_RUNNER`` or the platform's socket) asks the runner service, which
runs the kernel as you and writes the record as the service account.

Exit codes: 0 success, 2 invalid config/parameters, 5 the new record does not verify,
7 the run failed (its record, marked failed, was written first).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from lora_kernel.cli.options import (
    add_home,
    add_override_args,
    add_runner,
    add_state,
    parse_overrides,
)
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.yamlio import load_yaml


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sigterm_as_interrupt() -> None:
    """Let SIGTERM and SIGHUP (the terminal or SSH session closed) end a run like Ctrl-C does:
    the runner then records it as interrupted."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def load_params_file(path: str | None) -> dict:
    """papermill parameters from a YAML file; a relative ``config_path`` in it resolves
    against the file's folder (like paths inside a config)."""
    if not path:
        return {}
    p = Path(path)
    data = load_yaml(p, what="parameters file")
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError("must be a YAML mapping of parameter: value", file=p)
    if data.get("config_path") and not Path(data["config_path"]).is_absolute():
        data["config_path"] = str((p.resolve().parent / data["config_path"]).resolve())
    return data


def _print_record(rec) -> None:
    res = rec.result or {}
    loss = ""
    if res.get("steps"):
        loss = f": {res['steps']} steps, loss {res['first_loss']:.4f} -> {res['final_loss']:.4f}"
        if res.get("eval_loss_before") is not None and res.get("eval_loss_after") is not None:
            loss += f" (eval {res['eval_loss_before']:.4f} -> {res['eval_loss_after']:.4f})"
    print(f"run {rec.run_id} {rec.status} in {rec.seconds:.1f}s{loss}")
    print(f"record: {rec.path}")
    for rel in rec.files:
        if rel.startswith("adapter/") or rel in ("executed.ipynb", "samples/grid.png",
                                                  "samples/completions.md"):
            print(f"  {rel}")
    print(f"  manifest.json  sha256 {rec.manifest_sha256}  (ledger seq {rec.ledger_seq})")


def _progress(args):
    """Where the executor's progress bar goes: this terminal, unless --quiet or not a tty."""
    if args.quiet or not sys.stdout.isatty():
        return None
    return lambda chunk: (sys.stdout.buffer.write(chunk), sys.stdout.flush())


def _run(notebook: Path, params: dict, args):
    """Run locally, or ask the runner service (service mode); return the RunRecord."""
    from lora_kernel.common.paths import lora_home
    from lora_kernel.trusted.runner import RunContext, run_notebook
    from lora_kernel.trusted.service import call, runner_socket

    sock = runner_socket(args.runner)
    if sock is None:
        return run_notebook(notebook, params, home=args.home, state=args.state,
                            timeout=args.timeout, ctx=RunContext.local(_progress(args)),
                            log=_log)
    from lora_kernel.trusted.runner import RunRecord

    progress = _progress(args)
    result = call(sock, {"op": "run", "notebook": str(notebook.resolve()),
                         "parameters": params, "home": str(lora_home(args.home)),
                         "timeout": args.timeout, "progress": progress is not None},
                  on_log=_log,
                  on_progress=lambda text: progress(text.encode()) if progress else None)
    return RunRecord.from_dict(result)


def cmd_run(args) -> int:
    """Run a notebook (or a config's training notebook) and print where its record is."""
    from lora_kernel.trusted.runner import config_task, notebook_for_task

    _sigterm_as_interrupt()
    overrides = parse_overrides(args.param)
    if args.config:
        if args.params_file:
            raise ConfigError("give either --config or -f params.yaml, not both")
        config = Path(args.config).resolve()
        notebook = Path(args.notebook) if args.notebook else notebook_for_task(
            config_task(config))
        params = {"config_path": str(config), "overrides": overrides}
    elif args.notebook:
        notebook = Path(args.notebook)
        params = load_params_file(args.params_file)
        if overrides:
            params["overrides"] = {**(params.get("overrides") or {}), **overrides}
    else:
        raise ConfigError("nothing to run; fix: lora run --config my.yaml, or "
                          "lora run NOTEBOOK -f params.yaml")
    _print_record(_run(notebook, params, args))
    return 0


def cmd_demo(args) -> int:
    """Build the demo assets, train the demo image LoRA as a recorded run, verify the record."""
    from lora_kernel.common.paths import lora_home
    from lora_kernel.provenance.ledger import LedgerReader
    from lora_kernel.provenance.records import verify_record
    from lora_kernel.training.demo_assets import build_demo_assets, demo_dir
    from lora_kernel.trusted.runner import notebook_for_task

    _sigterm_as_interrupt()
    home = lora_home(args.home)
    print(f"LoRA Enclave demo (home: {home})")
    config = demo_dir(home) / "image_lora.yaml"
    if config.is_file() and not args.rebuild:
        print(f"1/3 demo assets: {demo_dir(home)} (already built; --rebuild to rebuild)")
    else:
        t0 = time.monotonic()
        build_demo_assets(home)
        print(f"1/3 demo assets: built {demo_dir(home)} in {time.monotonic() - t0:.1f}s "
              f"(tiny SD model, 24 captioned images; generated locally, nothing downloaded)")
    print("2/3 training the demo image LoRA: notebooks/train_image_lora.ipynb, executed by "
          "papermill in the guarded kernel 'lora'", flush=True)
    rec = _run(notebook_for_task("image"),
               {"config_path": str(config), "overrides": parse_overrides(args.param)}, args)
    _print_record(rec)
    print("3/3 verifying")
    problems = verify_record(rec.path, expected_manifest_sha256=rec.manifest_sha256)
    with LedgerReader(state=rec.path.parent.parent) as ledger:
        expected = ledger.expected_manifest_sha256(rec.run_id)
        problems += ledger.verify()
        head, _hash = ledger.head()
    if expected is None or expected[0] != rec.manifest_sha256:
        raise VerificationError(f"the ledger does not attest run {rec.run_id}'s manifest")
    if problems:
        raise VerificationError("the new record does not verify: "
                                + "; ".join(map(str, problems)))
    print(f"  record: OK ({len(rec.files)} files match manifest.json)")
    print(f"  ledger: OK (run entry seq {rec.ledger_seq}; chain, checkpoints and signed head "
          f"verify up to seq {head})")
    print("Next (with . .venv/bin/activate):\n"
          f"  lora audit show {rec.run_id} --html run.html   # the executed notebook as HTML\n"
          f"  lora run --config {config} -p max_train_steps 40")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_override_args(p)
    add_home(p)
    add_state(p)
    add_runner(p)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="fail (and record) the run after this many seconds")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def register(sub) -> None:
    """Add ``run`` and ``demo`` to the ``lora`` CLI."""
    p = sub.add_parser(
        "run", help="run a training notebook with papermill and seal its run record",
        description="Execute a parameterized notebook in the guarded 'lora' kernel and write "
                    "the run record <state>/runs/<run_id>/ (executed notebook, adapter, "
                    "manifest, kernel events, TensorBoard logs), appended to the ledger. "
                    "A failed run is recorded too (exit 7).")
    p.add_argument("notebook", nargs="?", help="notebook to run (default with --config: the "
                                               "training notebook of the config's task)")
    p.add_argument("--config", "-c", help="training config (YAML); picks the notebook")
    p.add_argument("-f", "--parameters-file", dest="params_file", metavar="PARAMS.yaml",
                   help="papermill parameters (YAML mapping), e.g. config_path: my.yaml")
    _common(p)
    p.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="build demo assets, train the demo image LoRA as a "
                                    "recorded run, verify it",
                       description="The whole slice on tiny generated assets: demo assets, "
                                   "the image notebook through `lora run`, record + ledger "
                                   "verification.")
    d.add_argument("--rebuild", action="store_true", help="rebuild the demo assets")
    _common(d)
    d.set_defaults(func=cmd_demo)
