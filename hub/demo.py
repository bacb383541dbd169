"""``make hub``: the demo hub on one machine, with a first-run admin and demo users.

* First run: writes ``$LORA_HUB_DIR/demo_users.json`` (scrypt hashes, mode 0600) and
  ``demo_passwords.txt`` (mode 0600) for the users below, and prints how to log in.
* As root: the demo users are also real system users and groups (``useradd``), the service
  account ``lora-svc`` owns the state directory, every server runs as its user's uid.
* Not root: hub-only users, every server as the account that ran ``make hub`` (docs/hub.md).

Then it runs ``jupyterhub -f hub/jupyterhub_config.py`` (``LORA_HUB_AUTH=demo`` unless set) as a
child until Ctrl-C or SIGTERM, which stop the hub, the proxy, the services and every user's
server and kernels: nothing is left running (:func:`serve`).

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from hub.auth import add_demo_user
from hub.settings import load_settings
from lora_kernel.common.egress import load_egress_policy
from lora_kernel.trusted import firewall

REPO = Path(__file__).resolve().parents[1]
# name, platform group, admin
DEMO_USERS = [("demo-admin", "lora-admins", True), ("demo-alice", "lora-researchers", False),
              ("demo-erin", "lora-engineers", False), ("demo-rita", "lora-reviewers", False),
              ("demo-audrey", "lora-auditors", False)]
SERVICE_USER = "lora-svc"


def ensure_run_accounts(group: str = "lora-runs", count: int = 2,
                        prefix: str = "lora-run") -> list[str]:
    """The run-account pool of :mod:`lora_kernel.trusted.accounts` (root only): the group
    ``group`` and ``count`` system users ``<prefix>0`` … whose primary group it is (no home,
    no login shell). Existing ones are kept; returns the names created here."""
    try:
        grp.getgrnam(group)
    except KeyError:
        subprocess.run(["groupadd", "--system", group], check=True)
    made = []
    for n in range(count):
        name = f"{prefix}{n}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", "-g", group, name], check=True)
            made.append(name)
    return made


def ensure_system_user(name: str, groups: list[str], *, system: bool = False) -> bool:
    """Make the Linux user ``name`` exist with exactly ``groups`` as its supplementary groups
    (root only); returns whether it was created here.

    Groups are created if missing. An existing user's supplementary groups are *set* to
    ``groups`` (``usermod -G``), not added to, so a user left by an earlier run with other
    groups ends up as asked. A created home is mode 0700 (Debian's ``useradd`` makes it
    0755 from ``UMASK 022``); an existing home that others can read or enter is tightened to
    0700, since one user's home must never be readable by another (IPython history,
    notebooks, the working home ``~/lora``).
    """
    for group in groups:
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--create-home", "-K", "HOME_MODE=0700", "--shell", "/bin/bash"]
        if system:
            cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*cmd, *(["-G", ",".join(groups)] if groups else []), name], check=True)
        created = True
    else:
        subprocess.run(["usermod", "-G", ",".join(groups), name], check=True)
        created = False
        if not system:
            tighten_home(Path(entry.pw_dir), entry.pw_uid)
    return created


def tighten_home(home: Path, uid: int) -> None:
    """Mode 0700 on ``home`` when it is ``uid``'s own folder and others may read or enter it;
    a home that does not exist or belongs to someone else (``/nonexistent``, ``/``) is left."""
    try:
        st = home.stat()
    except FileNotFoundError:
        return
    if st.st_uid == uid and st.st_mode & 0o077:
        os.chmod(home, 0o700)


def prepare(hub_dir: Path) -> list[tuple[str, str]]:
    """Demo users (and, as root, system users and the state's owner); returns new passwords.

    The users file is the list: as root, each user in it (the demo users on a first run, or
    whoever an admin added since) becomes a system user with exactly the groups it lists."""
    users_file = hub_dir / "demo_users.json"
    created: list[tuple[str, str]] = []
    if not users_file.exists():
        for name, group, admin in DEMO_USERS:
            created.append((name, add_demo_user(users_file, name, [group], admin)))
        pw_file = hub_dir / "demo_passwords.txt"
        pw_file.write_text("".join(f"{n} {p}\n" for n, p in created))
        os.chmod(pw_file, 0o600)
    if os.geteuid() == 0:
        for name, entry in sorted(json.loads(users_file.read_text()).items()):
            ensure_system_user(name, list(entry.get("groups") or []))
        ensure_system_user(os.environ.get("LORA_SERVICE_USER", SERVICE_USER), [], system=True)
    return created


def prepare_shared_store(store: Path) -> bool:
    """The platform's shared store (``$LORA_SHARED_STORE``, listed first by the studio, see
    ``policies/models.yaml``): on first use, the demo models (tiny SD folder and single file,
    tiny Llama) and datasets go there, readable by every user and writable by none but this
    account; returns whether it was filled now. An admin adds a model with
    ``lora models add PATH`` (checked, copied read-only into ``models/`` there)."""
    if (store / "models").is_dir():
        return False
    import shutil
    import tempfile

    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store) as tmp:
        # `lora demo-assets` in a child: the hub never imports the training library
        subprocess.run([sys.executable, "-m", "lora_kernel.cli", "demo-assets", "--home", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        demo = Path(tmp) / "demo"
        for part in ("datasets", "models"):  # models last: its presence means "filled"
            shutil.move(str(demo / part), str(store / part))
    for folder, _dirs, files in os.walk(store):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return True


def hub_processes(api_port: str) -> list[psutil.Process]:
    """Every process left of the hub whose API listens on ``api_port``: user servers and
    their kernels (found by the ``JUPYTERHUB_API_URL`` they inherit) and the proxy and
    services (started by the hub, with that URL too)."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            url = proc.environ().get("JUPYTERHUB_API_URL", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if f":{api_port}/" in url:
            found.append(proc)
    return found


def stop_leftovers(api_port: str, grace_s: float = 10.0, settle_s: float = 5.0) -> list[int]:
    """What :func:`hub_processes` finds still running ``settle_s`` after the hub exited (a
    kernel notices its server is gone by polling, a second or more under load): SIGTERM,
    then SIGKILL after ``grace_s``; returns the pids that had to be stopped here."""
    _gone, procs = psutil.wait_procs(hub_processes(api_port), timeout=settle_s)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


def serve(env: dict[str, str]) -> int:
    """Run JupyterHub as a child in a session of its own until it exits or this process gets
    SIGINT (Ctrl-C) / SIGTERM / SIGHUP; then stop it and everything it started, users'
    servers and kernels included (``LORA_HUB_STOP_SERVERS=1``: the hub stops them itself; what
    is still running after it exited is stopped here). Returns the hub's exit code."""
    hub = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f",
                            str(REPO / "hub" / "jupyterhub_config.py")],
                           env={**env, "LORA_HUB_STOP_SERVERS": "1"}, start_new_session=True)
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if not stopping:
            print(f"\nstopping the hub, its services and every user server "
                  f"({signal.Signals(signum).name}; again to stop at once)...", flush=True)
            hub.send_signal(signal.SIGTERM)
        else:
            hub.kill()  # a second Ctrl-C: no more waiting for a clean shutdown
        stopping.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    rc = hub.wait()
    left = stop_leftovers(env.get("LORA_HUB_API_PORT", "8081"))
    print(f"hub stopped (exit {rc})" + (f"; stopped {len(left)} process(es) it left"
                                        if left else "; nothing left running"), flush=True)
    return rc


def main() -> None:
    load_settings()  # a bad policies/hub.yaml stops here, with its file and key
    hub_dir = Path(os.environ.get("LORA_HUB_DIR", REPO / "hub_data")).resolve()
    hub_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = prepare(hub_dir)
    port = os.environ.get("LORA_HUB_PORT", "8000")
    print(f"\nLoRA Enclave hub: http://127.0.0.1:{port}/  (demo login)")
    if created:
        for name, password in created:
            print(f"  {name:12s} {password}")
    print(f"  passwords: {hub_dir / 'demo_passwords.txt'} (mode 0600)")
    print("  roles: demo-admin admin, demo-alice researcher, demo-erin engineer, "
          "demo-rita reviewer, demo-audrey auditor")
    mode, why = firewall.effective(load_egress_policy())
    print(f"  egress firewall: {mode} ({why})")
    print("  Ctrl-C stops the hub, its services and every user server and kernel\n",
          flush=True)
    env = dict(os.environ)
    env.setdefault("LORA_HUB_AUTH", "demo")
    env["LORA_HUB_DIR"] = str(hub_dir)
    shared = Path(env.setdefault("LORA_SHARED_STORE", str(REPO / "hub_shared"))).resolve()
    if prepare_shared_store(shared):
        print(f"  shared store: {shared} (demo models and datasets, readable by every user)",
              flush=True)
    sys.exit(serve(env))


if __name__ == "__main__":
    main()
