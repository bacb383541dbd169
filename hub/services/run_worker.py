"""One queued run, executed for the runs service: ``python -m hub.services.run_worker``.

    python -m hub.services.run_worker --state DIR --id N [--service-user NAME] [--demo]
    python -m hub.services.run_worker --state DIR --recover [--service-user NAME] [--demo]

The service claims a submission (``running``, GPUs allocated) and starts this worker for it.
The worker runs it exactly as the runner service does for a socket client
(:meth:`lora_kernel.trusted.service.RunnerServer.dispatch`): as root with ``--service-user``,
it works with the service account's effective uid (records, ledger) and the run's children run
as the requesting user with their groups, the user's identity variables and the CUDA variables
of the allocated GPUs only; in demo mode (hub-only users, no root) children run as this process's
own user (:meth:`RunAs.local`) and nothing is switched. The working home is the row's (the
service chose it, never the request).

SIGTERM / SIGINT / SIGHUP set a flag that the runner polls as ``ctx.cancelled``: it stops the
kernel, seals the run as failed and the worker writes the outcome into the row (``failed`` when
the user cancelled it, ``interrupted`` when the service stopped it). The worker dies with the
service (``PR_SET_PDEATHSIG``: SIGKILL), and its children with it; the next start of the
service finds the row ``running`` with a dead worker and recovers it
(:meth:`hub.runqueue.RunQueue.restore`).

``--recover`` seals every stale run in the state directory (the trusted
:func:`~lora_kernel.trusted.recovery.recover`, as the service account) and prints their records
as one JSON list: how a root service recovers without writing records as root.

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, LoraError, RunFailed
from lora_kernel.common.process import die_with_parent
from lora_kernel.trusted.identity import Actor, actor_by_name, current_actor
from lora_kernel.trusted.runner import (
    notebook_for_task,
    run_config,
    run_notebook,
    service_env,
)
from lora_kernel.trusted.runseal import ENV_DROP, RunContext, RunRecord
from lora_kernel.trusted.service import PASS_ENV
from lora_kernel.trusted.supervisor import Privileges, RunAs, child_cwd, spawn

from ..gpus import cuda_env
from ..runqueue import RunQueue, Submission
from ..settings import HubSettings, load_settings

log = logging.getLogger("lora.hub.run_worker")
_ANNOUNCED = re.compile(r"^run (\d{8}T\d{6}Z-[0-9a-f]+): ")


class Cancelled:
    """The flag SIGTERM / SIGINT / SIGHUP set (read by the runner as ``ctx.cancelled``).

    Called, it answers None while no signal came, else why the run stops (the runner records
    it): ``why`` tells a user's cancel from the runs service stopping (the hub's shutdown or
    restart), which :func:`execute` sets from the submission's row."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.why: Callable[[], str] | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._set)

    def _set(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __call__(self) -> str | None:
        if self.signal is None:
            return None
        return self.why() if self.why is not None else f"interrupted (signal {self.signal})"


def root_mode(demo: bool) -> bool:
    """Whether children run as the requesting user (root, not the demo)."""
    return os.geteuid() == 0 and not demo


def child_base_env(run_as: RunAs, service: bool, devices: list[str]) -> dict[str, str]:
    """The children's base environment: root mode as the runner service's (the user's identity
    variables and a few neutral ones); demo mode this process's without the state directory
    and anything of the hub's (its API token). Either way the allocated GPUs only."""
    if service:
        extra = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env = service_env(run_as, extra)
    else:
        env = {k: v for k, v in os.environ.items()
               if k not in ENV_DROP and not k.startswith("JUPYTERHUB_")}
    env.update(cuda_env(devices))
    return env


def make_context(sub: Submission | None, *, demo: bool, service_user: str | None,
                 cancelled: Cancelled, local: bool = True, state: str | None = None
                 ) -> RunContext:
    """The run context of ``sub`` (None: the recovering service account's own). ``local``
    False (the Kubernetes backend): no child runs here, so nothing runs as the user and no
    host firewall applies (the Job's pod gets the user's uid and the NetworkPolicy)."""
    if root_mode(demo):
        if not service_user:
            raise ConfigError("running as root needs --service-user (the account that writes "
                              "records); fix: pass it, or --demo without root")
        privileges = Privileges.for_service_account(service_user)
        run_as = (RunAs.for_user(sub.user) if sub and local
                  else RunAs.for_user(service_user))
    else:
        privileges, run_as = Privileges(), RunAs.local()
    if sub is None:
        actor = (actor_by_name(service_user, source="runs service") if service_user
                 and root_mode(demo) else None) or current_actor()
    else:
        a = sub.actor
        actor = Actor(str(a.get("name", sub.user)), int(a.get("uid", -1)),
                      int(a.get("gid", -1)), tuple(a.get("groups") or ()),
                      str(a.get("source", "hub-token")))
    env = child_base_env(run_as, root_mode(demo), list(sub.gpus_held) if sub else [])
    if root_mode(demo) and sub is not None and local and run_as.uid is not None:
        from lora_kernel.trusted.firewall import enforce

        enforce(run_as.uid)  # `firewall: required`: refuse unless in place (still root here)
    isolation = None
    if root_mode(demo) and sub is not None and local:
        from lora_kernel.trusted.accounts import run_accounts

        isolation = run_accounts(privileges, state)  # policies/runs.yaml: run accounts
    privileges.drop()
    # With a progress sink the executor writes <work>/progress.jsonl, which the user's studio
    # reads live from their own working home; the records themselves go nowhere else.
    return RunContext(actor=actor, run_as=run_as, privileges=privileges, env=env,
                      cancelled=cancelled, progress=(lambda _chunk: None) if sub else None,
                      isolation=isolation)


def config_task_as_user(ctx: RunContext, config: str, home: Path) -> str:
    """The ``task:`` of the user's config, read by a child running as the user (the service
    account never opens the user's files)."""
    import subprocess

    if not ctx.run_as.switches:
        from lora_kernel.common.notebooks import config_task

        return config_task(config)
    code = ("import json, sys\nfrom lora_kernel.common.errors import LoraError\n"
            "from lora_kernel.common.notebooks import config_task\n"
            "try:\n print(json.dumps({'task': config_task(sys.argv[1])}))\n"
            "except LoraError as e:\n print(json.dumps({'error': str(e)}))\n")
    proc = spawn([sys.executable, "-c", code, config], run_as=ctx.run_as,
                 privileges=ctx.privileges, env=ctx.child_env(home),
                 cwd=child_cwd(home, ctx.privileges), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ConfigError(f"cannot read the config {config}: "
                          + err.decode("utf-8", "replace")[-500:]) from None
    if "error" in answer:
        raise ConfigError(str(answer["error"]))
    return str(answer["task"])


Backend = Callable[[RunQueue, Submission, RunContext, str, Cancelled], RunRecord]


def execute(queue: RunQueue, sub: Submission, ctx: RunContext, state: str,
            cancelled: Cancelled, backend: Backend | None = None) -> Submission:
    """Run ``sub`` (here, or with ``backend``: :func:`hub.services.k8s_run.execute`) and
    write its outcome into its row."""
    home = Path(sub.home)

    def say(msg: str) -> None:
        log.info("%s", msg)
        match = _ANNOUNCED.match(msg)
        if match:
            with ctx.privileges.elevated():
                queue.set_run_id(sub.id, match.group(1))

    def why() -> str:
        with ctx.privileges.elevated():
            if queue.get(sub.id).cancel_requested:
                return f"cancelled by {sub.user}"
        return "interrupted: the runs service stopped (the hub was stopped or restarted)"

    cancelled.why = why
    kw: dict[str, Any] = {"home": home, "state": state, "timeout": sub.timeout, "ctx": ctx,
                          "log": say}
    status, record, error, code = "failed", None, None, 1
    try:
        if backend is not None:
            rec = backend(queue, sub, ctx, state, cancelled)
        elif sub.kind == "config":
            notebook = notebook_for_task(config_task_as_user(ctx, sub.path, home))
            rec = run_config(sub.path, sub.parameters.get("overrides") or {},
                             notebook=notebook, **kw)
        else:
            rec = run_notebook(sub.path, sub.parameters, **kw)
        status, record, code = "succeeded", rec.to_dict(), 0
    except RunFailed as exc:
        record = exc.record.to_dict() if exc.record is not None else None
        error, code = str(exc), exc.exit_code
    except LoraError as exc:  # nothing ran: invalid input, unsafe model, ...
        error, code = str(exc), exc.exit_code
    except Exception as exc:  # a bug: the row must still say what happened
        log.exception("run %s crashed", sub.id)
        error = f"the worker crashed: {type(exc).__name__}: {exc}"
    with ctx.privileges.elevated():
        current = queue.get(sub.id)
        if status != "succeeded" and cancelled.signal is not None:
            if current.cancel_requested:
                error = f"cancelled by {sub.user} while running; {error or ''}".rstrip("; ")
            else:
                status = "interrupted"
                error = (f"the runs service stopped (signal {cancelled.signal}: the hub was "
                         f"stopped or restarted); {error}")
        return queue.finish(sub.id, status, run_id=record["run_id"] if record else None,
                            record=record, error=error, exit_code=code)


def kubernetes_backend(hub: HubSettings, api: Any = None, core: Any = None) -> Backend:
    """Runs as Jobs in the cluster (``runs.backend: kubernetes``); ``api``/``core``: a
    ``BatchV1Api`` and a ``CoreV1Api`` (default: the service's in-cluster credentials)."""
    from . import k8s_run

    if api is None or core is None:
        api, core = k8s_run.load_apis()
    settings = hub.kubernetes

    def run(queue: RunQueue, sub: Submission, ctx: RunContext, state: str,
            cancelled: Cancelled) -> RunRecord:
        return k8s_run.execute(queue, sub, ctx, state, cancelled, api=api, core=core,
                               settings=settings)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hub.services.run_worker")
    p.add_argument("--state", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", type=int)
    what.add_argument("--recover", action="store_true")
    p.add_argument("--service-user", default=None)
    p.add_argument("--demo", action="store_true")
    p.add_argument("--no-die-with-parent", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cancelled = Cancelled()
    cancelled.install()
    if not args.no_die_with_parent:
        die_with_parent(sig=signal.SIGKILL)
    state = str(Path(args.state).resolve())
    if args.recover:
        from lora_kernel.trusted.recovery import recover

        ctx = make_context(None, demo=args.demo, service_user=args.service_user,
                           cancelled=cancelled)
        hub = load_settings()
        if hub.runs_backend == "kubernetes":
            from . import k8s_run

            api, core = k8s_run.load_apis()
            records = k8s_run.recover(state, ctx, api=api, core=core,
                                      settings=hub.kubernetes)
        else:
            records = recover(state=state, ctx=ctx)
        print(json.dumps([r.to_dict() for r in records]))
        return 0
    queue = RunQueue(state)
    sub = queue.get(args.id)
    if sub.status != "running":
        log.error("submission %s is %s, not running: nothing to do", sub.id, sub.status)
        return 2
    backend: Backend | None = None
    try:
        hub = load_settings()
        if hub.runs_backend == "kubernetes":
            backend = kubernetes_backend(hub)
        ctx = make_context(sub, demo=args.demo, service_user=args.service_user,
                           cancelled=cancelled, local=backend is None, state=state)
    except KeyError as exc:  # the user has no passwd entry
        queue.finish(sub.id, "failed", error=f"cannot run as {sub.user}: {exc}", exit_code=2)
        return 2
    except LoraError as exc:  # settings, credentials, the firewall
        queue.finish(sub.id, "failed", error=f"cannot start the run of {sub.user}: {exc}",
                     exit_code=exc.exit_code)
        return 2
    done = execute(queue, sub, ctx, state, cancelled, backend)
    log.info("submission %s: %s (run %s)", done.id, done.status, done.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
