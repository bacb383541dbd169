"""Service mode as root, with real system users: the runner service runs each kernel as the
requesting user and writes records, ledger and key as the service account; identity comes from
the socket (SO_PEERCRED), never from the caller's environment.

Users (made fresh for the session, tests/sysusers.py): the service account SVC, ALICE and
BOB (reviewers), CAROL.
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat
import pytest
import yaml
from nbtools import write_notebook as write_lora_notebook
from sysusers import user_name

pytestmark = [pytest.mark.root, pytest.mark.slow]
SVC, ALICE, BOB, CAROL = (user_name(s) for s in ("svc", "alice", "bob", "carol"))

FAST_IMAGE = {"max_train_steps": 2, "sample_steps": 1, "save_steps": 0,
              "sample_prompts": ["a red circle in enclave style"]}


@pytest.fixture(scope="module")
def service(system_users, tmp_path_factory):
    """``lora runner serve`` as root on a socket in a folder every user can reach; yields
    ``(socket, state)``."""
    base = Path(tempfile.mkdtemp(prefix="lora-svc-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    state, sock = base / "state", base / "run" / "runner.sock"
    pub = base / "pub"  # a publication store the service account may write
    pub.mkdir()
    os.chown(pub, pwd.getpwnam(SVC).pw_uid, pwd.getpwnam(SVC).pw_gid)
    with _runner_service(base, state, sock):
        yield sock, state


@contextlib.contextmanager
def _runner_service(base: Path, state: Path, sock: Path, **extra_env: str):
    """``lora runner serve`` as root (service account SVC) until the block ends; ``base`` (its
    log, state and socket) is removed after."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_STATE", "JUPYTER_PATH")}
    env.update(extra_env)
    log = open(base / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lora_kernel.cli", "runner", "serve",
                             "--state", str(state), "--service-user", SVC,
                             "--socket", str(sock)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (base / "service.log").read_text()
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def user_home(name: str, demo_home: Path | None = None) -> Path:
    """A fresh working home owned by ``name`` (with a copy of the demo assets if given)."""
    pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir) / f"lh-{uuid.uuid4().hex[:8]}"
    if demo_home is not None:
        shutil.copytree(demo_home / "demo", home / "demo",
                        ignore=shutil.ignore_patterns("output"))
    home.mkdir(exist_ok=True)
    for dirpath, dirs, files in os.walk(home):
        for n in [dirpath, *[os.path.join(dirpath, x) for x in dirs + files]]:
            os.chown(n, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o700)
    return home


def as_user(name: str, *args, env: dict | None = None, timeout: float = 300, wait=True):
    """Run ``lora ARGS`` as the system user ``name`` (uid, gid, groups from the OS)."""
    pw = pwd.getpwnam(name)
    cmd = [sys.executable, "-m", "lora_kernel.cli", *map(str, args)]
    environ = {"PATH": os.environ["PATH"], "HOME": pw.pw_dir, "USER": name, "LOGNAME": name,
               **(env or {})}
    kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=os.getgrouplist(name, pw.pw_gid),
              env=environ, cwd=pw.pw_dir)
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def write_notebook(path: Path, owner: str, *cells: str) -> Path:
    """:func:`nbtools.write_notebook`, owned by ``owner``."""
    write_lora_notebook(path, *cells)
    pw = pwd.getpwnam(owner)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def record_of(res) -> str:
    match = re.search(r"^run (\S+) (succeeded|failed)", res.stdout, re.M) or \
        re.search(r"run (\S+) failed", res.stderr)
    assert match, res.stdout + res.stderr
    return match.group(1)


def test_a_run_trains_as_the_user_and_is_sealed_by_the_service_account(service, demo_home):
    sock, state = service
    home = user_home(ALICE, demo_home)
    args = ["run", "--config", home / "demo" / "image_lora.yaml", "--home", home,
            "--runner", sock]
    for key, value in FAST_IMAGE.items():
        args += ["-p", key, json.dumps(value)]
    # the caller's environment claims to be bob; the socket says who it is
    res = as_user(ALICE, *args, env={"LORA_USER": BOB, "JUPYTERHUB_USER": BOB})
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = record_of(res)
    record = state / "runs" / run_id
    svc = pwd.getpwnam(SVC)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and state.stat().st_uid == svc.pw_uid
    for path in [record, *record.rglob("*")]:
        assert path.stat().st_uid == svc.pw_uid, path
    assert stat.S_IMODE((record / "manifest.json").stat().st_mode) == 0o444
    key = state / "ledger" / "signing_key.pem"
    assert key.stat().st_uid == svc.pw_uid and stat.S_IMODE(key.stat().st_mode) == 0o600
    manifest = json.loads((record / "manifest.json").read_text())
    meta = manifest["predicate"]["runDetails"]["metadata"]
    alice = pwd.getpwnam(ALICE)
    assert meta["user"] == ALICE and meta["uid"] == alice.pw_uid
    assert meta["extra"]["identity"] == "peercred" and meta["status"] == "succeeded"
    assert (record / "adapter" / "enclave_style.safetensors").is_file()
    events = [json.loads(x) for x in (record / "events.jsonl").read_text().splitlines()]
    assert events and all(e["user"] == ALICE for e in events)
    # the run read its snapshot, laid out by the runner outside alice's home (nothing in her
    # home is root's, so she can always delete it), and removed once sealed
    snap = meta["extra"]["snapshot"]
    assert snap["read_from"] == "snapshot"
    assert Path(snap["inputs"]).parent == state.parent / "state-runs" / run_id
    assert not Path(snap["inputs"]).parent.exists()
    assert all(p.stat().st_uid == alice.pw_uid for p in [home, *home.rglob("*")])
    # the auditor (here root) verifies the service's state
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "verify", run_id,
                          "--state", state], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"owned by {SVC}" in res.stdout


def test_user_code_cannot_touch_the_key_the_ledger_or_a_sealed_record(service, demo_home):
    sock, state = service
    home = user_home(ALICE, demo_home)
    sealed = next(p for p in (state / "runs").iterdir() if not p.name.startswith(".")) \
        if (state / "runs").is_dir() and any(not p.name.startswith(".")
                                             for p in (state / "runs").iterdir()) else None
    probe = f'''
import json, os, sqlite3
def attempt(fn):
    try:
        fn()
        return "allowed"
    except Exception as exc:
        return type(exc).__name__
state = {str(state)!r}
out = {{
  "read_key": attempt(lambda: open(state + "/ledger/signing_key.pem", "rb").read()),
  "open_ledger": attempt(lambda: sqlite3.connect(state + "/ledger/ledger.sqlite").execute(
      "SELECT count(*) FROM entries").fetchone()),
  "list_runs": attempt(lambda: os.listdir(state + "/runs")),
  "write_record": attempt(lambda: open({str(sealed) + "/x.txt" if sealed else str(state) + "/x"!r},
                                       "w").write("x")),
  "own_data": attempt(lambda: open(
      {str(home / "demo" / "datasets" / "image" / "metadata.csv")!r}).read()),
  "uid": os.getuid(),
  "state_in_env": any(state in v for v in os.environ.values()),
}}
print(json.dumps(out))
'''
    nb = write_notebook(home / "probe.ipynb", ALICE, "x = 1", probe)
    res = as_user(ALICE, "run", nb, "--home", home, "--runner", sock)
    assert res.returncode == 0, res.stdout + res.stderr
    executed = nbformat.read(str(state / "runs" / record_of(res) / "executed.ipynb"),
                             as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    out = json.loads(text.strip().splitlines()[-1])
    assert out["uid"] == pwd.getpwnam(ALICE).pw_uid
    assert out["read_key"] == "PermissionError"
    assert out["open_ledger"] in ("OperationalError", "PermissionError")
    assert out["list_runs"] == "PermissionError"
    assert out["write_record"] == "PermissionError"
    assert out["own_data"] == "allowed"  # the must-work twin: the user's own data
    assert out["state_in_env"] is False


def test_a_run_cannot_read_another_users_data(service, demo_home):
    sock, _state = service
    bob_home = user_home(BOB, demo_home)  # 0700, owned by bob
    alice_home = user_home(ALICE)
    cfg = yaml.safe_load((bob_home / "demo" / "image_lora.yaml").read_text())
    cfg.update({"train_data_dir": str(bob_home / "demo" / "datasets" / "image"),
                "base_model": str(bob_home / "demo" / "models" / "tiny-sd"),
                "output_dir": "out", **FAST_IMAGE})
    cfg.pop("metadata_path", None)
    (alice_home / "steal.yaml").write_text(yaml.safe_dump(cfg))
    os.chown(alice_home / "steal.yaml", *[pwd.getpwnam(ALICE)[i] for i in (2, 3)])
    res = as_user(ALICE, "run", "--config", alice_home / "steal.yaml", "--home",
                  alice_home, "--runner", sock)
    assert res.returncode == 2, res.stdout + res.stderr
    assert str(bob_home) in res.stderr and "Traceback" not in res.stderr
    # the must-work twin: bob trains on his own data through the same service
    res = as_user(BOB, "run", "--config", bob_home / "demo" / "image_lora.yaml",
                  "--home", bob_home, "--runner", sock,
                  *[x for k, v in FAST_IMAGE.items() for x in ("-p", k, json.dumps(v))])
    assert res.returncode == 0, res.stdout + res.stderr


def test_review_identity_comes_from_the_socket(service, demo_home):
    sock, state = service
    home = user_home(ALICE, demo_home)
    res = as_user(ALICE, "run", "--config", home / "demo" / "image_lora.yaml",
                  "--home", home, "--runner", sock,
                  *[x for k, v in FAST_IMAGE.items() for x in ("-p", k, json.dumps(v))])
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = record_of(res)
    spoof = {"LORA_USER": BOB, "USER": BOB, "LOGNAME": BOB,
             "JUPYTERHUB_USER": BOB}
    res = as_user(ALICE, "review", "approve", run_id, "--note", "mine",
                  "--runner", sock, env=spoof)
    assert res.returncode == 6 and "self-approval" in res.stderr, res.stderr
    res = as_user(CAROL, "review", "approve", run_id, "--note", "ok", "--runner", sock)
    assert res.returncode == 6 and "reviewers group" in res.stderr, res.stderr
    res = as_user(BOB, "review", "approve", run_id, "--note", "checked", "--runner", sock)
    assert res.returncode == 0 and f"approved {run_id} by {BOB}" in res.stdout, res.stderr
    # publish and withdraw through the service: who acts is the socket's peer again
    pub = state.parent / "pub"
    res = as_user(BOB, "publish", run_id, "--to", pub, "--runner", sock)
    assert res.returncode == 0 and (pub / run_id / "publication.json").is_file(), res.stderr
    res = as_user(CAROL, "publish", "--withdraw", run_id, "--note", "no", "--runner",
                  sock, env=spoof)
    assert res.returncode == 6, res.stdout + res.stderr
    res = as_user(BOB, "publish", "--withdraw", run_id, "--note", "superseded",
                  "--runner", sock)
    assert res.returncode == 0 and not (pub / run_id).exists(), res.stdout + res.stderr


def test_a_requester_that_dies_ends_its_run_which_is_sealed_as_failed(service):
    import psutil

    sock, state = service
    home = user_home(ALICE)
    nb = write_notebook(home / "sleep.ipynb", ALICE, "seconds = 600",
                        "print('started', flush=True)", "import time; time.sleep(seconds)")
    before = {p.name for p in (state / "runs").iterdir()}
    client = as_user(ALICE, "run", nb, "--home", home, "--runner", sock, wait=False)
    try:
        deadline = time.monotonic() + 120
        kernel = None
        while kernel is None and time.monotonic() < deadline:
            for p in psutil.process_iter(["cmdline", "uids"]):
                try:
                    if p.info["uids"].real == pwd.getpwnam(ALICE).pw_uid and \
                            p.environ().get("LORA_HOME") == str(home) and \
                            "-f" in p.info["cmdline"]:
                        kernel = p
                except (psutil.AccessDenied, psutil.NoSuchProcess):
                    continue
            time.sleep(0.3)
        assert kernel is not None, "the kernel did not start"
        assert kernel.uids().real == pwd.getpwnam(ALICE).pw_uid
        time.sleep(2)
        client.kill()
        client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    deadline = time.monotonic() + 60
    new = set()
    while not new and time.monotonic() < deadline:
        new = {p.name for p in (state / "runs").iterdir()} - before - {".staging", ".active"}
        time.sleep(0.5)
    assert len(new) == 1, new
    assert not psutil.pid_exists(kernel.pid) or kernel.status() == psutil.STATUS_ZOMBIE
    meta = json.loads((state / "runs" / new.pop() / "manifest.json").read_text())[
        "predicate"]["runDetails"]["metadata"]
    assert meta["status"] == "failed" and "requester went away" in meta["extra"]["error"]


def test_a_trainer_sees_their_own_runs_through_the_service(service, demo_home):
    """A trainer cannot read the state directory; `lora audit list/show` used to end in a
    PermissionError traceback. Through the runner socket they see their own runs (status,
    losses, files) and are refused another's (exit 6); a reviewer sees every run."""
    sock, state = service
    runs = {}
    for who in (ALICE, CAROL):
        home = user_home(who)
        nb = write_notebook(home / "hello.ipynb", who, "x = 1", "print('hi', x)")
        res = as_user(who, "run", nb, "--home", home, "--runner", sock)
        assert res.returncode == 0, res.stdout + res.stderr
        runs[who] = record_of(res)
    # carol trains and reviews nothing (alice and bob are reviewers in these tests)
    res = as_user(CAROL, "audit", "list", "--runner", sock)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert runs[CAROL] in res.stdout and runs[ALICE] not in res.stdout, res.stdout
    res = as_user(CAROL, "audit", "show", runs[CAROL], "--runner", sock)
    assert res.returncode == 0 and "succeeded" in res.stdout, res.stdout + res.stderr
    res = as_user(CAROL, "audit", "show", runs[ALICE], "--runner", sock)
    assert res.returncode == 6 and "not yours" in res.stderr, res.stdout + res.stderr
    res = as_user(BOB, "audit", "list", "--runner", sock)  # bob reviews: sees both
    assert res.returncode == 0 and runs[ALICE] in res.stdout and runs[CAROL] in res.stdout, \
        res.stdout + res.stderr
    # the snapshot store's dataset versions: a reviewer sees every one (alice's training run
    # above pinned the demo dataset); carol, whose runs pinned none, sees none and is refused
    res = as_user(BOB, "data", "versions", "--runner", sock, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    versions = json.loads(res.stdout)
    assert versions and all(v["id"].startswith("ds-") for v in versions)
    res = as_user(CAROL, "data", "versions", "--runner", sock, "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stdout + res.stderr
    res = as_user(CAROL, "data", "show", versions[0]["id"], "--runner", sock)
    assert res.returncode == 6 and "no run of yours" in res.stderr, res.stdout + res.stderr


# -- run accounts (issue 20): the requester cannot touch the run ---------------------------
@pytest.fixture(scope="module")
def isolated_service(system_users, tmp_path_factory):
    """``lora runner serve`` with ``policies/runs.yaml`` ``isolation: accounts``: a pool of
    two run accounts (primary group ``<prefix>runs``) the requesters do not control; yields
    ``(socket, state, run account names, work_root)``."""
    import sysusers

    from hub.demo import ensure_run_accounts

    group = sysusers.user_name("runs")
    made = ensure_run_accounts(group, 2, sysusers.user_name("run"))
    sysusers._made_users.extend(made)
    sysusers._made_groups.append(group)
    base = Path(tempfile.mkdtemp(prefix="lora-iso-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    state, sock, work_root = base / "state", base / "run" / "runner.sock", base / "runs-work"
    policies = base / "policies"
    shutil.copytree(Path(__file__).resolve().parents[2] / "policies", policies)
    (policies / "runs.yaml").write_text(yaml.safe_dump(
        {"isolation": "accounts", "run_group": group, "work_root": str(work_root)}))
    os.chmod(policies, 0o755)
    names = [sysusers.user_name(f"run{n}") for n in range(2)]
    with _runner_service(base, state, sock, LORA_POLICIES=str(policies)):
        yield sock, state, names, work_root


def _carols_image_run(sock: Path, home: Path, **params) -> subprocess.Popen:
    """CAROL's ``lora run`` of the demo image config through the runner at ``sock``, with
    ``params`` (and one sample prompt at one step), started in the background."""
    args = ["run", "--config", home / "demo" / "image_lora.yaml", "--home", home,
            "--runner", sock, "-p", "sample_steps", "1", "-p", "sample_prompts",
            '["a red circle"]']
    for key, value in params.items():
        args += ["-p", key, json.dumps(value)]
    return as_user(CAROL, *args, wait=False)


ATTACK = """
import json, os, signal, sys
pids, work = json.loads(sys.argv[1]), sys.argv[2]
out = {}
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
        out[str(pid)] = "signalled"
    except PermissionError:
        out[str(pid)] = "EPERM"
for what in ("output/adapter.safetensors", "inputs/dataset/planted.png", "x"):
    try:
        open(os.path.join(work, what), "wb").write(b"forged")
        out[what] = "written"
    except OSError as exc:
        out[what] = type(exc).__name__
try:
    os.listdir(work)
    out["list"] = "listed"
except OSError as exc:
    out["list"] = type(exc).__name__
print(json.dumps(out))
"""


def test_a_recorded_run_runs_as_a_run_account_the_requester_cannot_touch(isolated_service,
                                                                        demo_home):
    """With run accounts, a training run's kernel runs as a leased run account in a private
    work folder: a process of the requester (same uid as the trainer) can neither signal the
    kernel nor write into the work folder (output, laid-out inputs), so the run trains on
    exactly its snapshot and succeeds; the record names the account. Without isolation the
    trainer's own processes can signal their kernel (the run then seals failed:
    test_a_requester_that_dies_ends_its_run_which_is_sealed_as_failed)."""
    import psutil

    sock, state, names, work_root = isolated_service
    pool = {pwd.getpwnam(n).pw_uid for n in names}
    home = user_home(CAROL, demo_home)
    client = _carols_image_run(sock, home, max_train_steps=6, save_steps=0)
    try:
        deadline = time.monotonic() + 180
        kernels = []
        while not kernels and time.monotonic() < deadline and client.poll() is None:
            kernels = [p for p in psutil.process_iter(["cmdline", "uids"])
                       if p.info["uids"] is not None and p.info["uids"].real in pool
                       and "-f" in (p.info["cmdline"] or [])]
            time.sleep(0.2)
        assert kernels, "no kernel ran as a run account"
        work = next(w for w in work_root.iterdir() if w.is_dir())
        pw = pwd.getpwnam(CAROL)
        attack = subprocess.run(
            [sys.executable, "-c", ATTACK, json.dumps([k.pid for k in kernels]), str(work)],
            capture_output=True, text=True, timeout=60, user=pw.pw_uid, group=pw.pw_gid,
            extra_groups=os.getgrouplist(CAROL, pw.pw_gid), cwd="/")
        assert attack.returncode == 0, attack.stderr
        seen = json.loads(attack.stdout)
        assert all(seen[str(k.pid)] == "EPERM" for k in kernels), seen
        assert seen["x"] == "PermissionError" and seen["list"] == "PermissionError", seen
        out, err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, out + err
    run_id = re.search(r"^run (\S+) succeeded", out, re.M).group(1)
    meta = json.loads((state / "runs" / run_id / "manifest.json").read_text())[
        "predicate"]["runDetails"]["metadata"]
    iso = meta["extra"]["isolation"]
    assert iso["account"] in names and iso["uid"] in pool
    assert meta["extra"]["snapshot"]["read_from"] == "snapshot"
    assert not (work_root / run_id).exists()  # removed after sealing
    # the trainer sees the dataset version her run was pinned on, through the service
    res = as_user(CAROL, "data", "show", meta["extra"]["snapshot"]["dataset_version"],
                  "--runner", sock)
    assert res.returncode == 0 and run_id in res.stdout, res.stdout + res.stderr
    # the progress the studio reads, mirrored into the requester's home by a child as them
    mirrored = home / "work" / run_id / "progress.jsonl"
    assert mirrored.stat().st_uid == pwd.getpwnam(CAROL).pw_uid
    steps = [json.loads(line) for line in mirrored.read_text().splitlines()]
    assert any(r.get("event") == "step" for r in steps), steps[:5]
    assert os.stat(work_root).st_mode & 0o777 == 0o711


def test_an_interrupted_isolated_run_resumes_under_another_lease(isolated_service, demo_home):
    """A run under a run account stopped after a checkpoint (its requester went away) is
    sealed failed and its private folder kept, made root's so that the next run leasing that
    account cannot change the checkpoints; `lora run --resume RUN` lends it to the resuming
    run's account, continues from the latest checkpoint at the same input paths, and takes it
    back when it ends."""
    sock, state, names, work_root = isolated_service
    home = user_home(CAROL, demo_home)
    client = _carols_image_run(sock, home, max_train_steps=30, save_steps=2)
    try:
        deadline = time.monotonic() + 240
        while not list(work_root.glob("*/output/checkpoints/checkpoint-2")):
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        client.kill()  # the requester goes away: the run is cancelled and sealed failed
        client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    old = next(w for w in work_root.iterdir() if (w / "output").is_dir())
    deadline = time.monotonic() + 60  # sealed, then its folder made root's
    while not (state / "runs" / old.name / "manifest.json").exists() or \
            old.stat().st_uid != 0:
        assert time.monotonic() < deadline, "the cancelled run was not sealed and secured"
        time.sleep(0.3)
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert all(p.stat().st_uid == 0 for p in (old / "output").rglob("*"))
    res = as_user(CAROL, "run", "--resume", old.name, "--home", home, "--runner", sock)
    assert res.returncode == 0, res.stdout + res.stderr
    new = record_of(res)
    meta = json.loads((state / "runs" / new / "manifest.json").read_text())[
        "predicate"]["runDetails"]["metadata"]
    extra = meta["extra"]
    assert extra["resumed_from_run"] == old.name and extra["steps"] == 30
    assert extra["resumed_from_checkpoint"]["checkpoint"].startswith(str(old))
    assert extra["isolation"]["account"] in names
    assert old.stat().st_uid == 0  # taken back from the resuming run's account
