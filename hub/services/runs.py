"""The hub's runs service ``lora-runs``: a queue of notebook runs that execute as their user.

    python -m hub.services.runs --state DIR [--demo] [--service-user NAME]

Routes (under ``/services/lora-runs/``; the user is whom the hub's token names):

``POST api/runs``                 ``{"notebook": path, "parameters": {...}}`` or
                                  ``{"config": path, "overrides": {...}}``, optional
                                  ``"gpus": n`` (at most the user's quota: 403 above it) and
                                  ``"timeout": seconds`` → 202 ``{"id", "status"}``
``GET api/runs``                  the caller's own submissions (newest first)
``GET api/runs/<id>``             one of them (404 for another user's: ids do not leak)
``POST api/runs/<id>/cancel``     queued → ``cancelled`` (nothing ran); running → the worker
                                  gets SIGTERM, the runner stops the kernel and seals the run
                                  as failed
``GET runs``                      an HTML page of the caller's runs

A request never chooses where a run works: its working home is
:func:`hub.settings.user_home` (root mode ``~user/lora``, demo ``$LORA_HOME/hub-users/<name>``),
and relative notebook / config paths resolve against it.

The scheduler (every 0.5 s on the IOLoop) reaps finished workers, starts queued submissions
(:meth:`hub.runqueue.RunQueue.claim_next`: at most ``runs.max_concurrent``, each with its GPUs
from the pool the spawner shares) as ``python -m hub.services.run_worker`` children, and at
start-up — and whenever a worker died without writing its outcome — restores the queue
(:meth:`~hub.runqueue.RunQueue.restore`: such rows become ``interrupted``, their runs are sealed
as failed). Workers die with the service.

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from html import escape
from pathlib import Path
from typing import Any

from tornado import web
from tornado.ioloop import PeriodicCallback

from lora_kernel.common.errors import ConfigError, LoraError, NoMatch, PolicyRefusal
from lora_kernel.common.paths import private_dir

from ..gpus import discover, quota_for
from ..runqueue import FINAL, RunQueue, Submission
from ..settings import RUNS_SERVICE, HubSettings, hub_state_dir, load_settings, user_home
from .base import ERROR_STYLE, ServiceConfig, ServiceHandler, listen, make_app, run_forever

log = logging.getLogger("lora.hub.runs")
REPO = Path(__file__).resolve().parents[2]
TICK_MS = 500
RESTORE_EVERY_S = 10.0


class Scheduler:
    """Starts queued submissions as worker processes and reaps them."""

    def __init__(self, config: ServiceConfig, queue: RunQueue) -> None:
        self.config = config
        self.queue = queue
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._callback: PeriodicCallback | None = None
        self._last_restore = 0.0
        self.log_dir = hub_state_dir(config.state) / "logs"

    def _worker_argv(self, *extra: str) -> list[str]:
        argv = [sys.executable, "-m", "hub.services.run_worker", "--state",
                str(self.config.state), *extra]
        if self.config.service_user:
            argv += ["--service-user", self.config.service_user]
        if self.config.demo:
            argv.append("--demo")
        return argv

    @staticmethod
    def _env() -> dict[str, str]:
        """The workers' environment: the service's without the hub's credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                          env.get("PYTHONPATH")]))
        return env

    def recover(self) -> list[dict[str, Any]]:
        """Seal stale runs in a worker process (as the service account in root mode)."""
        proc = subprocess.run(self._worker_argv("--recover", "--no-die-with-parent"),
                              env=self._env(), cwd=str(REPO), capture_output=True,
                              timeout=600)
        if proc.returncode != 0:
            log.error("recovery failed (exit %s): %s", proc.returncode,
                      proc.stderr.decode("utf-8", "replace")[-2000:])
            return []
        try:
            return list(json.loads(proc.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return []

    def restore(self) -> None:
        self._last_restore = time.monotonic()
        for sub in self.queue.restore(exclude=self.children, recover=self.recover):
            log.warning("submission %s of %s: worker gone, interrupted (run %s)", sub.id,
                        sub.user, sub.run_id)

    def start(self) -> None:
        """Restore the queue, then tick every 0.5 s on the current IOLoop."""
        self.restore()
        self._callback = PeriodicCallback(self.tick, TICK_MS)
        self._callback.start()

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop ticking; SIGTERM every worker (each seals its run as failed) and wait."""
        if self._callback is not None:
            self._callback.stop()
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.children.clear()

    def tick(self) -> None:
        try:
            self._tick()
        except Exception:  # one bad tick must not stop the scheduler
            log.exception("scheduler tick failed")

    def _tick(self) -> None:
        reaped = [i for i, proc in self.children.items() if proc.poll() is not None]
        for sub_id in reaped:
            del self.children[sub_id]
        if reaped or time.monotonic() - self._last_restore > RESTORE_EVERY_S:
            self.restore()  # a worker that died without writing its outcome
        while True:
            sub = self.queue.claim_next()
            if sub is None:
                return
            self.spawn(sub)

    def spawn(self, sub: Submission) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log_dir / f"{sub.id}.log", "ab") as out:
            proc = subprocess.Popen(self._worker_argv("--id", str(sub.id)), env=self._env(),
                                    cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.children[sub.id] = proc
        try:
            import psutil

            started: float | None = psutil.Process(proc.pid).create_time()
        except Exception:
            started = None
        self.queue.set_worker(sub.id, proc.pid, started)
        log.info("submission %s of %s: worker %s (GPUs %s)", sub.id, sub.user, proc.pid,
                 ",".join(sub.gpus_held) or "none")

    def signal_worker(self, sub: Submission) -> None:
        """SIGTERM the worker of running ``sub``: the runner stops and seals the run."""
        proc = self.children.get(sub.id)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return
        from ..runqueue import worker_alive

        if worker_alive(sub.worker_pid, sub.worker_started) and sub.worker_pid:
            os.kill(sub.worker_pid, signal.SIGTERM)


class RunsHandler(ServiceHandler):
    """Shared by the runs handlers. API handlers answer 401 without a user (``actor()``);
    only the HTML page sends a browser to the hub's login."""

    @property
    def queue(self) -> RunQueue:
        queue: RunQueue = self.settings["runs_queue"]
        return queue

    @property
    def hub(self) -> HubSettings:
        settings: HubSettings = self.settings["hub_settings"]
        return settings

    def own(self, sub_id: str) -> Submission:
        """The caller's submission ``sub_id``; 404 for a missing one or another user's."""
        me = self.actor().name
        try:
            sub = self.queue.get(int(sub_id))
        except NoMatch:
            sub = None
        if sub is None or sub.user != me:
            raise web.HTTPError(404, "no such run of yours: %s", sub_id)
        return sub


def _resolve(home: Path, value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("must be a path (absolute, or relative to your working home)",
                          key=key)
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else home / path)


class RunsApi(RunsHandler):
    """``api/runs``: submit (POST), list the caller's own (GET)."""

    def get(self) -> None:
        me = self.actor().name
        self.write_json({"runs": [s.to_dict() for s in self.queue.list_runs(me)]})

    def post(self) -> None:
        actor = self.actor()
        body = self.json_body()
        try:
            sub = self._submit(actor, body)
        except LoraError as exc:
            self.fail(exc)
        self.write_json({"id": sub.id, "status": sub.status}, status=202)

    def _submit(self, actor: Any, body: dict[str, Any]) -> Submission:
        if not actor.name or "/" in actor.name or actor.name.startswith("."):
            raise ConfigError(f"hub user name {actor.name!r} cannot name a working home")
        home = user_home(actor.name, self.lora.demo)
        if ("notebook" in body) == ("config" in body):
            raise ConfigError('give either "notebook" (with "parameters") or "config" (with '
                              '"overrides")')
        if "notebook" in body:
            kind, path = "notebook", _resolve(home, body["notebook"], "notebook")
            params = body.get("parameters") or {}
            if not isinstance(params, dict):
                raise ConfigError("must be a mapping of parameter: value", key="parameters")
        else:
            kind, path = "config", _resolve(home, body["config"], "config")
            overrides = body.get("overrides") or {}
            if not isinstance(overrides, dict):
                raise ConfigError("must be a mapping of config key: value", key="overrides")
            params = {"overrides": overrides}
        quota = quota_for(self.hub.roles_of(list(actor.groups)), self.hub.quotas)
        pool = len(self.queue.pool.devices)
        gpus = body.get("gpus", min(1, quota, pool))
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ConfigError(f"must be a whole number >= 0, got {gpus!r}", key="gpus")
        if gpus > quota:
            raise PolicyRefusal(f"{gpus} GPU(s) asked for; your quota is {quota}; fix: ask "
                                f"for at most {quota}")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or isinstance(timeout, bool) or timeout <= 0):
            raise ConfigError(f"must be a number of seconds > 0, got {timeout!r}",
                              key="timeout")
        if self.lora.demo:
            private_dir(home)
        sub = self.queue.submit(
            actor.name, kind, path, parameters=params, home=home, gpus=gpus, timeout=timeout,
            actor={"name": actor.name, "uid": actor.uid, "gid": actor.gid,
                   "groups": list(actor.groups), "source": actor.source})
        log.info("submission %s of %s: %s %s (GPUs %s)", sub.id, actor.name, kind, path, gpus)
        return sub


class RunApi(RunsHandler):
    """``api/runs/<id>``: one of the caller's submissions."""

    def get(self, sub_id: str) -> None:
        self.write_json(self.own(sub_id).to_dict())


class RunFileApi(RunsHandler):
    """``api/runs/<id>/samples.png`` and ``loss_curve.png``: images from the caller's own
    sealed record (the studio shows them; the record itself stays the service's)."""

    FILES = {"samples.png": ("samples/grid.png",), "loss_curve.png": ("loss_curve.png",)}

    def get(self, sub_id: str, name: str) -> None:
        sub = self.own(sub_id)
        if not sub.run_id:
            raise web.HTTPError(404, "run %s has no record yet", sub_id)
        from lora_kernel.common.paths import runs_dir

        record = runs_dir(self.lora.state) / sub.run_id
        for rel in self.FILES[name]:
            path = record / rel
            if path.is_file() and not path.is_symlink():
                self.set_header("Content-Type", "image/png")
                self.finish(path.read_bytes())
                return
        raise web.HTTPError(404, "run %s has no %s", sub_id, name)


class CancelApi(RunsHandler):
    """``api/runs/<id>/cancel``: cancel one of the caller's submissions."""

    def post(self, sub_id: str) -> None:
        sub = self.own(sub_id)
        if sub.status in FINAL:
            self.write_json(sub.to_dict())
            return
        sub = self.queue.cancel(sub.id)
        if sub.status == "running":
            scheduler: Scheduler | None = self.settings.get("runs_scheduler")
            if scheduler is not None:
                scheduler.signal_worker(sub)
            log.info("submission %s: cancel asked by %s (worker %s)", sub.id, sub.user,
                     sub.worker_pid)
        self.write_json(sub.to_dict(), status=202)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _outcome(s: Submission) -> str:
    """A finished run's numbers from its sealed record (steps, loss first -> last)."""
    res = (s.record or {}).get("result") if isinstance(s.record, dict) else None
    if not isinstance(res, dict) or not res.get("steps"):
        return ""
    first, last = res.get("first_loss"), res.get("final_loss")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)):
        return f"{res['steps']} steps, loss {first:.4f} → {last:.4f}"
    return f"{res['steps']} steps"


class RunsPage(RunsHandler):
    """``runs``: "My runs", the caller's own submissions: status, outcome, the record's run id
    with its samples and loss curve, errors; what the hub's Services menu leads to."""

    @web.authenticated
    def get(self) -> None:
        me = self.actor().name
        api = self.settings["service_prefix"].rstrip("/") + "/api/runs/"
        rows = []
        for s in self.queue.list_runs(me):
            images = ""
            if s.run_id and s.status == "succeeded":
                images = (f"<a href=\"{escape(api)}{s.id}/samples.png\">samples</a> · "
                          f"<a href=\"{escape(api)}{s.id}/loss_curve.png\">loss curve</a>")
            cls = {"succeeded": "ok", "failed": "bad", "interrupted": "bad"}.get(s.status, "")
            rows.append(
                f"<tr><td>{s.id}</td><td>{escape(Path(s.path).name)}</td>"
                f"<td class={cls or 'plain'}>{escape(s.status)}</td><td>{escape(_outcome(s))}"
                f"</td><td class=mono>{escape(s.run_id or '')}</td><td>{images}</td>"
                f"<td>{escape(','.join(s.gpus_held) or str(s.gpus))}</td>"
                f"<td>{_when(s.submitted)}</td><td>{_when(s.finished)}</td>"
                f"<td>{escape((s.error or '')[:300])}</td></tr>")
        table = ("<table><tr><th>#</th><th>notebook / config</th><th>status</th><th>outcome"
                 "</th><th>record</th><th>images</th><th>GPUs</th><th>submitted</th>"
                 f"<th>finished</th><th>error</th></tr>{''.join(rows)}</table>" if rows else
                 "<p>No runs yet. Start one from the studio notebook, or in a notebook cell: "
                 "<code>!lora run --hub $LORA_HUB_PUBLIC_URL --config my.yaml</code>.</p>")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>My runs — LoRA "
            f"Enclave</title><meta http-equiv=refresh content=15><style>{ERROR_STYLE}"
            "table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d6d9de;"
            "padding:.25em .5em;text-align:left;vertical-align:top}th{background:#eef0f3}"
            ".ok{color:#0a6b2d;font-weight:600}.mono{font-family:ui-monospace,monospace;"
            "font-size:12px}</style></head><body><header><a href=\"/hub/home\">Hub home</a>"
            f"<a href=\"/user/{escape(me)}/lab\">JupyterLab</a></header><main>"
            f"<h1>My runs ({escape(me)})</h1>{table}<p>Sealed records, reviews and the "
            "executed notebooks are in the audit service (auditors and reviewers).</p>"
            "</main></body></html>")


class RootPage(RunsHandler):
    """The service's root (the hub's Services menu): My runs."""

    def get(self) -> None:
        self.redirect(self.settings["service_prefix"].rstrip("/") + "/runs")


def make_runs_app(config: ServiceConfig, *, settings: HubSettings | None = None,
                  devices: list[str] | None = None, scheduler: bool = False
                  ) -> web.Application:
    """The runs service's tornado app. ``settings``: ``policies/hub.yaml`` (default: loaded);
    ``devices``: the GPU pool (default: NVML's, else the settings'); ``scheduler``: also start
    the scheduler on the current IOLoop (``app.settings['runs_scheduler']``)."""
    settings = settings or load_settings()
    if devices is None:
        devices = [d.index for d in discover(settings.devices)]
    queue = RunQueue(config.state, devices=devices, exclusive=settings.exclusive,
                     max_concurrent=settings.max_concurrent_runs,
                     local_gpus=settings.runs_backend == "local")
    app = make_app(config, [("api/runs", RunsApi), (r"api/runs/(\d+)", RunApi),
                            (r"api/runs/(\d+)/cancel", CancelApi),
                            (r"api/runs/(\d+)/(samples\.png|loss_curve\.png)", RunFileApi),
                            ("runs", RunsPage), ("", RootPage)])
    app.settings.update(runs_queue=queue, hub_settings=settings)
    if scheduler:
        sched = Scheduler(config, queue)
        app.settings["runs_scheduler"] = sched
        sched.start()
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hub.services.runs",
                                description="The hub's runs service (lora-runs).")
    p.add_argument("--state", required=True, help="the trusted state directory")
    p.add_argument("--demo", action="store_true",
                   help="hub-only users; runs execute as this service's own user")
    p.add_argument("--service-user", default=None,
                   help="root mode: the account that writes records and the ledger")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = Path(args.state).expanduser().resolve()
    if os.geteuid() == 0 and not args.demo:
        if not args.service_user:
            raise SystemExit("as root the runs service needs --service-user (the account "
                             "that writes records); or --demo")
        from lora_kernel.trusted.service import prepare_state

        prepare_state(state, args.service_user)
    config = ServiceConfig(RUNS_SERVICE, state, demo=args.demo,
                           service_user=args.service_user)
    app = make_runs_app(config, scheduler=True)
    listen(app)
    sched: Scheduler = app.settings["runs_scheduler"]
    run_forever(on_stop=sched.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
