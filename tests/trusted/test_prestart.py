"""The executor started while the pin step hashes (issue 13): the kernel is ready when the run
is accepted, and a refused run leaves no process and no work folder behind."""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from lora_kernel.common.digests import stat_key
from lora_kernel.common.errors import ConfigError
from lora_kernel.trusted import runner
from lora_kernel.trusted.runner import RunContext, new_run_id, run_notebook

REPO = Path(__file__).resolve().parents[2]


def _run_processes(run_id: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.environ().get("LORA_RUN_ID") == run_id \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_kernel_reads_the_pinned_digest_from_the_file_the_executor_writes(tmp_path,
                                                                          monkeypatch):
    from lora_kernel.training import models

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    digest_file = tmp_path / "digest.json"
    monkeypatch.delenv(models.BASE_MODEL_DIGEST_ENV, raising=False)
    monkeypatch.setenv(models.BASE_MODEL_DIGEST_FILE_ENV, str(digest_file))
    full = models.path_sha256(model)
    assert models.model_sha256(model) == full  # no file yet: hashed
    digest_file.write_text(json.dumps({"key": stat_key(model), "sha256": "ab" * 32}))
    assert models.model_sha256(model) == "ab" * 32  # the stat key matches: the hint is used
    digest_file.write_text(json.dumps({"key": "another key", "sha256": "cd" * 32}))
    assert models.model_sha256(model) == full  # a stale hint is never believed


@pytest.fixture
def prestart_home(tmp_path, monkeypatch, lora_kernel_prefix):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    return home


@pytest.mark.slow
def test_aborted_prestart_stops_its_kernel_and_removes_the_work_folder(prestart_home):
    import psutil

    run_id = new_run_id()
    (prestart_home / "work").mkdir()
    work = prestart_home / "work" / run_id
    pre = runner._Prestart(RunContext.local(), run_id, prestart_home, work)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the kernel is up before any spec came
        if any("-f" in p.info["cmdline"] for p in _run_processes(run_id)):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the pre-started executor started no kernel")
    assert work.is_dir() and stat.S_IMODE(work.stat().st_mode) == 0o700  # the user's alone
    pid = pre.proc.pid
    pre.abort()
    assert pre.proc.returncode == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _run_processes(run_id) == []
    assert not work.exists()
    assert (prestart_home / "work").is_dir()  # it existed before: kept


@pytest.mark.slow
def test_refused_run_leaves_no_process_and_no_folder(prestart_home, tmp_path):
    home = tmp_path / "fresh_home"  # not there yet: the executor makes home/work/RUN_ID
    nb = REPO / "notebooks" / "train_image_lora.ipynb"
    seen: list[str] = []
    real = runner._Prestart

    class Spy(real):  # type: ignore[misc,valid-type]
        def __init__(self, ctx, run_id, home_, work):
            seen.append(run_id)
            super().__init__(ctx, run_id, home_, work)

    runner._Prestart = Spy
    try:
        with pytest.raises(ConfigError, match="no config was given"):
            run_notebook(nb, {"overrides": {}}, home=home)
    finally:
        runner._Prestart = real
    assert seen and _run_processes(seen[0]) == []
    # the work folder and the folders made for it are gone; the kernel's own execution log
    # (logs/, the user's) keeps its kernel_start and kernel_stop
    assert not (home / "work").exists()
    assert not home.exists() or sorted(p.name for p in home.iterdir()) in ([], ["logs"])
    if home.exists():  # made by the run step: private, as a spawner makes it (issue 28)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_executor_run_still_takes_a_whole_spec_on_stdin(tmp_path):
    """``executor run`` without the pre-start line keeps the old protocol (one JSON spec, read
    to the end of input): a spec that is not valid JSON fails as before."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "lora_kernel.steps.executor", "run"],
                         input="{not json", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode != 0 and "JSONDecodeError" in res.stderr


@pytest.mark.slow
def test_quick_ready_client_runs_cells_and_notices_a_dead_kernel(lora_kernel_prefix, tmp_path,
                                                                 monkeypatch):
    """The client nbclient gets for a pre-started kernel: ready without jupyter_client's 0.2 s
    of IOPub silence, and the first cell's output is still its own; a kernel that died before
    answering is an error, not a wait until the timeout."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    from lora_kernel.steps.executor import quick_ready_client

    monkeypatch.setenv("LORA_HOME", str(tmp_path))
    ksm = KernelSpecManager(kernel_dirs=[str(lora_kernel_prefix / "share/jupyter/kernels")])
    km = AsyncKernelManager(kernel_name="lora", kernel_spec_manager=ksm)
    km.client_factory = quick_ready_client()
    run_sync(km.start_kernel)(cwd=str(tmp_path))
    kc = km.client()
    try:
        kc.start_channels()
        run_sync(kc.wait_for_ready)(timeout=60)
        outputs = []
        reply = run_sync(kc.execute_interactive)(
            "print(6 * 7)", timeout=30,
            output_hook=lambda m: outputs.append(m["content"].get("text")))
        assert reply["content"]["status"] == "ok"
        assert [o for o in outputs if o] == ["42\n"]  # no startup status taken for output
    finally:
        kc.stop_channels()
        run_sync(km.shutdown_kernel)(now=True)

    dead = AsyncKernelManager(kernel_name="lora", kernel_spec_manager=ksm)
    dead.client_factory = quick_ready_client()
    bad = tmp_path / "policies"
    bad.mkdir()
    (bad / "egress.yaml").write_text("allow: [{cidr: not-a-network}]\n")
    monkeypatch.setenv("LORA_POLICIES", str(bad))  # the kernel refuses to start
    run_sync(dead.start_kernel)(cwd=str(tmp_path))
    kc = dead.client()
    try:
        kc.start_channels()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="died"):
            run_sync(kc.wait_for_ready)(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        kc.stop_channels()
        run_sync(dead.cleanup_resources)()


@pytest.mark.slow
def test_shutdown_ends_a_running_cell_and_the_log_keeps_kernel_stop(lora_kernel_prefix,
                                                                    tmp_path, monkeypatch):
    """The executor's graceful shutdown (papermill failed while a cell still ran): the cell is
    interrupted, the kernel exits by itself and its execution log ends with kernel_stop."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    from lora_kernel.kernel.execlog import read_events
    from lora_kernel.steps.executor import _shutdown, quick_ready_client

    monkeypatch.setenv("LORA_HOME", str(tmp_path))
    monkeypatch.setenv("LORA_RUN_ID", "run-shutdown")
    ksm = KernelSpecManager(kernel_dirs=[str(lora_kernel_prefix / "share/jupyter/kernels")])
    km = AsyncKernelManager(kernel_name="lora", kernel_spec_manager=ksm)
    km.client_factory = quick_ready_client()
    run_sync(km.start_kernel)(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    run_sync(kc.wait_for_ready)(timeout=60)
    kc.execute("import time\nwhile True: time.sleep(0.05)")
    time.sleep(1.0)
    kc.stop_channels()
    t0 = time.monotonic()
    _shutdown(km)
    assert time.monotonic() - t0 < km.shutdown_wait_time / 2  # no SIGTERM was needed
    assert not run_sync(km.is_alive)()
    events = read_events(tmp_path, run_id="run-shutdown")
    assert events[-1]["type"] == "kernel_stop"
    assert [e["status"] for e in events if e["type"] == "execute"] == ["error"]  # interrupted
