"""hub/events.py: checking, storing once, and ledgering the kernels' event batches."""
from __future__ import annotations

import sqlite3

import pytest

from hub.events import EventStore, batch_digest, check_batch, events_path
from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.provenance import audit
from lora_kernel.provenance.ledger import KINDS, LedgerReader


def batch(user="alice", kernel_id="k-1", seqs=(1, 2, 3), run_id="run-a"):
    return {"kernel_id": kernel_id, "user": user, "events": [
        {"v": 1, "seq": s, "type": "execute", "time": f"2025-01-01T00:00:0{s % 10}Z",
         "user": user, "kernel_id": kernel_id, "run_id": run_id, "code": f"x = {s}"}
        for s in seqs]}


def test_kernel_events_is_a_ledger_kind():
    assert "kernel_events" in KINDS


def test_batch_stored_with_one_ledger_entry_and_ledger_verifies(state_tmp):
    kernel_id, events = check_batch(batch(), "alice")
    with EventStore(state_tmp, durable=False) as store:
        res = store.add_batch("alice", kernel_id, events)
        assert (res.stored, res.duplicates, res.first_seq, res.last_seq) == (3, 0, 1, 3)
        assert res.run_ids == ["run-a"] and res.ledger_seq is not None
        assert [e["seq"] for e in store.list_events(user="alice")] == [1, 2, 3]
        with LedgerReader(state=state_tmp) as led:
            entries = led.entries("kernel_events")
            assert len(entries) == 1
            p = entries[0].payload
            assert entries[0].subject == "k-1" and entries[0].seq == res.ledger_seq
            assert (p["user"], p["kernel_id"], p["first_seq"], p["last_seq"], p["count"]) \
                == ("alice", "k-1", 1, 3, 3)
            assert p["sha256"] == batch_digest(events) and p["run_ids"] == ["run-a"]
            assert led.verify() == []
            assert store.verify(led) == []
    assert audit.verify(state=state_tmp) == []
    db = sqlite3.connect(events_path(state_tmp))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_retried_batch_stores_nothing_twice(state_tmp):
    with EventStore(state_tmp, durable=False) as store:
        store.add_batch("alice", *check_batch(batch(seqs=(1, 2)), "alice"))
        again = store.add_batch("alice", *check_batch(batch(seqs=(1, 2, 3)), "alice"))
        assert (again.stored, again.duplicates, again.conflicts) == (1, 2, 0)
        same = store.add_batch("alice", *check_batch(batch(seqs=(1, 2, 3)), "alice"))
        assert (same.stored, same.duplicates, same.ledger_seq) == (0, 3, None)
        assert store.count() == 3
        with LedgerReader(state=state_tmp) as led:
            assert [e.payload["count"] for e in led.entries("kernel_events")] == [2, 1]
            assert store.verify(led) == []


def test_same_seq_of_another_user_or_kernel_is_not_a_duplicate(state_tmp):
    with EventStore(state_tmp, durable=False) as store:
        store.add_batch("alice", *check_batch(batch(), "alice"))
        bob = store.add_batch("bob", *check_batch(batch(user="bob"), "bob"))
        other = store.add_batch("alice", *check_batch(batch(kernel_id="k-2"), "alice"))
        assert bob.stored == 3 and other.stored == 3 and store.count() == 9


def test_resent_event_with_other_content_is_a_conflict_first_copy_kept(state_tmp):
    with EventStore(state_tmp, durable=False) as store:
        store.add_batch("alice", *check_batch(batch(seqs=(1,)), "alice"))
        changed = batch(seqs=(1,))
        changed["events"][0]["code"] = "rm -rf /"
        res = store.add_batch("alice", *check_batch(changed, "alice"))
        assert (res.stored, res.duplicates, res.conflicts) == (0, 0, 1)
        assert store.list_events()[0]["event"]["code"] == "x = 1"


def test_tampered_stored_event_fails_verify(state_tmp):
    with EventStore(state_tmp, durable=False) as store:
        store.add_batch("alice", *check_batch(batch(), "alice"))
        store._db.execute("UPDATE events SET event = replace(event, 'x = 2', 'x = 9')")
        with LedgerReader(state=state_tmp) as led:
            problems = store.verify(led)
    assert len(problems) == 1 and problems[0].code == "changed"


def test_user_mismatch_refused():
    with pytest.raises(PolicyRefusal):
        check_batch(batch(user="bob"), "alice")
    forged = batch()
    forged["events"][1]["user"] = "bob"
    with pytest.raises(PolicyRefusal):
        check_batch(forged, "alice")
    assert check_batch(batch(), "alice")[0] == "k-1"


@pytest.mark.parametrize("mutate", [
    lambda b: b.pop("kernel_id"),
    lambda b: b.update(events={"seq": 1}),
    lambda b: b["events"].append("not an object"),
    lambda b: b["events"][0].update(seq="1"),
    lambda b: b["events"][0].update(seq=0),
    lambda b: b["events"][0].update(seq=True),
    lambda b: b["events"][1].update(seq=1),
    lambda b: b["events"][0].update(kernel_id="k-other"),
    lambda b: b["events"][0].update(loss=float("nan")),
    lambda b: b["events"][0].update(type=3),
])
def test_malformed_batches_refused(mutate):
    body = batch()
    mutate(body)
    with pytest.raises(ConfigError):
        check_batch(body, "alice")


def test_failed_ledger_append_stores_nothing(state_tmp):
    class Broken:
        def append(self, *a, **kw):
            raise OSError("disk full")

    with EventStore(state_tmp, durable=False) as store:
        with pytest.raises(OSError):
            store.add_batch("alice", *check_batch(batch(), "alice"), ledger=Broken())
        assert store.count() == 0
        assert store.add_batch("alice", *check_batch(batch(), "alice")).stored == 3
