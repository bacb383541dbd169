"""``lora run`` and ``lora demo``: recorded notebook runs (papermill, kernel ``lora``).

    lora run --config my.yaml [-p key value ...]     the training notebook of the config's task
    lora run NOTEBOOK [-f params.yaml] [-p k v ...]  any parameterized notebook
    lora run --resume RUN                            continue a failed training run (new record)
    lora run --hub URL (--config my.yaml | NOTEBOOK)  queue it in the hub's runs service
    lora demo [-p key value ...]                     demo assets + the image notebook + verify

Local mode runs in this process (as this user, state under this account); service mode
(``--runner SOCKET``, ``$LORA_RUNNER`` or the platform's socket) asks the runner service, which
runs the kernel as you and writes the record as the service account.

Progress: the run's executor sends progress records (cells, training steps); on a terminal
they become live bars (steps, loss, it/s, ETA), otherwise one line per tenth of the training
(:class:`lora_kernel.user.progress.ProgressView`); ``--quiet`` shows none.

``--hub URL`` submits the run to the hub's runs service (``lora-runs``) with
``$JUPYTERHUB_API_TOKEN`` (set in every hub server's terminal), waits for it and prints its
record; the hub chooses the working home and runs the kernel as you (:func:`run_on_hub`, over
:class:`lora_kernel.user.runs_client.RunsClient`, the studio's client too).

Exit codes: 0 success, 2 invalid config/parameters, 5 the new record does not verify,
6 refused (the hub: a GPU quota), 7 the run failed (its record, marked failed, was written
first).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
import difflib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lora_kernel.cli.options import (
    add_home,
    add_override_args,
    add_runner,
    add_state,
    parse_overrides,
)
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.yamlio import load_yaml
from lora_kernel.training.config import config_keys, parse_value
from lora_kernel.user.progress import ProgressView
from lora_kernel.user.runs_client import RunsClient, submission_error

__all__ = ["ProgressView", "cmd_demo", "cmd_run", "notebook_parameters", "register",
           "run_on_hub"]


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


def notebook_parameters(notebook: Path, params_file: str | None,
                        pairs: list[list[str]] | None) -> dict:
    """The papermill parameters of ``lora run NOTEBOOK [-f params.yaml] [-p KEY VALUE]...``.

    A key the notebook declares as a parameter (:mod:`lora_kernel.common.nbparams`: e.g.
    ``config_path``, ``overrides``) is a parameter; a config key is a config override. In
    ``params.yaml`` a relative ``config_path`` resolves against the file's folder; on the
    command line against the current directory. Overrides are merged in this order (later
    wins): the file's ``overrides:`` mapping, the file's top-level config keys, ``-p overrides
    MAPPING``, ``-p`` config keys. A key that is neither (or a config key for a notebook that
    takes no ``overrides``) is a :class:`ConfigError` naming where it came from.
    """
    from lora_kernel.common.nbparams import declared_parameters

    declared = set(declared_parameters(notebook))
    keys = config_keys()
    takes_overrides = "overrides" in declared

    def refuse(key: str, where: str | None, hint_to: str) -> ConfigError:
        close = difflib.get_close_matches(key, sorted(declared | set(keys)), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        params_list = ", ".join(sorted(declared)) or "none"
        return ConfigError(f"neither a parameter of {notebook.name} ({params_list}) nor a "
                           f"config key{hint}; fix: {hint_to}", file=where, key=key)

    def mapping(value: Any, where: str | None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping of config key: value, got {value!r}",
                              file=where, key="overrides")
        return dict(value)

    params: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in load_params_file(params_file).items():
        if key == "overrides" and takes_overrides:
            overrides = {**mapping(value, params_file), **overrides}
        elif key in declared:
            params[key] = value
        elif key in keys and takes_overrides:
            overrides[key] = value
        else:
            raise refuse(str(key), params_file, "correct or remove it (config keys: "
                                                "`lora config --keys`)")
    for key, text in pairs or []:
        value = parse_value(text)
        if key == "overrides" and takes_overrides:
            overrides.update(mapping(value, "-p"))
        elif key in declared:
            if key == "config_path" and value:
                value = str(Path(str(value)).expanduser().resolve())
            params[key] = value
        elif key in keys and takes_overrides:
            overrides[key] = value
        else:
            raise refuse(key, "-p", "correct the key (config keys: `lora config --keys`)")
    if takes_overrides and (overrides or "overrides" in params):
        params["overrides"] = overrides
    return params


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _print_record(rec) -> None:
    """The sealed record: status, losses (when the run reported them as numbers: a plain
    notebook's result may hold anything), where the adapter is, the manifest's digest."""
    res = rec.result if isinstance(rec.result, dict) else {}
    loss = ""
    if res.get("steps") and _number(res.get("first_loss")) and _number(res.get("final_loss")):
        loss = f": {res['steps']} steps, loss {res['first_loss']:.4f} -> {res['final_loss']:.4f}"
        if _number(res.get("eval_loss_before")) and _number(res.get("eval_loss_after")):
            loss += f" (eval {res['eval_loss_before']:.4f} -> {res['eval_loss_after']:.4f})"
    print(f"run {rec.run_id} {rec.status} in {rec.seconds:.1f}s{loss}")
    print(f"record: {rec.path}")
    adapters = [rel for rel in rec.files if rel.startswith("adapter/")]
    for rel in rec.files:
        if rel.startswith("adapter/") or rel in ("executed.ipynb", "samples/grid.png",
                                                  "samples/completions.md"):
            print(f"  {rel}")
    print(f"  manifest.json  sha256 {rec.manifest_sha256}  (ledger seq {rec.ledger_seq})")
    if adapters:
        print(f"the adapter is in the record ({rec.path / adapters[0]}); a recorded run does "
              f"not write the config's output_dir (use `lora publish {rec.run_id} --to DIR` "
              f"once it is approved)")


def _print_style_measures(rec) -> None:
    """The demo's style and prompt-adherence measures (base vs LoRA) from the record's
    ``samples/samples.json``, when the run computed them."""
    import json

    from lora_kernel.training.style_metrics import summary_line
    if "samples/samples.json" not in rec.files:
        return
    info = json.loads((rec.path / "samples" / "samples.json").read_text(encoding="utf-8"))
    if info.get("measures"):
        print(f"  {summary_line(info['measures'])}")


def _progress(args) -> ProgressView | None:
    """How the run's progress shows on stdout: live bars on a terminal, periodic lines
    otherwise, nothing with --quiet."""
    if args.quiet:
        return None
    return ProgressView(sys.stdout, live=sys.stdout.isatty())


def _run(notebook: Path | None, params: dict | None, args, resume: str | None = None):
    """Run locally, or ask the runner service (service mode); return the RunRecord.
    ``resume``: the id of a failed run to continue (``notebook`` and ``params`` unused)."""
    from lora_kernel.common.paths import lora_home
    from lora_kernel.trusted.runner import RunContext, RunRecord, resume_run, run_notebook
    from lora_kernel.trusted.service import call, runner_socket

    sock = runner_socket(args.runner)
    view = _progress(args)
    try:
        if sock is None:
            ctx = RunContext.local(view.feed if view else None)
            kw = {"home": args.home, "state": args.state, "timeout": args.timeout, "ctx": ctx,
                  "log": _log}
            if resume:
                return resume_run(resume, **kw)
            return run_notebook(notebook, params, **kw)
        request = {"home": str(lora_home(args.home)), "timeout": args.timeout,
                   "progress": view is not None}
        if resume:
            request.update({"op": "resume", "run": resume})
        else:
            request.update({"op": "run", "notebook": str(notebook.resolve()),
                            "parameters": params})
        result = call(sock, request, on_log=_log,
                      on_progress=lambda text: view.feed(text.encode()) if view else None)
        return RunRecord.from_dict(result)
    finally:
        if view is not None:
            view.close()


def run_on_hub(hub: str, request: dict[str, Any]) -> dict[str, Any]:
    """Submit ``request`` to the hub's runs service and wait until it is finished; return the
    submission (:class:`~lora_kernel.user.runs_client.RunsClient`: Ctrl-C cancels the run and
    waits for its record, a second one stops waiting)."""
    import os

    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if not token:
        raise ConfigError("JUPYTERHUB_API_TOKEN is not set; fix: run this in a terminal of "
                          "your hub server (it is set there), or create a token on the hub's "
                          "Token page and export JUPYTERHUB_API_TOKEN=...")
    client = RunsClient.for_hub(hub, token)
    sub = client.submit(request)
    print(f"submitted: hub run #{sub['id']} ({sub['status']})", flush=True)
    return client.wait(sub["id"], on_cancel=lambda: _log(
        f"cancelling hub run #{sub['id']} (Ctrl-C again to stop waiting)"))


def _hub_result(sub: dict[str, Any]) -> int:
    """Print a finished hub submission; 0 when it succeeded, else raise its error."""
    from lora_kernel.trusted.runner import RunRecord

    rec = sub.get("record")
    if rec:
        _print_record(RunRecord.from_dict(rec))
    print(f"hub run #{sub['id']}: {sub['status']}" + (f" (run {sub['run_id']})"
                                                        if sub.get("run_id") else ""))
    error = submission_error(sub)
    if error is not None:
        raise error
    return 0


def cmd_run(args) -> int:
    """Run a notebook (or a config's training notebook) and print where its record is."""
    from lora_kernel.trusted.runner import config_task, notebook_for_task

    _sigterm_as_interrupt()
    if args.hub:
        if args.resume or args.runner or args.home or args.state:
            raise ConfigError("--hub runs in the hub's runs service, which picks the working "
                              "home and state; fix: drop --resume, --runner, --home, --state")
        if args.config:
            if args.params_file or args.notebook:
                raise ConfigError("give --config or NOTEBOOK [-f params.yaml], not both")
            request: dict[str, Any] = {"config": str(Path(args.config).resolve()),
                                       "overrides": parse_overrides(args.param)}
        elif args.notebook:
            notebook = Path(args.notebook)
            request = {"notebook": str(notebook.resolve()),
                       "parameters": notebook_parameters(notebook, args.params_file,
                                                         args.param)}
        else:
            raise ConfigError("nothing to run; fix: lora run --hub URL --config my.yaml")
        if args.gpus is not None:
            request["gpus"] = args.gpus
        if args.timeout:
            request["timeout"] = args.timeout
        return _hub_result(run_on_hub(args.hub, request))
    if args.resume:
        if args.config or args.notebook or args.params_file or args.param:
            raise ConfigError("--resume RUN continues that run with its own notebook, config "
                              "and overrides; fix: drop --config, NOTEBOOK, -f and -p")
        _print_record(_run(None, None, args, resume=args.resume))
        return 0
    if args.config:
        if args.params_file:
            raise ConfigError("give either --config or -f params.yaml, not both")
        config = Path(args.config).resolve()
        notebook = Path(args.notebook) if args.notebook else notebook_for_task(
            config_task(config))
        params = {"config_path": str(config), "overrides": parse_overrides(args.param)}
    elif args.notebook:
        notebook = Path(args.notebook)
        params = notebook_parameters(notebook, args.params_file, args.param)
    else:
        raise ConfigError("nothing to run; fix: lora run --config my.yaml, "
                          "lora run NOTEBOOK -f params.yaml, or lora run --resume RUN")
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
    _print_style_measures(rec)
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
    state, home_arg = rec.path.parent.parent, home
    print("Next (with . .venv/bin/activate; --state and --home name where this demo wrote):\n"
          f"  lora audit show {rec.run_id} --state {state} --html run.html   "
          f"# the executed notebook as HTML\n"
          f"  lora run --config {config} -p max_train_steps 40 --home {home_arg} "
          f"--state {state}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_override_args(p)
    add_home(p)
    add_state(p)
    add_runner(p)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="fail (and record) the run after this many seconds")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress (default: live bars on a terminal, a line per tenth of "
                        "the training otherwise)")


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
                   help="papermill parameters (YAML mapping), e.g. config_path: my.yaml; a "
                        "config key in it (learning_rate: 0.002) is a config override")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the failed (interrupted) training run RUN from the latest "
                        "checkpoint in its work folder, as a new run record that names it")
    p.add_argument("--hub", metavar="URL",
                   help="queue the run in the hub's runs service at URL (with "
                        "$JUPYTERHUB_API_TOKEN); it runs as you in your hub working home")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="with --hub: GPUs for the run (default 1 if the hub has any; at most "
                        "your quota); the config's num_processes: auto trains on that many "
                        "data-parallel ranks")
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
