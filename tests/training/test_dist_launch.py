"""The ranks of a data-parallel training (lora_kernel.training.dist_launch, dist_worker): each
installs the egress guard, a recorded run lists them and trains the one-process adapter, and a
rank killed with SIGKILL fails the run, named, with nothing left running.

Every test starts rank processes (``slow``); the recorded ones start a guarded kernel too.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from democonfig import write_config
from safetensors.torch import load_file
from test_distributed import TOL

from lora_kernel.provenance.records import load_manifest
from lora_kernel.training.dist_launch import free_port, spawn_ranks, supervise

pytestmark = pytest.mark.slow

PROBE = r"""
import socket, sys
from pathlib import Path
from lora_kernel.common.errors import EgressBlocked
from lora_kernel.kernel import guard
from lora_kernel.training.dist_worker import enter_rank
rank, world = enter_rank()
out = Path(sys.argv[1]) / f"rank-{rank}.txt"
lines = [f"installed {guard.installed()}"]
with socket.socket() as listener:  # loopback: allowed (the ranks just met there too)
    listener.bind(("127.0.0.1", 0)); listener.listen()
    with socket.socket() as s:
        s.connect(listener.getsockname()); lines.append("loopback ok")
if guard.installed():  # never a real connect off the machine: only with the hook in place
    try:
        with socket.socket() as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused by the hook before any packet
        lines.append("connected")
    except EgressBlocked as exc:
        lines.append(f"refused {exc}")
out.write_text("\n".join(lines))
"""


def test_every_rank_installs_the_egress_guard_and_meets_on_loopback(tmp_path):
    ranks = spawn_ranks([sys.executable, "-c", PROBE, str(tmp_path)], 2, port=free_port(),
                        backend="gloo", work=tmp_path, log=lambda _m: None)
    supervise(ranks)
    for r in (0, 1):
        text = (tmp_path / f"rank-{r}.txt").read_text()
        assert "installed True" in text and "loopback ok" in text, text
        assert "refused" in text and "192.0.2.1:9" in text and "connected" not in text, text


@pytest.fixture
def run_home(tmp_path, monkeypatch, lora_kernel_prefix):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return home


def lora_run(config: Path, home: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lora_kernel.cli", "run", "--config", str(config),
           "--home", str(home)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


FAST_TEXT = {"save_steps": 0, "sample_prompts": [], "max_new_tokens": 2, "lora_dropout": 0.0}


def test_lora_run_on_two_ranks_seals_a_record_listing_both_and_the_one_rank_adapter(
        run_home, demo_home, tmp_path):
    """The text task through ``lora run``: 2 ranks x batch 4 against ``train()`` with one
    process x batch 8; the record names both ranks, the effective batch and the lr."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train
    cfg2 = write_config(demo_home, tmp_path, "text_lora.yaml", num_processes=2, batch_size=4,
                        max_train_steps=3, **FAST_TEXT)
    proc = lora_run(cfg2, run_home)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    record = Path(re.search(r"^record: (.+)$", out, re.M).group(1))
    extra = load_manifest(record)["predicate"]["runDetails"]["metadata"]["extra"]
    dist = extra["distributed"]
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert all(r["pid"] > 0 and r["exit_code"] == 0 for r in dist["ranks"])
    assert dist["effective_batch_size"] == 8 and dist["learning_rate"] == 2.0e-3
    # the kernel's log (its guard reports process launches) lists both ranks' processes
    events = (record / "events.jsonl").read_text().splitlines()
    assert sum("lora_kernel.training.dist_worker" in line for line in events) == 2
    one = train(load_config(write_config(demo_home, tmp_path, "text_lora.yaml", batch_size=8,
                                         max_train_steps=3, output_dir=str(tmp_path / "one"),
                                         **FAST_TEXT)), progress=False, samples=False)
    a = load_file(str(record / "adapter" / "codes" / "adapter_model.safetensors"))
    b = load_file(str(Path(one.adapter_files["peft"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOL
    assert extra["losses"] == pytest.approx(one.losses, abs=TOL)


def _training_on_two_ranks(demo_home: Path, tmp_path: Path, **changes) -> subprocess.Popen:
    """``lora train`` of the demo text config on 2 ranks (a long run), returned once its first
    step is reported (or it ended, or 300 s passed)."""
    progress = tmp_path / "progress.jsonl"
    cfg = write_config(demo_home, tmp_path, "text_lora.yaml", num_processes=2, batch_size=4,
                       max_train_steps=100000, **changes)
    proc = subprocess.Popen([sys.executable, "-m", "lora_kernel.cli", "train", "--config",
                             str(cfg), "--quiet", "--no-samples"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, LORA_PROGRESS_FILE=str(progress)))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            progress.is_file() and '"event": "step"' in progress.read_text()):
        time.sleep(0.3)
    return proc


def _ranks_under(root_pid: int) -> list[psutil.Process]:
    """The dist_worker processes below ``root_pid``."""
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:
            if "lora_kernel.training.dist_worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_rank_killed_with_sigkill_fails_the_run_naming_it_and_leaves_nothing_running(
        run_home, demo_home, tmp_path):
    cfg = write_config(demo_home, tmp_path, "text_lora.yaml", num_processes=2, batch_size=4,
                       max_train_steps=100000, **FAST_TEXT)
    proc = lora_run(cfg, run_home)
    ranks: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        ranks = _ranks_under(proc.pid)
    assert len(ranks) == 2, proc.communicate()
    by_rank = {int(p.environ()["LORA_DIST_RANK"]): p for p in ranks}
    time.sleep(3)  # somewhere in loading or training; either way the run must fail
    os.kill(by_rank[1].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 7, out + err
    assert "Traceback" not in err
    record = Path(re.search(r"record(?: is| in)?:? (\S+/runs/\S+)", out + err).group(1)
                  .rstrip(".;"))
    meta = load_manifest(record)["predicate"]["runDetails"]["metadata"]
    assert meta["status"] == "failed"
    assert re.search(r"rank 1 of 2 \(pid \d+\) was killed by SIGKILL", meta["extra"]["error"])
    for p in ranks:  # no orphan: both ranks are gone (not even zombies of ours)
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    assert _ranks_under(os.getpid()) == []
    json.dumps(meta)  # the record is plain data


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_a_checkpoint(
        demo_home, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM reaches the ranks once; they stop at the same step (agreed in the
    all-reduce), rank 0 saves that step's checkpoint, ``lora train`` exits 130 and nothing
    is left running; its twin, a finished run, is the equality test's."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "out"
    proc = _training_on_two_ranks(demo_home, tmp_path, output_dir=str(out),
                                  **dict(FAST_TEXT, save_steps=100000))
    ranks = _ranks_under(proc.pid)
    assert len(ranks) == 2, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    step = int(re.search(r"interrupted at step (\d+)/", stderr).group(1))
    assert (out / "checkpoints" / f"checkpoint-{step}" / "state.json").is_file()
    assert "every rank stopped at the same step" in stderr
    for p in ranks:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_a_rank_killed_mid_training_fails_lora_train_naming_it(demo_home, tmp_path,
                                                              monkeypatch):
    """Killed while the others wait in the gradient all-reduce: rank 0 notices its peer is
    gone (one line, no traceback), the launcher stops it and exits 7 naming rank 1."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc = _training_on_two_ranks(demo_home, tmp_path, output_dir=str(tmp_path / "out"),
                                  **FAST_TEXT)
    ranks = {int(p.environ()["LORA_DIST_RANK"]): p for p in _ranks_under(proc.pid)}
    assert set(ranks) == {0, 1}, proc.communicate()
    os.kill(ranks[1].pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 7, stdout + stderr
    assert re.search(rf"rank 1 of 2 \(pid {ranks[1].pid}\) was killed by SIGKILL", stderr)
    assert "Traceback" not in stderr
    for p in ranks.values():
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
