"""Shared pytest fixtures for the LoRA Enclave test suite.

pytest only loads ``conftest.py`` files, so every shared fixture lives here; engineers
append their fixtures below with a line in this list.

Fixtures
--------
isolated_state (autouse)
    Every test gets its own ``LORA_STATE`` (a temp folder) so nothing writes the real one.
lora_home_tmp
    A fresh working home (``LORA_HOME`` set) in a temp folder for one test.
state_tmp
    A fresh state directory (``LORA_STATE`` set: runs/, ledger/, key) for one test.
actor (function)
    ``actor(name, groups=())`` -> :class:`lora_kernel.trusted.identity.Actor` for a user that
    need not exist on this machine (uid derived from the name); for review/publish unit tests.
lora_kernel_prefix (session)
    A temp prefix with the ``lora`` kernelspec installed by
    ``lora_kernel.kernel.kernelspec.install`` (``<prefix>/share/jupyter/kernels/lora``).
netns_available (session)
    True when running as root and ``unshare -n`` works (and ``LORA_TEST_NETNS`` is not "0"):
    network cases then run their kernel in a fresh network namespace (only a loopback
    inside), so even a bug sends no packet off the machine.
lora_kernel (function)
    Factory ``lora_kernel(env=None, policy=None, netns="auto")`` starting a *fresh* guarded
    kernel (``KernelManager(kernel_name="lora")``) and returning a ``KernelSession``:
    ``.run(code)`` -> dict(status, ename, evalue, stdout, stderr), ``.run_json(code)`` (the
    last stdout line parsed as JSON), ``.events()`` (the kernel's log events), ``.home``.
    ``policy`` is YAML text written as ``egress.yaml`` into a temp ``LORA_POLICIES`` folder.
    Kernels are shut down after the test. Audit hooks cannot be removed, so tests never
    share a kernel process.
make_run (function)
    Factory: ``make_run(run_id, user="alice", dataset="ds-a", base_model="tiny", started=None,
    ledger=True)`` seals a structurally real run record (real .safetensors adapter, nbformat
    notebook, events.jsonl, tb/, manifest) under ``state_tmp/runs`` and appends its ledger
    entry; returns the record path. Inputs (dataset, base model) live beside it in ``inputs/``;
    ``status``, ``uid`` and ``kind`` (the manifest's ``extra.kind``; default none, which
    counts as training) are recorded as given; ``snapshots=(3, 6)`` adds adapters saved
    mid-run at those steps (``snapshots/`` and its index, epochs 1, 2, ...).
    (records/ledger/review/audit tests.)
lora (function)
    ``lora(*argv) -> (exit code, stdout + stderr)``: runs ``lora ...`` in process through
    :func:`lora_kernel.cli.main.main` with only ``lora_kernel.cli.audit`` registered.
repo_accessible (session)
    Root only: makes the checkout and its ``.venv`` traversable by other users (adds o+x to
    the folders above it) so per-user runs can execute the shared Python; returns the repo.
system_users (session)
    Root only: creates the session's service account and users ``alice``, ``bob`` (both in
    ``lora-reviewers``) and ``carol``, named with the session's prefix
    (:func:`sysusers.user_name`: ``lt1a2b-alice``), with exactly those groups and 0700 homes;
    returns a dict short name -> pwd entry. Skips when not root.
_remove_session_users (session, autouse)
    Root only: removes the users and groups the session made (``sysusers.cleanup``).
demo_home (session)
    A home folder (``Path``) with ``demo/`` built once per session by
    ``lora_kernel.training.demo_assets.build_demo_assets`` (tiny SD folder + single file, tiny
    Llama, image and text datasets, ``demo/image_lora.yaml`` and ``demo/text_lora.yaml``). Treat it
    as read-only: write outputs elsewhere. Its tiny SD, tiny SDXL, tiny Llama and tiny chat
    model are pre-trained (``demo_pretrain``, ``demo_sdxl_pretrain``, ``demo_text_pretrain``;
    cached by content in
    ``$LORA_PRETRAIN_CACHE`` or ``~/.cache/lora-enclave/pretrain``, so a fresh machine pays
    the pre-training once).
demo_subset (session)
    Factory ``demo_subset(n)``: config overrides (``train_data_dir``, ``metadata_path``) for
    the first ``n`` demo images, copied once per session (fast habit tests).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory, monkeypatch):
    """A private ``LORA_STATE`` for every test (never the real state directory)."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("LORA_STATE", str(state))
    monkeypatch.delenv("LORA_RUNNER", raising=False)
    return state


@pytest.fixture
def lora_home_tmp(tmp_path, monkeypatch):
    """A fresh ``LORA_HOME`` for one test."""
    home = tmp_path / "lora_home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    return home


@pytest.fixture
def state_tmp(tmp_path, monkeypatch):
    """A fresh ``LORA_STATE`` (runs/, ledger/) for one test."""
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("LORA_STATE", str(state))
    return state


@pytest.fixture
def actor():
    """Factory of :class:`~lora_kernel.trusted.identity.Actor` for review/publish tests."""
    import zlib

    from lora_kernel.trusted.identity import Actor

    def make(name, groups=()):
        uid = 50000 + zlib.crc32(name.encode()) % 10000
        return Actor(name, uid, uid, tuple(groups), "test")
    return make


@pytest.fixture(scope="session")
def lora_kernel_prefix(tmp_path_factory):
    """A prefix with the ``lora`` kernelspec installed into it."""
    from lora_kernel.kernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kprefix")
    install(prefix=str(prefix))
    return prefix


@pytest.fixture(scope="session")
def netns_available():
    """Whether kernels can be started in a fresh network namespace (root + unshare -n).

    ``LORA_TEST_NETNS=0`` turns it off (to exercise the non-root path, e.g. with the whole
    pytest run already inside ``unshare -n``)."""
    if os.environ.get("LORA_TEST_NETNS") == "0":
        return False
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def _netns_prefix(lora_kernel_prefix, tmp_path_factory):
    """The ``lora`` spec again, argv wrapped in ``unshare -n`` (loopback brought up first)."""
    src = lora_kernel_prefix / "share/jupyter/kernels/lora"
    prefix = tmp_path_factory.mktemp("kprefix_netns")
    dst = prefix / "share/jupyter/kernels/lora"
    shutil.copytree(src, dst)
    spec = json.loads((dst / "kernel.json").read_text())
    spec["argv"] = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                    *spec["argv"]]
    (dst / "kernel.json").write_text(json.dumps(spec, indent=1))
    return prefix


class KernelSession:
    """A started guarded kernel and its client."""

    def __init__(self, km, kc, home: Path, netns: bool):
        self.km, self.kc, self.home, self.netns = km, kc, home, netns

    def run(self, code: str, timeout: float = 60) -> dict:
        """Execute ``code``; return status, ename, evalue, stdout, stderr."""
        out = {"stdout": "", "stderr": ""}

        def hook(msg):
            if msg["msg_type"] == "stream":
                out[msg["content"]["name"]] += msg["content"]["text"]

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        content = reply["content"]
        return {"status": content["status"], "ename": content.get("ename"),
                "evalue": content.get("evalue"), **out}

    def run_json(self, code: str, timeout: float = 60):
        """Execute ``code`` that prints JSON as its last line; return it parsed."""
        result = self.run(code, timeout)
        assert result["status"] == "ok", result
        return json.loads(result["stdout"].strip().splitlines()[-1])

    def events(self, **kw) -> list[dict]:
        """This home's kernel events (``lora_kernel.kernel.execlog.read_events``)."""
        from lora_kernel.kernel.execlog import read_events

        return read_events(self.home, **kw)

    def shutdown(self):
        """Stop the client and the kernel (gracefully, so the log is closed)."""
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


@pytest.fixture
def lora_kernel(lora_kernel_prefix, _netns_prefix, netns_available, tmp_path):
    """Factory starting fresh guarded kernels; see the module docstring."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    sessions = []
    short_dirs = []

    def start(env: dict | None = None, policy: str | None = None, netns="auto"):
        use_netns = netns_available if netns == "auto" else bool(netns)
        if use_netns and not netns_available:
            pytest.skip("needs root and unshare -n")
        n = len(sessions)
        home = tmp_path / f"home{n}"
        home.mkdir()
        kenv = dict(os.environ)
        kenv.update({"LORA_HOME": str(home), "PYTHONUNBUFFERED": "1"})
        if policy is not None:
            pdir = tmp_path / f"policies{n}"
            pdir.mkdir()
            (pdir / "egress.yaml").write_text(policy)
            kenv["LORA_POLICIES"] = str(pdir)
        kenv.update(env or {})
        prefix = _netns_prefix if use_netns else lora_kernel_prefix
        ksm = KernelSpecManager(kernel_dirs=[str(prefix / "share/jupyter/kernels")])
        short = tempfile.mkdtemp(prefix="lk")  # unix socket paths must stay short
        short_dirs.append(short)
        kw = {}
        if use_netns:  # ZMQ over unix sockets: they cross the namespace boundary
            kw = {"transport": "ipc", "ip": os.path.join(short, "k")}
        kernel_id = str(uuid.uuid4())  # named like jupyter_server's kernels: kernel-<id>.json
        conn = os.path.join(short, f"kernel-{kernel_id}.json")
        km = KernelManager(kernel_name="lora", kernel_spec_manager=ksm, connection_file=conn, **kw)
        km.start_kernel(env=kenv, cwd=str(tmp_path), kernel_id=kernel_id)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
        except RuntimeError:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        session = KernelSession(km, kc, home, use_netns)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.shutdown()
    for short in short_dirs:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def make_run(state_tmp):
    """Factory sealing a synthetic but structurally real run record; see the module docstring."""
    import datetime as dt

    import nbformat
    import torch
    from safetensors.torch import save_file

    from lora_kernel.common.digests import path_sha256, sha256_file
    from lora_kernel.trusted.ledger import Ledger
    from lora_kernel.trusted.sealing import (
        build_manifest,
        make_staging_dir,
        seal_record,
        write_manifest,
    )

    inputs = state_tmp.parent / "inputs"

    def make(run_id, user="alice", dataset="ds-a", base_model="tiny", started=None,
             ledger=True, seed=42, status="succeeded", uid=None, kind=None, snapshots=()):
        ddir = inputs / dataset
        if not ddir.exists():
            ddir.mkdir(parents=True)
            (ddir / "metadata.csv").write_text(f"file_name,text\na.png,{dataset}\n")
            (ddir / "a.png").write_bytes(dataset.encode() * 7)
        digests = {p.name: sha256_file(p) for p in sorted(ddir.iterdir())}
        model = inputs / "models" / base_model / "model.safetensors"
        if not model.exists():
            model.parent.mkdir(parents=True)
            save_file({"w": torch.arange(4, dtype=torch.float32)}, str(model),
                      metadata={"name": base_model})
        staging = make_staging_dir(state_tmp / "runs", run_id)
        (staging / "adapter").mkdir()
        save_file({"lora_A": torch.full((2, 4), float(seed)), "lora_B": torch.zeros(4, 2)},
                  str(staging / "adapter" / "lora.safetensors"))
        if snapshots:  # adapters saved mid-run at these steps (snapshots/, epoch i + 1)
            import json
            (staging / "snapshots").mkdir()
            entries = []
            for i, step in enumerate(snapshots):
                name = f"lora-e{i + 1:04d}.safetensors"
                save_file({"lora_A": torch.full((2, 4), float(step))},
                          str(staging / "snapshots" / name))
                entries.append({"step": step, "epoch": i + 1, "by": "epoch", "files": {
                    "diffusers": {"name": name,
                                  "sha256": sha256_file(staging / "snapshots" / name)}}})
            (staging / "snapshots" / "snapshots.json").write_text(
                json.dumps({"snapshots": entries}))
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("lr = 1e-4", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell("print('train')", outputs=[
                        nbformat.v4.new_output("stream", name="stdout", text="train\n")]),
                    nbformat.v4.new_markdown_cell("# done")]
        nbformat.write(nb, str(staging / "executed.ipynb"))
        (staging / "events.jsonl").write_text('{"event": "cell", "n": 1}\n')
        (staging / "tb").mkdir()
        (staging / "tb" / "events.out.tfevents.1").write_bytes(b"tb-bytes")
        t0 = started or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        manifest = build_manifest(
            staging, run_id=run_id, user=user, uid=uid, host="testhost", started=t0,
            ended=t0 + dt.timedelta(minutes=2), status=status,
            config={"base_model": str(model), "train_data_dir": str(ddir),
                    "lora_rank": 4, "seed": seed},
            base_model_sha256=path_sha256(model), dataset_version=dataset,
            dataset_digests=digests, notebook_source_sha256="ab" * 32, seed=seed,
            egress_refusals=0, **({"extra": {"kind": kind}} if kind else {}))
        write_manifest(staging, manifest)
        record = seal_record(staging, state_tmp / "runs", run_id)
        if ledger:
            with Ledger(state=state_tmp) as led:
                led.append_run(record)
        return record

    return make


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """The demo assets, built once per test session (see the module docstring)."""
    from lora_kernel.training.demo_assets import build_demo_assets
    home = tmp_path_factory.mktemp("demo_home")
    build_demo_assets(home)
    return home


@pytest.fixture(scope="session")
def demo_subset(demo_home, tmp_path_factory):
    """Factory ``demo_subset(n) -> {"train_data_dir": ..., "metadata_path": ...}``: config
    overrides training on the first ``n`` images of the demo dataset (copied once per session
    per ``n``), for habit tests whose assertions do not need all 24 (fewer batches per epoch
    and per evaluation pass)."""
    import csv

    made: dict[int, dict[str, str]] = {}

    def subset(n: int) -> dict[str, str]:
        if n not in made:
            src = demo_home / "demo" / "datasets" / "image"
            with open(src / "metadata.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))[:n]
            data = tmp_path_factory.mktemp(f"demo_subset{n}")
            with open(data / "metadata.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                for row in rows:
                    shutil.copy(src / row["file_name"], data / row["file_name"])
                    writer.writerow(row)
            made[n] = {"train_data_dir": str(data), "metadata_path": str(data / "metadata.csv")}
        return dict(made[n])

    return subset


@pytest.fixture
def lora(monkeypatch, capsys):
    """Run ``lora ...`` via :func:`lora_kernel.cli.main.main` with cli_audit registered;
    returns ``(exit code, stdout + stderr)``."""
    from lora_kernel.cli import main as cli
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["lora_kernel.cli.audit"])

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out + out.err
    return run


# -- service mode (root): real system users, the runner service ----------------------------
# short name -> groups; the system names carry the session's prefix (tests/sysusers.py)
SERVICE_USERS = {"svc": (), "alice": ("lora-reviewers",), "bob": ("lora-reviewers",),
                 "carol": ()}


@pytest.fixture(scope="session", autouse=True)
def _remove_session_users():
    """At the end of the session, remove the system users and groups it made (root only)."""
    yield
    if os.geteuid() == 0:
        import sysusers

        sysusers.cleanup()


@pytest.fixture(scope="session")
def repo_accessible():
    """Root only: the checkout and its ``.venv`` must be executable by the per-user processes
    the runner starts; add the traverse bit (o+x, nothing else) to the folders above it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (system users)")
    repo = Path(__file__).resolve().parents[1]
    for folder in [repo, *repo.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            os.chmod(folder, mode | 0o001)
    return repo


@pytest.fixture(scope="session")
def system_users(repo_accessible):
    """Root only: the session's service account and test users, made fresh with exactly their
    groups (``tests/sysusers.py``); a dict short name -> pwd entry."""
    import sysusers

    return {short: sysusers.ensure_user(sysusers.user_name(short), list(groups),
                                        system=short == "svc")
            for short, groups in SERVICE_USERS.items()}
