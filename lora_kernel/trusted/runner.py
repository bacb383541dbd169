"""Recorded runs: a parameterized notebook executed by papermill in the guarded ``lora`` kernel,
sealed as a run record ``<state>/runs/<run_id>/`` and appended to the ledger.

The runner is the trusted side. It never trusts what the notebook or the user's files claim;
everything untrusted happens in children that run as the run's user
(:mod:`lora_kernel.steps.executor`), and the runner keeps only what it checked::

    runner (this module; service mode: root, effective uid of the service account)
      ├─ recover stale runs (lora_kernel.trusted.recovery)
      ├─ child "pin" as the user: validate config, hash notebook/config/dataset/base model
      │    (resuming: find and hash the latest checkpoint in the old run's work folder)
      ├─ <state>/runs/.active/<run_id>.json + lock (who, what, pinned inputs, when;
      │    lora_kernel.trusted.runseal.ActiveRun)
      ├─ child "run" as the user: papermill → kernel "lora" (guard + execution log),
      │    env: LORA_RUN_ID, LORA_HOME=<working home>; never the state directory;
      │    work folder <home>/work/<run_id>/ (output/, checkpoints, executed.ipynb)
      ├─ waits (timeout, Ctrl-C/SIGTERM/SIGHUP, a cancelled request); then kills every process
      │    carrying LORA_RUN_ID; children die with the runner (PR_SET_PDEATHSIG)
      ├─ child "collect" as the user: evidence as a tar → checked, extracted into staging
      └─ manifest (pinned inputs), seal (atomic rename), ledger entry
           (lora_kernel.trusted.runseal.seal_run, shared with recovery and Kubernetes runs)
A run that fails — a cell raises, the kernel dies (even SIGKILL), the executor is killed, the
timeout passes, Ctrl-C — is recorded too, with whatever the executor wrote of the notebook,
marked ``failed``; then :class:`~lora_kernel.common.errors.RunFailed` is raised naming the
record. If the runner itself dies, ``lora audit recover`` seals the run as failed later.

:func:`resume_run` continues a failed training run into a new record: the runner reads the old
run's sealed record (its own state), the pin child finds the checkpoint in the old work folder
(the user's), and the new manifest names the run and checkpoint it continued.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from lora_kernel.common.contract import CONFIG_PATH_KEYS
from lora_kernel.common.digests import OUTSIDE_PREFIX, listing_sha256, stat_key
from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    VerificationError,
    error_from_answer,
)
from lora_kernel.common.licences import check_licence
from lora_kernel.common.notebooks import NOTEBOOKS, config_task, notebook_dir, notebook_for_task
from lora_kernel.common.paths import lora_home, runs_dir
from lora_kernel.common.runspec import (
    PinnedInputs,
    RunActor,
    RunDescription,
    RunUser,
    pinned_parameters,
)
from lora_kernel.common.timeutil import iso_time, utc_now
from lora_kernel.provenance.records import load_manifest
from lora_kernel.trusted import hashcache
from lora_kernel.trusted.runseal import (
    KERNEL_NAME,
    ActiveRun,
    BeforeSeal,
    RunContext,
    RunRecord,
    executor_command,
    seal_run,
)
from lora_kernel.trusted.supervisor import RunAs, child_cwd, kill_run_processes, spawn, stop

__all__ = ["NOTEBOOKS", "config_task", "RunRecord", "RunContext", "ResumeFrom", "RunHooks",
           "Runner", "new_run_id", "notebook_dir", "notebook_for_task", "run_config",
           "run_notebook", "resume_run", "KERNEL_NAME", "ActiveRun", "seal_run"]

# Environment the children of a service-mode run get (nothing else of the runner's).
SERVICE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")


def service_env(run_as: RunAs, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base environment of a service-mode run's children: the user's identity variables
    from the passwd entry, a few of the runner's neutral variables, and ``extra``."""
    env = {k: os.environ[k] for k in SERVICE_ENV_KEEP if k in os.environ}
    env.setdefault("PATH", f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin")
    env.update({"HOME": run_as.home_dir or "/", "USER": run_as.name or "",
                "LOGNAME": run_as.name or ""})
    env.update(extra or {})
    return env


def new_run_id(now: dt.datetime | None = None) -> str:
    """A time-sortable, unguessable run id: ``20261125T201500Z-ab12cd``."""
    now = now or utc_now()
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def run_config(config_path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None,
               *, notebook: str | os.PathLike[str] | None = None, **kw: Any) -> RunRecord:
    """Run the training notebook of a config's task (``lora run --config``); see
    :func:`run_notebook` for the keywords. ``overrides`` are config keys (``-p key value``)."""
    config_path = Path(config_path).resolve()
    nb = Path(notebook) if notebook else notebook_for_task(config_task(config_path))
    params = {"config_path": str(config_path), "overrides": dict(overrides or {})}
    return run_notebook(nb, params, **kw)


@dataclass(frozen=True)
class ResumeFrom:
    """A failed training run to continue: its id and the work folder holding its checkpoints,
    both from its sealed record."""

    run_id: str
    work: str
    snapshot: dict[str, Any] | None = None  # its record's extra.snapshot


def resume_run(run_id: str, *, home: str | os.PathLike[str] | None = None,
               state: str | os.PathLike[str] | None = None, timeout: float | None = None,
               ctx: RunContext | None = None,
               log: Callable[[str], None] | None = None) -> RunRecord:
    """Continue the failed (interrupted) training run ``run_id`` from its latest checkpoint
    as a new recorded run (``lora run --resume RUN``).

    The old record must verify against the ledger; it gives the notebook, the config file and
    the overrides (run again, pinned again: the resumed run refuses a changed config) and the
    work folder. The pin child finds the latest checkpoint there, as the user; the notebook
    gets it as ``resume_from``; the new manifest records ``extra.resumed_from_run`` and
    ``extra.resumed_from_checkpoint``. Raises :class:`ConfigError` for an unknown run, a run
    that succeeded or is no training run, or whose work folder or checkpoints are gone (nothing
    run); otherwise as :func:`run_notebook`.
    """
    from lora_kernel.provenance.audit import verify_run
    from lora_kernel.provenance.ledger import LedgerReader

    with LedgerReader(state=state) as ledger:
        problems = verify_run(run_id, ledger, state)
    record = runs_dir(state) / run_id
    if problems:
        raise VerificationError(f"run {run_id} does not verify, so it is not resumed: "
                                + "; ".join(map(str, problems)))
    if not record.is_dir():
        raise ConfigError(f"run {run_id} was pruned: nothing to resume", key="RUN")
    meta = load_manifest(record)["predicate"]["runDetails"]["metadata"]
    extra = meta.get("extra") or {}
    if meta.get("status") == "succeeded":
        raise ConfigError(f"run {run_id} succeeded: there is nothing to resume; fix: to train "
                          "longer, start a new run with a larger max_train_steps (lora run "
                          "--config ... -p max_train_steps N)", key="RUN")
    if extra.get("kind") != "training" or not extra.get("config_path"):
        raise ConfigError(f"run {run_id} is not a training run: nothing to resume", key="RUN")
    if not extra.get("work_dir"):
        raise ConfigError(f"run {run_id} records no work folder (no checkpoints kept): nothing "
                          "to resume; fix: start a new run (lora run --config ...)", key="RUN")
    snapshot: dict[str, Any] = extra["snapshot"] if isinstance(extra.get("snapshot"), dict) \
        else {}
    # the overrides the user asked for (a snapshot run's parameters point at its laid-out
    # inputs instead; the resumed run is pinned and laid out again from the user's files)
    overrides = dict(snapshot.get("overrides") or (extra.get("parameters") or {}).get(
        "overrides") or {})
    overrides.pop("output_dir", None)  # the new run's work folder replaces it
    params = {"config_path": extra["config_path"], "overrides": overrides}
    return run_notebook(str(extra.get("notebook_path") or extra["notebook"]), params, home=home,
                        state=state, timeout=timeout, ctx=ctx, log=log,
                        hooks=RunHooks(resume=ResumeFrom(run_id, str(extra["work_dir"]),
                                                         snapshot or None)))


@dataclass(frozen=True)
class RunHooks:
    """What a resume or a replay changes in a run (the default: nothing).

    ``resume`` continues a failed run (:func:`resume_run`). A replay
    (:mod:`lora_kernel.trusted.replay`) passes ``check_pinned`` (called with the pin step's
    answer before anything runs; raising stops the run, nothing recorded), ``extra`` (merged
    into the manifest's ``extra``), ``before_seal`` (called with the staging folder and
    ``extra`` of a succeeded run before its manifest is built) and ``model_hash_cache`` False
    (hash the base model in full instead of taking its digest from the state directory's
    digest cache when its stat key matches, :mod:`lora_kernel.trusted.hashcache`).
    ``snapshot`` (a replay of a run that trained on a snapshot: the record's
    ``extra.snapshot`` plus its ``config``) lays that snapshot out before the pin step, so
    the replay reads only the pinned bytes from the store, never the user's files.
    """

    resume: ResumeFrom | None = None
    check_pinned: Callable[[PinnedInputs], None] | None = None
    extra: Mapping[str, Any] | None = None
    before_seal: BeforeSeal | None = None
    model_hash_cache: bool = True
    snapshot: Mapping[str, Any] | None = None  # a replay: the record's extra.snapshot + config


class _Pinned(NamedTuple):
    """The pin step's answer as the runner keeps it: the typed inputs, the parameters the
    notebook runs with, its source, and the base model's stat key and digest (for the
    kernel, so that it does not hash the model again)."""

    inputs: PinnedInputs
    parameters: dict[str, Any]
    notebook_source: str
    base_model_digest: dict[str, str] | None
    licence: str | None = None  # the base model's (policies/models.yaml), pinned in the record
    sources: dict[str, Any] | None = None  # where the pin step read each input (snapshot)
    snapshot: dict[str, Any] | None = None  # extra.snapshot of the record


@dataclass
class Runner:
    """Where and for whom runs execute: the working home, the state directory, the time limit
    (seconds), who the run is for (``ctx``; default: this process's user, local mode) and
    where progress messages go (``log``). :meth:`run` executes one notebook."""

    home: str | os.PathLike[str] | None = None
    state: str | os.PathLike[str] | None = None
    timeout: float | None = None
    ctx: RunContext = field(default_factory=RunContext.local)
    log: Callable[[str], None] = field(default=lambda _msg: None)

    def run(self, notebook: str | os.PathLike[str],
            parameters: Mapping[str, Any] | None = None,
            hooks: RunHooks | None = None) -> RunRecord:
        """Execute ``notebook`` with papermill in the ``lora`` kernel and seal its run record
        (see :func:`run_notebook`)."""
        hooks = hooks or RunHooks()
        notebook = Path(notebook).resolve()
        params = _plain_json(parameters)
        self._recover_stale_runs()
        run_id = new_run_id()
        home = lora_home(self.home)  # the requester's working home (the pin step's)
        lease, run_ctx, run_home, work = self._place(run_id, home, hooks)
        try:
            return self._run(run_id, notebook, params, hooks, home, run_ctx, run_home, work,
                             lease)
        finally:
            if lease is not None:
                lease.release()

    def _place(self, run_id: str, home: Path, hooks: RunHooks
               ) -> tuple[Any, RunContext, Path, Path]:
        """Where the run executes and as whom: in the requester's working home as the
        requester, or (service mode with run accounts, :mod:`lora_kernel.trusted.accounts`)
        in a private work folder as a leased run account the requester does not control.
        Returns ``(lease or None, the run's context, its working home, its work folder)``."""
        accounts = self.ctx.isolation
        if accounts is None:
            return None, self.ctx, home, home / "work" / run_id
        from lora_kernel.trusted.accounts import lend_work, make_work
        from lora_kernel.trusted.firewall import enforce

        lease = accounts.acquire(self.state)
        try:
            account = lease.run_as
            with self.ctx.privileges.elevated():
                work, run_home = make_work(accounts, account, run_id)
                if account.uid is not None:
                    enforce(account.uid)  # the egress firewall covers the run account
                if hooks.resume is not None:  # the failed run's folder, lent to this run
                    old = Path(hooks.resume.work)
                    if not old.is_dir():
                        raise ConfigError(f"the work folder {old} of run "
                                          f"{hooks.resume.run_id} is gone, and its "
                                          "checkpoints with it: nothing to resume from; fix: "
                                          "start a new run (lora run --config ...)", key="RUN")
                    lend_work(old, account)
                    lease.on_release = _then(lease.on_release, self._secure(old))
        except BaseException:
            lease.release()
            raise
        run_as = dataclasses.replace(account, home_dir=str(run_home))
        env = dict(self.ctx.env or {})
        env.update({"HOME": str(run_home), "USER": str(run_as.name),
                    "LOGNAME": str(run_as.name)})
        run_ctx = dataclasses.replace(self.ctx, run_as=run_as, env=env)
        if self.ctx.progress is not None:  # the studio reads <home>/work/<run_id>/progress.jsonl
            mirror = _ProgressMirror(self.ctx, home, home / "work" / run_id / "progress.jsonl")
            lease.on_release = _then(lease.on_release, mirror.close)
            sink = self.ctx.progress

            def tee(chunk: bytes) -> None:
                mirror.write(chunk)
                sink(chunk)
            run_ctx.progress = tee
        return lease, run_ctx, run_home, work

    def _secure(self, work: Path) -> Callable[[], None]:
        """Take a lent work folder back (:func:`~lora_kernel.trusted.accounts.secure_work`)."""
        def secure() -> None:
            from lora_kernel.trusted.accounts import secure_work

            with self.ctx.privileges.elevated():
                secure_work(work)
        return secure

    def _run(self, run_id: str, notebook: Path, params: dict[str, Any], hooks: RunHooks,
             home: Path, run_ctx: RunContext, run_home: Path, work: Path, lease: Any
             ) -> RunRecord:
        # The executor starts now (papermill, the kernel) while the pin child hashes the
        # inputs; it runs only when the pin step and the checks accept the run.
        prestart = _Prestart(run_ctx, run_id, run_home, work)
        handed = False
        try:
            replayed = None
            if hooks.snapshot is not None:  # a replay reads the recorded snapshot only
                params, replayed = self._replay_inputs(hooks.snapshot, params, work)
            # an isolated run's work folder is the run account's: the pin step (as the
            # requester) checks an output folder in the requester's working home instead,
            # and the runner points the pinned config at the real one
            pin_work = home / "work" / run_id if lease is not None else work
            pinned = self._pin(notebook, params, home, pin_work, hooks, run_work=work,
                               resume_as=(run_ctx, run_home) if lease is not None else None)
            if replayed is not None:
                pinned = pinned._replace(snapshot=replayed)
            elif pinned.sources is not None:
                pinned = self._snapshot(run_id, pinned, home, work, hooks.resume)
            elif lease is not None and pinned.inputs.training:
                raise ConfigError("this run's dataset has files outside train_data_dir "
                                  "(allow_outside_dataset), which a run account cannot read; "
                                  "fix: copy them into the dataset folder", key="train_data_dir")
            run = self._describe(run_id, notebook, pinned, run_home, work, hooks, run_ctx,
                                 lease is not None)
            with ActiveRun(runs_dir(self.state), run) as active:
                self.log(f"run {run_id}: {notebook.name} in kernel '{KERNEL_NAME}' "
                         f"(papermill)" + (f" as run account {run_ctx.run_as.name}"
                                           if lease is not None else ""))
                t0 = time.monotonic()
                handed = True  # from here on _execute stops it, whatever happens
                rc, reason = _execute(run_ctx, run, pinned.notebook_source, active.staging,
                                      self.timeout, prestart,
                                      base_model_digest=pinned.base_model_digest)
                return seal_run(run, active.staging, rc=rc, reason=reason, ctx=run_ctx,
                                state=self.state, seconds=time.monotonic() - t0,
                                log=self.log, before_seal=hooks.before_seal)
        except BaseException as exc:
            if not handed:
                prestart.abort(clean=isinstance(exc, Exception))
                if lease is not None:
                    from lora_kernel.trusted.accounts import remove_work

                    with self.ctx.privileges.elevated():
                        remove_work(work)
            raise

    def _recover_stale_runs(self) -> None:
        from lora_kernel.trusted.recovery import recover

        for rec in recover(state=self.state, ctx=self.ctx):
            self.log(f"recovered stale run {rec.run_id}: sealed as failed ({rec.error})")

    def _pin(self, notebook: Path, params: dict[str, Any], home: Path, work: Path,
             hooks: RunHooks, run_work: Path | None = None,
             resume_as: tuple[RunContext, Path] | None = None) -> _Pinned:
        """Ask the pin step (as the user) for the run's inputs, check and type its answer,
        keep the base model's digest in the cache, and apply the hooks' checks."""
        spec: dict[str, Any] = {"notebook": str(notebook), "parameters": params,
                                "home": str(home), "work": str(work)}
        resume = ({"run_id": hooks.resume.run_id, "work": hooks.resume.work}
                  if hooks.resume is not None else None)
        if resume is not None and resume_as is None:
            spec["resume"] = resume
        ctx = self.ctx
        cache_uid = ctx.run_as.uid if ctx.run_as.uid is not None else os.getuid()
        if hooks.model_hash_cache:
            spec["model_digests"] = hashcache.lookup(cache_uid, self.state)
        answer = _child_json(ctx, "pin", spec, home)
        if resume is not None and resume_as is not None and "error" not in answer:
            # an isolated run's checkpoints are its (lent) run account's, not the requester's:
            # the run account's child finds and hashes the checkpoint
            run_ctx, run_home = resume_as
            answer["resume"] = _child_json(run_ctx, "pin-resume", {
                "resume": resume, "config": answer.get("config") or {},
                "notebook": spec["notebook"], "declared": answer.get("declared") or []},
                run_home)["resume"]
        notebook_source = answer.get("notebook_source")
        if not isinstance(notebook_source, str):
            raise LoraError("the pin step answered no notebook source")
        if run_work is not None and run_work != work and isinstance(answer.get("config"), dict):
            out = str(run_work / "output")
            answer["config"]["output_dir"] = out
            if isinstance(answer.get("overrides"), dict):
                answer["overrides"]["output_dir"] = out
            work = run_work
        inputs = PinnedInputs.from_untrusted(answer)
        licence = None
        if inputs.training and inputs.config:  # refused before anything runs (exit 6)
            licence = check_licence(str(inputs.config.get("base_model", "")), ctx.actor.name,
                                    ctx.actor.groups)
        stat_key = answer.get("base_model_stat_key")
        if not answer.get("base_model_hash_cached", False) and hooks.model_hash_cache \
                and isinstance(stat_key, str) and inputs.base_model_sha256 is not None:
            hashcache.store(cache_uid, stat_key, inputs.base_model_sha256, self.state)
        params = pinned_parameters(params, inputs, work)
        if hooks.check_pinned is not None:
            hooks.check_pinned(inputs)
        if hooks.resume is not None:
            if inputs.resume is None:
                raise LoraError("the pin step answered no checkpoint to resume from")
            # the run it continues is ours, not the child's word
            point = dataclasses.replace(inputs.resume, run_id=hooks.resume.run_id)
            inputs = dataclasses.replace(inputs, resume=point)
            params["resume_from"] = point.checkpoint
        known = ({"key": stat_key, "sha256": inputs.base_model_sha256}
                 if isinstance(stat_key, str) and inputs.base_model_sha256 else None)
        sources = answer.get("snapshot_sources") if inputs.training else None
        return _Pinned(inputs, params, notebook_source, known, licence,
                       sources if isinstance(sources, dict) else None)

    def _snapshot(self, run_id: str, pinned: _Pinned, home: Path, work: Path,
                  resume: ResumeFrom | None = None) -> _Pinned:
        """Store the pinned inputs the content-addressed store lacks (read by a ``snapshot``
        child as the user, hashed here), lay the run's snapshot out in ``<work>/inputs`` and
        point the run at it: the notebook trains on exactly the bytes that were pinned."""
        from lora_kernel.trusted import objects

        inputs, sources = pinned.inputs, pinned.sources or {}
        digests = inputs.dataset_digests or {}
        if any(OUTSIDE_PREFIX in k for k in digests):
            return pinned._replace(snapshot={
                "read_from": "the user's files",
                "why": "the dataset has files outside train_data_dir (allow_outside_dataset)"})
        version = "ds-" + listing_sha256(digests)[:32]
        if version != inputs.dataset_version:
            raise VerificationError(f"the pin step answered dataset version "
                                    f"{inputs.dataset_version} for files whose version is "
                                    f"{version}")
        doc = {"dataset_digests": digests, "dataset_version": version,
               "config_sha256": inputs.config_sha256,
               "base_model_sha256": inputs.base_model_sha256,
               "init_adapter_sha256": inputs.init_adapter_sha256}
        store = objects.ObjectStore.of(self.state)
        request = objects.snapshot_request(doc, sources, store)
        if request:
            objects.check_free_space(store, request)
            got = _child_tar(self.ctx, "snapshot", {"files": request}, home,
                             store.receive)
        else:
            got = {}
        snap = objects.accept(doc, sources, got, store, run_id)
        with self.ctx.privileges.elevated():  # an isolated run's folder is its account's
            resumed = self._resumed_inputs(snap, resume)
        if resumed is not None:  # the interrupted run's laid-out snapshot, the same bytes
            laid = objects.laid_paths(snap, resumed)
            with self.ctx.privileges.elevated():
                digest = {"key": stat_key(laid["base_model"]),
                          "sha256": snap.base_model_sha256}
        else:
            laid, digest = self._lay_out(store, snap, work)
        where = resumed if resumed is not None else Path(laid["config"]).parent.parent
        requested = dict(pinned.parameters.get("overrides") or {})
        overrides = {**requested, **_snapshot_paths(inputs.config or {}, laid)}
        params = {**pinned.parameters, "config_path": laid["config"], "overrides": overrides}
        self.log(f"run {run_id}: inputs pinned in the snapshot store ({version}, "
                 f"{len(request)} new of {snap.record()['files']} files)")
        return pinned._replace(parameters=params, base_model_digest=digest,
                               snapshot={"read_from": "snapshot", **snap.record(),
                                         "overrides": requested, "inputs": str(where)})

    @staticmethod
    def _resumed_inputs(snap: Any, resume: ResumeFrom | None) -> Path | None:
        """A resume of a run whose snapshot is this one: that run's laid-out ``inputs``
        folder (still in its work folder), so that the config the checkpoint recorded names
        the same paths; None otherwise (the inputs changed: the training refuses to resume,
        naming the keys)."""
        if resume is None or not resume.snapshot:
            return None
        keys = ("dataset_version", "base_model_sha256", "config_sha256", "init_adapter_sha256")
        mine = snap.record()
        if any(resume.snapshot.get(k) != mine.get(k) for k in keys):
            return None
        inputs = Path(str(resume.snapshot.get("inputs") or Path(resume.work) / "inputs"))
        return inputs if inputs.is_dir() else None

    def _lay_out(self, store: Any, snap: Any, work: Path) -> tuple[dict[str, str],
                                                                 dict[str, str]]:
        """Lay ``snap`` out where the run reads it (the runner's files, read-only to the run's
        user; :meth:`_inputs_dest`); the laid-out paths and the base model's stat key and
        digest for the kernel."""
        from lora_kernel.trusted import objects

        with self.ctx.privileges.elevated():
            dest = self._inputs_dest(work)
            dest.mkdir(mode=0o755, exist_ok=False)
            os.chmod(dest, 0o755)
            laid = objects.lay_out(store, snap, dest)
            model_key = stat_key(laid["base_model"])
        return laid, {"key": model_key, "sha256": snap.base_model_sha256}

    def _inputs_dest(self, work: Path) -> Path:
        """Where a run's snapshot is laid out (as root in service mode): ``<work>/inputs`` in
        local mode and in a run account's private folder; in service mode without run
        accounts ``<state>-runs/<run_id>/inputs`` (root's; the run folder mode 0750, group the
        requester's), so that no root-owned files land in the requester's home, where they
        could not delete them."""
        ctx = self.ctx
        if ctx.isolation is not None or not ctx.run_as.switches:
            _make_run_folders(work, ctx.run_as)
            return work / "inputs"
        from lora_kernel.trusted.accounts import inputs_root

        root = inputs_root(self.state)
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(root, 0o711)
        top = root / work.name
        top.mkdir(mode=0o750)
        os.chown(top, 0, ctx.run_as.gid if ctx.run_as.gid is not None else 0)
        os.chmod(top, 0o750)
        return top / "inputs"

    def _replay_inputs(self, recorded: Mapping[str, Any], params: dict[str, Any],
                       work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """A replay of a run that trained on a snapshot: its objects re-hashed (a damaged
        store is refused), laid out in ``<work>/inputs``, the parameters pointed at them."""
        from lora_kernel.trusted import objects

        store = objects.ObjectStore.of(self.state)
        snap = objects.snapshot_of_record(store, recorded)
        objects.check_objects(store, snap)
        laid, _digest = self._lay_out(store, snap, work)
        overrides = dict(params.get("overrides") or {})
        overrides.update(_snapshot_paths(recorded.get("config") or {}, laid))
        return ({**params, "config_path": laid["config"], "overrides": overrides},
                {"read_from": "snapshot", **snap.record()})

    def _describe(self, run_id: str, notebook: Path, pinned: _Pinned, home: Path, work: Path,
                  hooks: RunHooks, run_ctx: RunContext, isolated: bool) -> RunDescription:
        """The run as ``.active/<run_id>.json`` announces it and :func:`seal_run` seals it."""
        ctx = self.ctx
        isolation = ({"account": run_ctx.run_as.name, "uid": run_ctx.run_as.uid,
                      "work": str(work)} if isolated else
                     {"account": None, "why": "local mode: the run ran as its requester"
                      if not ctx.privileges.active else "no run accounts (policies/runs.yaml):"
                      " the run ran as its requester"})
        return RunDescription(
            run_id=run_id, notebook=str(notebook), parameters=pinned.parameters,
            home=str(home), work=str(work), started=iso_time(),
            actor=RunActor(ctx.actor.name, ctx.actor.uid, ctx.actor.source),
            run_as=RunUser(run_ctx.run_as.uid, run_ctx.run_as.name), pinned=pinned.inputs,
            extra={**(_plain_json(hooks.extra) if hooks.extra else {}), "isolation": isolation,
                   **({"base_model_licence": pinned.licence} if pinned.licence else {}),
                   **({"snapshot": pinned.snapshot} if pinned.snapshot else {})})


def _plain_json(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our own copy of ``values`` as plain JSON; :class:`ConfigError` when it is not."""
    try:
        copy: dict[str, Any] = json.loads(json.dumps(dict(values or {})))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"notebook parameters must be plain JSON values: {exc}") from None
    return copy


def run_notebook(notebook: str | os.PathLike[str], parameters: Mapping[str, Any] | None = None,
                 *, home: str | os.PathLike[str] | None = None,
                 state: str | os.PathLike[str] | None = None, timeout: float | None = None,
                 ctx: RunContext | None = None, log: Callable[[str], None] | None = None,
                 hooks: RunHooks | None = None) -> RunRecord:
    """Execute ``notebook`` with papermill in the ``lora`` kernel and seal its run record.

    ``parameters`` are papermill parameters. A training notebook (one that declares
    ``config_path``) needs ``config_path``: the runner validates that config with
    ``overrides``, points ``output_dir`` at the run's work folder, injects ``result_path`` and
    pins the resolved config, base model, dataset files and seed before anything runs.
    ``timeout`` bounds the run (seconds); ``ctx`` says who the run is for (default: this
    process's user, local mode); ``hooks`` is what a resume or a replay changes
    (:class:`RunHooks`). Raises :class:`ConfigError`/:class:`UnsafeModelError` (nothing run,
    nothing recorded) for invalid input, :class:`RunFailed` (record written; ``.record`` is
    the failed :class:`RunRecord`) when the run does not succeed.
    """
    runner = Runner(home=home, state=state, timeout=timeout, ctx=ctx or RunContext.local(),
                    log=log or (lambda _msg: None))
    return runner.run(notebook, parameters, hooks)


def _then(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    """``first`` (if any), then ``second``, the second even when the first raises."""
    def both() -> None:
        try:
            if first is not None:
                first()
        finally:
            second()
    return both


# Appends stdin to a file of the requester's (made with its folder, mode 0700) as it comes.
_MIRROR_CODE = ("import os, sys\np = sys.argv[1]\nos.makedirs(os.path.dirname(p), 0o700, "
                "exist_ok=True)\nwith open(p, 'ab', buffering=0) as f:\n"
                "    for line in sys.stdin.buffer:\n        f.write(line)\n")


class _ProgressMirror:
    """An isolated run's progress records, copied into the requester's working home (where
    the studio reads them) by a child running as the requester: the runner never writes into
    a user's home itself."""

    def __init__(self, ctx: RunContext, home: Path, path: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = spawn([sys.executable, "-c", _MIRROR_CODE, str(path)],
                              run_as=ctx.run_as, privileges=ctx.privileges,
                              env=ctx.child_env(home), cwd=child_cwd(home, ctx.privileges),
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None  # no mirror: the run goes on, the studio shows no steps

    def write(self, chunk: bytes) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(chunk)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            self.proc = None

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.proc = None


def _snapshot_paths(config: Mapping[str, Any], laid: Mapping[str, str]) -> dict[str, str]:
    """The config keys that point a run at its laid-out snapshot: ``base_model``,
    ``train_data_dir`` (when the config has one) and ``metadata_path`` (inside the dataset
    folder where it was, else by its file name, as the dataset's keys say)."""
    out = {key: str(config[key]) for key in CONFIG_PATH_KEYS
           if config.get(key) and key != "output_dir"}  # resolved: the config file moves
    out["base_model"] = laid["base_model"]
    for key in ("init_adapter", "reg_data_dir", "validation_dir"):
        if key in laid:
            out[key] = laid[key]
    data = Path(laid["train_data_dir"])
    root = config.get("train_data_dir")
    if root:
        out["train_data_dir"] = str(data)
    meta = config.get("metadata_path")
    if meta:
        m = Path(str(meta))
        inside = bool(root) and m.is_relative_to(Path(str(root)))
        out["metadata_path"] = str(data / m.relative_to(Path(str(root)))) if inside \
            else str(data / m.name)
    return out


def _make_run_folders(work: Path, run_as: RunAs) -> None:
    """Make ``work`` and its missing parents, mode 0700, owned by the run's user (the
    executor, as that user, writes there; the runner makes them first when it lays the
    snapshot out inside)."""
    for folder in [p for p in (*reversed(work.parents), work) if not p.exists()]:
        folder.mkdir(mode=0o700, exist_ok=True)
        if run_as.switches and run_as.uid is not None:
            os.chown(folder, run_as.uid, run_as.gid if run_as.gid is not None else -1)


def _child_tar(ctx: RunContext, command: str, spec: dict[str, Any], home: Path,
               receive: Callable[[IO[bytes]], dict[str, tuple[str, int]]]
               ) -> dict[str, tuple[str, int]]:
    """Run an executor command that writes a tar on stdout and hand the stream to
    ``receive``; a failed child or a broken tar raises :class:`LoraError` with its stderr."""
    import tarfile

    proc = spawn([*executor_command(), command], run_as=ctx.run_as, privileges=ctx.privileges,
                 env=ctx.child_env(home), cwd=child_cwd(home, ctx.privileges),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    err: list[bytes] = []
    stderr = proc.stderr
    drain = threading.Thread(target=lambda: err.append(stderr.read()), daemon=True)
    drain.start()
    try:
        got = receive(proc.stdout)
    except (tarfile.TarError, OSError) as exc:
        proc.kill()
        proc.wait()
        drain.join(timeout=5)
        raise LoraError(f"the run's {command} step failed ({exc}): "
                        + b"".join(err).decode("utf-8", "replace")[-2000:]) from None
    finally:
        proc.stdout.close()
    rc = proc.wait()
    drain.join(timeout=5)
    if rc != 0:
        raise LoraError(f"the run's {command} step failed (exit {rc}): "
                        + b"".join(err).decode("utf-8", "replace")[-2000:])
    return got


def _child_json(ctx: RunContext, command: str, spec: dict[str, Any], home: Path
                ) -> dict[str, Any]:
    """Run an executor command that answers one JSON object; re-raise its typed errors."""
    proc = spawn([*executor_command(), command], run_as=ctx.run_as, privileges=ctx.privileges,
                 env=ctx.child_env(home), cwd=child_cwd(home, ctx.privileges),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(json.dumps(spec).encode())
    try:
        answer = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        raise LoraError(f"the run's {command} step crashed (exit {proc.returncode}): "
                        + err.decode("utf-8", "replace")[-2000:]) from None
    if not isinstance(answer, dict):
        raise LoraError(f"the run's {command} step answered no JSON object")
    if "error" in answer:
        raise error_from_answer(answer["error"])
    return answer


# How long a pre-started executor may take to stop its kernel and remove the work folder when
# the pin step refuses the run, before it is killed.
PRESTART_ABORT_S = 30.0


class _LateLog:
    """A child's stderr, read on a thread: kept in memory until :meth:`attach` names the file
    (the staging folder exists only once the pin step accepted the run), then written there."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._fh: IO[bytes] | None = None
        self._stream = stream
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self._stream is not None
        while True:
            chunk = self._stream.read1(4096) if hasattr(self._stream, "read1") \
                else self._stream.read(4096)
            if not chunk:
                break
            with self._lock:
                if self._fh is not None:
                    self._fh.write(chunk)
                    self._fh.flush()
                else:
                    self._buffer.append(chunk)

    def attach(self, path: Path) -> None:
        """Write what came so far, and from now on everything, to ``path``."""
        with self._lock:
            self._fh = open(path, "wb")  # noqa: SIM115 - closed by finish()
            self._fh.write(b"".join(self._buffer))
            self._fh.flush()
            self._buffer.clear()

    def finish(self) -> None:
        """Wait for the end of the stream (bounded), close the file."""
        self._thread.join(timeout=5)
        with self._lock:
            if self._fh is not None:
                self._fh.close()


class _Prestart:
    """The executor's ``run`` child of a run, pre-started (as the run's user, with the run's
    environment), started before the pin step so that papermill's import and the kernel's
    start overlap the hashing. It makes the work folder and starts the kernel there, then
    waits for its spec on stdin (:func:`_execute`); :meth:`abort` stops it when the run is
    refused."""

    def __init__(self, ctx: RunContext, run_id: str, home: Path, work: Path) -> None:
        self.ctx, self.run_id = ctx, run_id
        self.proc = spawn([*executor_command(), "run"], run_as=ctx.run_as,
                          privileges=ctx.privileges, env=ctx.child_env(home, run_id),
                          cwd=child_cwd(home, ctx.privileges), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.errlog = _LateLog(self.proc.stderr)
        setup = {"prestart": True, "work": str(work), "kernel_name": KERNEL_NAME,
                 "progress": ctx.progress is not None}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(setup) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once: _execute reports its exit code

    def abort(self, clean: bool = True) -> None:
        """The run is refused (nothing recorded): end of input tells the child to stop its
        kernel and remove the work folder it made (``clean``; bounded by
        :data:`PRESTART_ABORT_S`); then every process of the run still alive is killed."""
        try:
            if clean:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=PRESTART_ABORT_S)
        except (OSError, subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        finally:
            if self.proc.poll() is None:
                stop(self.proc, self.ctx.privileges)
            kill_run_processes(self.run_id, self.ctx.privileges)
            self.errlog.finish()


def _execute(ctx: RunContext, run: RunDescription, notebook_source: str, staging: Path,
             timeout: float | None, prestart: _Prestart,
             base_model_digest: dict[str, str] | None = None) -> tuple[int | None, str | None]:
    """Hand the run to its pre-started executor (its kernel running, :class:`_Prestart`) and
    wait for it; return ``(exit code, why it stopped)``.

    ``base_model_digest`` (the pin step's stat key and digest of the base model) goes with
    the spec; the executor writes it to a file in the work folder that the kernel's
    ``$LORA_BASE_MODEL_DIGEST_FILE`` names, so the training there does not hash the model
    again while its stat key is unchanged (:func:`lora_kernel.training.models.model_sha256`).

    Its stderr goes to ``executor.log`` in the staging folder (written by the runner), its
    stdout (progress) to ``ctx.progress``. Whatever ends the run, every process still carrying
    ``LORA_RUN_ID`` is killed before the record is built.
    """
    spec = {"notebook_source": notebook_source, "parameters": run.parameters,
            "work": run.work, "kernel_name": KERNEL_NAME,
            "progress": ctx.progress is not None, "base_model_digest": base_model_digest}
    reason = None
    proc = prestart.proc
    pump = _pump(proc.stdout, ctx.progress)
    deadline = time.monotonic() + timeout if timeout else None
    try:
        prestart.errlog.attach(staging / "executor.log")
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.close()
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                reason = f"timed out after {timeout:g}s"
                break
            why = ctx.cancelled()
            if why:
                reason = why if isinstance(why, str) else "cancelled: the requester went away"
                break
            try:
                proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        reason = "interrupted (SIGINT / SIGTERM / SIGHUP)"
    except BrokenPipeError:
        pass  # the executor died before reading its spec: its exit code says why
    finally:
        if proc.poll() is None:
            stop(proc, ctx.privileges)
        kill_run_processes(run.run_id, ctx.privileges)
        pump.join(timeout=5)
        prestart.errlog.finish()
    return proc.returncode, reason


def _pump(stream: IO[bytes] | None, sink: Callable[[bytes], None] | None) -> threading.Thread:
    """Forward a child's output to ``sink`` (or drop it) on a thread."""
    def loop() -> None:
        assert stream is not None
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            if sink is not None:
                try:
                    sink(chunk)
                except (OSError, ValueError):
                    pass  # a gone terminal or client must not stop the run
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


