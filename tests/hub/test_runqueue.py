"""The runs service's queue (hub.runqueue): order, concurrency, the GPU pool, cancel, restore."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from hub.gpus import GpuUnavailable, Pool
from hub.runqueue import RunQueue, queue_path
from hub.settings import gpu_pool_path
from lora_kernel.common.errors import ConfigError, NoMatch


def submit(q: RunQueue, user: str = "alice", gpus: int = 0, nb: str = "a.ipynb"):
    return q.submit(user, "notebook", f"/home/{user}/lora/{nb}", parameters={"x": 1},
                    home=f"/home/{user}/lora", gpus=gpus)


def dead_worker() -> tuple[int, float]:
    """The pid and start time of a process that has exited (a crashed worker)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_the_queue_lives_in_the_hub_state_folder(tmp_path):
    q = RunQueue(tmp_path)
    assert q.path == queue_path(tmp_path) == tmp_path / "hub" / "runs.sqlite"
    assert q.path.is_file()


def test_claims_follow_submission_order_up_to_max_concurrent(tmp_path):
    q = RunQueue(tmp_path, max_concurrent=2)
    a, b, c = submit(q), submit(q, "bob"), submit(q)
    assert [s.status for s in (a, b, c)] == ["queued"] * 3
    assert q.claim_next().id == a.id
    assert q.claim_next().id == b.id
    assert q.claim_next() is None  # two run: the third waits
    assert q.get(c.id).status == "queued"
    q.finish(a.id, "succeeded", run_id="r1", record={"run_id": "r1"})
    assert q.claim_next().id == c.id
    assert q.get(a.id).record == {"run_id": "r1"}


def test_list_is_per_user_newest_first(tmp_path):
    q = RunQueue(tmp_path)
    a1, _b, a2 = submit(q), submit(q, "bob"), submit(q)
    assert [s.id for s in q.list_runs("alice")] == [a2.id, a1.id]
    assert len(q.list_runs()) == 3
    with pytest.raises(NoMatch):
        q.get(999)


def test_a_one_gpu_pool_makes_the_second_gpu_run_wait(tmp_path):
    q = RunQueue(tmp_path, devices=["0"], max_concurrent=2)
    first, second, cpu = submit(q, gpus=1), submit(q, "bob", gpus=1), submit(q, "carol")
    got = q.claim_next()
    assert got.id == first.id and got.gpus_held == ["0"]
    assert Pool(gpu_pool_path(tmp_path), ["0"]).holders() == {f"run:{first.id}": ["0"]}
    # the GPU is taken: the second GPU run stays queued, a CPU run that fits goes ahead
    assert q.claim_next().id == cpu.id
    assert q.get(second.id).status == "queued"
    q.finish(cpu.id, "succeeded")
    assert q.claim_next() is None
    q.finish(first.id, "failed", error="boom")
    got = q.claim_next()
    assert got.id == second.id and got.gpus_held == ["0"]


def test_a_gpu_the_spawner_holds_is_not_given_to_a_run(tmp_path):
    q = RunQueue(tmp_path, devices=["0"])
    Pool(gpu_pool_path(tmp_path), ["0"]).allocate("server:alice/", 1)
    sub = submit(q, gpus=1)
    assert q.claim_next() is None
    assert q.get(sub.id).status == "queued"


def test_submit_refuses_more_gpus_than_the_pool_has_and_bad_counts(tmp_path):
    q = RunQueue(tmp_path, devices=["0"])
    with pytest.raises(GpuUnavailable):
        submit(q, gpus=2)
    with pytest.raises(ConfigError):
        submit(q, gpus=-1)
    with pytest.raises(ConfigError):
        q.submit("alice", "script", "/x", home="/h")
    assert q.list_runs() == []


def test_cancel_a_queued_run_means_it_never_starts(tmp_path):
    q = RunQueue(tmp_path)
    sub = submit(q)
    done = q.cancel(sub.id)
    assert done.status == "cancelled" and done.finished and done.run_id is None
    assert q.claim_next() is None


def test_cancel_a_running_run_only_flags_it_and_a_finished_one_is_left(tmp_path):
    q = RunQueue(tmp_path)
    sub = submit(q)
    q.claim_next()
    flagged = q.cancel(sub.id)
    assert flagged.status == "running" and flagged.cancel_requested
    q.finish(sub.id, "failed", error="cancelled")
    assert q.cancel(sub.id).status == "failed"


def test_restore_interrupts_a_running_row_whose_worker_died_and_frees_its_gpus(tmp_path):
    q = RunQueue(tmp_path, devices=["0", "1"], max_concurrent=3)
    crashed, alive, waiting = submit(q, gpus=1), submit(q, "bob", gpus=1), submit(q, gpus=1)
    q.claim_next()
    q.claim_next()
    q.set_worker(crashed.id, *dead_worker())
    q.set_run_id(crashed.id, "20260101T000000Z-abcdef")
    me = psutil.Process(os.getpid())
    q.set_worker(alive.id, me.pid, me.create_time())
    pool = Pool(gpu_pool_path(tmp_path), ["0", "1"])
    recovered = {"run_id": "20260101T000000Z-abcdef", "status": "failed"}
    calls = []

    def recover():
        calls.append(1)
        return [recovered, {"run_id": "someone-elses", "status": "failed"}]

    gone = q.restore(recover=recover)
    assert [s.id for s in gone] == [crashed.id] and calls == [1]
    row = q.get(crashed.id)
    assert row.status == "interrupted" and row.record == recovered and row.exit_code == 7
    assert q.get(alive.id).status == "running"  # its worker lives: untouched
    assert q.get(waiting.id).status == "queued"
    assert pool.holders() == {f"run:{alive.id}": ["1"]}
    assert q.claim_next().id == waiting.id  # the freed GPU goes to the queued run


def test_restore_releases_gpus_of_runs_that_no_longer_run_but_not_servers(tmp_path):
    q = RunQueue(tmp_path, devices=["0", "1"])
    pool = Pool(gpu_pool_path(tmp_path), ["0", "1"])
    pool.allocate("run:41", 1)
    pool.allocate("server:alice/", 1)
    assert q.restore(recover=lambda: pytest.fail("nothing to recover")) == []
    assert pool.holders() == {"server:alice/": ["1"]}


def test_restore_with_a_pid_that_was_reused_counts_the_worker_as_gone(tmp_path):
    q = RunQueue(tmp_path)
    sub = submit(q)
    q.claim_next()
    q.set_worker(sub.id, os.getpid(), 12345.0)  # our pid, another start time
    assert [s.id for s in q.restore(recover=list)] == [sub.id]


def test_restore_with_no_worker_recorded_uses_the_trusted_recovery(tmp_path):
    q = RunQueue(tmp_path)
    sub = submit(q)
    q.claim_next()  # the service died before it recorded the worker
    gone = q.restore()  # the default: lora_kernel.trusted.recovery.recover (nothing stale)
    assert [s.id for s in gone] == [sub.id]
    assert q.get(sub.id).status == "interrupted" and q.get(sub.id).record is None
