"""The GPU spawner: each user's single-user server, as the user's own uid, on GPUs from the pool.

Registered as the ``lora-gpu`` entry point of ``jupyterhub.spawners``
(``c.JupyterHub.spawner_class = "lora-gpu"``). Over :class:`LocalProcessSpawner` it adds:

* GPUs from :class:`hub.gpus.Pool` (NVML, else ``policies/hub.yaml`` ``gpus.devices``, else
  none): a spawn form to choose how many within the user's quota (the largest quota of their
  roles); the allocation is saved in the hub's database (``get_state``), re-claimed after a hub
  restart (``load_state``) and released on stop, so no GPU is lost or handed out twice;
* the environment: ``CUDA_VISIBLE_DEVICES``/``CUDA_DEVICE_ORDER``, the offline variables, the
  user's working home (``LORA_HOME``), the runs and audit services' URLs; never the state
  directory, and nothing of the hub's own environment but what JupyterHub passes;
* only the ``lora`` kernel (:mod:`hub.singleuser.kernels`) and no terminals, set on the command
  line.

``demo`` (``make hub`` without root): hub-only users, servers run as the hub's own uid, each
with its own home under ``$LORA_HOME/hub-users``.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from tornado import web
from traitlets import Bool, Unicode, default

from lora_kernel.common.errors import LoraError
from lora_kernel.common.offline import offline_environ
from lora_kernel.common.paths import private_dir
from lora_kernel.trusted import firewall

from .gpus import GpuUnavailable, Pool, cuda_env, discover, quota_for
from .settings import AUDIT_SERVICE, RUNS_SERVICE, gpu_pool_path, load_settings, user_home

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# Variables a server must not inherit from the hub (the trusted side's own settings).
_HIDDEN = ("LORA_STATE", "LORA_RUNNER", "JUPYTERHUB_CRYPT_KEY", "CONFIGPROXY_AUTH_TOKEN")


def platform_path() -> str:
    """``PATH`` of a user's server and kernels: the platform's environment (``lora``,
    ``papermill``, ``jupyter``), then the system's folders; the hub's own ``PATH`` (root's, with
    folders in root's home) never reaches a user."""
    return ":".join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])


class LoraSpawner(LocalProcessSpawner):
    """Single-user servers as the user's uid, with GPUs from the shared pool."""

    demo = Bool(False, help="Hub-only demo users: no setuid; homes under "
                            "$LORA_HOME/hub-users.").tag(config=True)
    state_dir = Unicode("", help="The trusted state directory (GPU pool file); default "
                                 "$LORA_STATE.").tag(config=True)
    terminals = Bool(False, help="Allow terminals in the single-user server (they run "
                                 "outside the guarded kernel).").tag(config=True)

    gpus: list[str]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gpus = []

    # -- the pool --------------------------------------------------------------------------
    @property
    def owner(self) -> str:
        return f"server:{self.user.name}/{self.name}"

    def pool(self) -> Pool:
        settings = load_settings()
        devices = [d.index for d in discover(settings.devices)]
        return Pool(gpu_pool_path(self.state_dir or None), devices, settings.exclusive)

    def quota(self) -> int:
        settings = load_settings()
        groups = [g.name for g in getattr(self.user, "groups", [])]
        roles = settings.roles_of(groups)
        return min(quota_for(roles, settings.quotas), len(self.pool().devices))

    # -- spawn form ------------------------------------------------------------------------
    @default("options_form")
    def _options_form(self):  # type: ignore[no-untyped-def]
        def form(spawner: LoraSpawner) -> str:
            quota = spawner.quota()
            if quota == 0:
                return ""
            options = "".join(
                f'<option value="{n}"{" selected" if n == min(1, quota) else ""}>{n}</option>'
                for n in range(quota + 1))
            return (f'<label for="lora-gpus">GPUs (your quota: {quota})</label>'
                    f'<select class="form-control" name="gpus" id="lora-gpus">{options}</select>')
        return form

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        raw = (formdata.get("gpus") or ["1"])[0]
        try:
            return {"gpus": int(raw)}
        except ValueError:
            return {"gpus": -1}

    def requested_gpus(self) -> int:
        quota = self.quota()
        asked = self.user_options.get("gpus") if self.user_options else None
        count = min(1, quota) if asked is None else asked
        if not isinstance(count, int) or count < 0 or count > quota:
            raise GpuUnavailable(f"{count!r} GPUs asked for; your quota is {quota}; fix: "
                                 f"choose 0 to {quota}")
        return count

    # -- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.gpus:
            state["gpus"] = list(self.gpus)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.gpus = [str(d) for d in state.get("gpus", [])]
        if self.gpus:  # a server restored after a hub restart: its GPUs are still its own
            try:
                self.pool().claim(self.owner, self.gpus)
            except LoraError as exc:
                self.log.error("GPU re-claim for %s failed: %s", self.owner, exc)

    def clear_state(self) -> None:
        super().clear_state()
        self.gpus = []

    # -- environment -----------------------------------------------------------------------
    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        if not self.demo:
            return super().user_env(env)
        env["USER"] = self.user.name
        env["HOME"] = str(user_home(self.user.name, True))
        return env

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        for name in _HIDDEN:
            env.pop(name, None)
        env = offline_environ(env)  # offline variables set, proxies removed
        env["PATH"] = platform_path()  # the platform's `lora` first; never the hub's own PATH
        env.update(cuda_env(self.gpus))
        env["LORA_HOME"] = str(user_home(self.user.name, self.demo))
        hub = os.environ.get("LORA_HUB_PUBLIC_URL", "").rstrip("/")
        env["LORA_AUDIT_URL"] = f"{hub}/services/{AUDIT_SERVICE}/api/events"
        env["LORA_RUNS_URL"] = f"{hub}/services/{RUNS_SERVICE}/"
        for name in ("LORA_POLICIES", "LORA_NOTEBOOKS", "LORA_SHARED_STORE"):
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    def get_args(self) -> list[str]:
        args = super().get_args()
        args += [f"--config={Path(__file__).parent / 'singleuser' / 'config.py'}",
                 "--ServerApp.kernel_spec_manager_class=hub.kernels.LoraOnlyKernelSpecManager",
                 "--MappingKernelManager.default_kernel_name=lora",
                 f"--ServerApp.terminals_enabled={self.terminals}"]
        return args

    def make_preexec_fn(self, name: str):  # type: ignore[no-untyped-def]
        home = user_home(name, self.demo)

        def enter_home() -> None:
            private_dir(home)  # made 0700, or an existing one others can read tightened
            mine = home / "notebooks"  # the platform's notebooks; the user's edits are kept
            mine.mkdir(mode=0o700, exist_ok=True)
            for nb in NOTEBOOKS.glob("*.ipynb"):
                if not (mine / nb.name).exists():
                    shutil.copyfile(nb, mine / nb.name)
            os.chdir(home)

        if self.demo:
            return enter_home
        setuid = super().make_preexec_fn(name)

        def preexec_user() -> None:
            setuid()  # everything after this runs as the user
            enter_home()
        return preexec_user

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self):  # type: ignore[no-untyped-def]
        if not self.demo:  # `firewall: required` (policies/egress.yaml): no unfiltered server
            try:
                firewall.enforce(pwd.getpwnam(self.user.name).pw_uid)
            except (LoraError, KeyError) as exc:
                raise web.HTTPError(403, "%s", str(exc)) from None
        pool = self.pool()
        try:
            count = self.requested_gpus()
            self.gpus = pool.allocate(self.owner, count) if count else []
        except GpuUnavailable as exc:  # shown to the user on the spawn page
            raise web.HTTPError(403, "%s", str(exc)) from None
        try:
            return await super().start()
        except BaseException:
            pool.release(self.owner)
            self.gpus = []
            raise

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)
        finally:
            self.pool().release(self.owner)
            self.gpus = []

