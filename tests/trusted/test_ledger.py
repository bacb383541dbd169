"""The ledger: chain, signed checkpoints and head; every tamper case paired with the clean
ledger verifying."""
from __future__ import annotations

import json
import sqlite3
import stat

import pytest

from lora_kernel.common.errors import PolicyRefusal
from lora_kernel.provenance.ledger import LedgerReader, entry_hash
from lora_kernel.trusted.ledger import Ledger


@pytest.fixture
def ledger(tmp_path):
    """A ledger with 12 review entries and a checkpoint every 5."""
    led = Ledger(state=tmp_path, checkpoint_every=5)
    for i in range(12):
        led.append("review", f"run{i}", {"decision": "approved", "i": i})
    yield led
    led.close()


def raw(led):
    """What an attacker with write access to the file does: drop the guard triggers."""
    db = sqlite3.connect(led.path, isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("DROP TRIGGER entries_no_delete")
    return db


def codes(problems):
    return [(p.code, p.where.rsplit(" ", 2)[-1] if " seq " in p.where else p.where)
            for p in problems]


def test_clean_ledger_verifies_with_periodic_checkpoints(ledger, tmp_path):
    assert ledger.verify() == []
    kinds = [e.kind for e in ledger.entries()]
    assert kinds.count("checkpoint") == 2 and kinds[5] == "checkpoint"  # after 5 entries
    cp = ledger.entries("checkpoint")[0]
    assert cp.payload["key_fingerprint"] == ledger.fingerprint()
    assert cp.payload["upto_seq"] == 5 and cp.payload["lora_enclave"]
    assert stat.S_IMODE((tmp_path / "ledger" / "signing_key.pem").stat().st_mode) == 0o600
    e = ledger.entries(subject="run3")[0]
    assert e.hash == entry_hash(e.seq, e.time, e.kind, e.subject, e.payload, e.prev_hash)
    on_demand = ledger.checkpoint()
    assert on_demand.payload["upto_seq"] == on_demand.seq - 1 and ledger.verify() == []


def test_triggers_refuse_update_and_delete(ledger):
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM entries WHERE seq = 2")


def test_deleted_entry_reported_with_seq(ledger):
    raw(ledger).execute("DELETE FROM entries WHERE seq = 3")
    assert codes(ledger.verify()) == [("deleted", "3")]


def test_deleted_trailing_entries_caught_by_signed_head(ledger):
    last = ledger.head()[0]
    raw(ledger).execute("DELETE FROM entries WHERE seq >= ?", (last - 1,))
    problems = ledger.verify()
    assert codes(problems) == [("deleted", f"{last - 1}-{last}")]
    assert "trailing" in problems[0].what


def test_edited_entry_reported(ledger):
    db = raw(ledger)
    db.execute("UPDATE entries SET payload = ? WHERE seq = 4",
               (json.dumps({"decision": "rejected"}),))
    problems = ledger.verify()
    assert codes(problems) == [("edited", "4")] and "run3" in problems[0].what


def test_edited_and_rehashed_entry_reported(ledger):
    db = raw(ledger)
    seq, time, kind, subject, payload, prev, _ = db.execute(
        "SELECT * FROM entries WHERE seq = 8").fetchone()
    forged = {**json.loads(payload), "decision": "rejected"}
    db.execute("UPDATE entries SET payload = ?, hash = ? WHERE seq = 8",
               (json.dumps(forged), entry_hash(seq, time, kind, subject, forged, prev)))
    assert ("edited", "8") in codes(ledger.verify())


def test_reordered_entries_reported(ledger):
    db = raw(ledger)
    db.execute("UPDATE entries SET seq = -1 WHERE seq = 2")
    db.execute("UPDATE entries SET seq = 2 WHERE seq = 3")
    db.execute("UPDATE entries SET seq = 3 WHERE seq = -1")
    problems = ledger.verify()
    assert codes(problems) == [("reordered", "2"), ("reordered", "3")]
    assert "written as seq 3" in problems[0].what


def test_rewritten_history_caught_by_checkpoint_signature(ledger):
    """An attacker edits entry 2 and re-hashes the whole chain (no key needed for that)."""
    db = raw(ledger)
    rows = db.execute("SELECT * FROM entries ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, time, kind, subject, payload, _p, _h in rows:
        payload = json.loads(payload)
        if seq == 2:
            payload["decision"] = "rejected"
        digest = entry_hash(seq, time, kind, subject, payload, prev)
        db.execute("UPDATE entries SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                   (json.dumps(payload), prev, digest, seq))
        prev = digest
    problems = ledger.verify()
    assert {p.code for p in problems} == {"signature", "edited"}
    assert any("history rewritten" in p.what for p in problems)


def test_checkpoint_from_another_key_refused(ledger, tmp_path):
    other = Ledger(state=tmp_path / "other")
    other.append("review", "x", {})
    with LedgerReader(ledger.path) as led2:
        assert led2.verify() == []
        problems = led2.verify(other.pub_path)
    assert problems and all(p.code == "signature" for p in problems)
    assert "unknown key" in problems[0].what


def test_unknown_kind_refused_and_run_entry_unique(ledger, make_run, state_tmp):
    with pytest.raises(ValueError, match="unknown ledger entry kind"):
        ledger.append("coffee", "x", {})
    record = make_run("r1")
    with Ledger(state=state_tmp) as led:
        assert led.run_entry("r1").payload["adapter_digest"]
        with pytest.raises(PolicyRefusal):
            led.append_run(record)


def test_signing_key_readable_by_others_refused(tmp_path):
    led = Ledger(state=tmp_path)
    led.append("review", "x", {})
    (tmp_path / "ledger" / "signing_key.pem").chmod(0o644)
    with pytest.raises(PolicyRefusal, match="chmod 600"):
        Ledger(state=tmp_path).append("review", "y", {})


def test_run_entry_without_manifest_digest_attests_nothing(make_run, state_tmp):
    from lora_kernel.provenance.audit import verify_run
    from lora_kernel.provenance.records import manifest_sha256

    good = make_run("good")
    make_run("bare", ledger=False)
    with Ledger(state=state_tmp) as led:
        led.append("run", "bare", {"user": "alice"})  # names no manifest: binds nothing
        assert led.expected_manifest_sha256("good") == (manifest_sha256(good),
                                                        led.run_entry("good").seq)
        assert verify_run("good", led, state_tmp) == []  # must work
        assert led.expected_manifest_sha256("bare") is None
        assert [p.code for p in verify_run("bare", led, state_tmp)] == ["ledger"]
