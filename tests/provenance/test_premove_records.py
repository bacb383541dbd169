"""Records and ledgers written before the move to the zone layout (commit 41ae3f5: flat
``lora_kernel``, records under ``<home>/runs`` and the ledger under ``<home>/ledger``) still
verify with the new read-only auditor code. The fixture (tests/fixtures/premove_state, see its
README.txt) holds two sealed runs, a reviewer approval and a signed checkpoint, and only the
public half of the ledger key."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lora_kernel.provenance.audit import list_runs, verify
from lora_kernel.provenance.ledger import LedgerReader

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "premove_state"
RUNS = {"premove-a", "premove-b"}
APPROVED = "premove-a"


@pytest.fixture
def premove_state(tmp_path) -> Path:
    """A private copy of the pre-move state fixture (tests never touch the original)."""
    state = tmp_path / "premove_state"
    shutil.copytree(FIXTURE, state)
    assert not (state / "ledger" / "signing_key.pem").exists()
    return state


def _no_private_key(state: Path) -> None:
    assert not (state / "ledger" / "signing_key.pem").exists(), \
        "verifying created a private key in the state directory"


def test_premove_records_and_ledger_verify(premove_state):
    state = premove_state
    assert verify(state=state, trusted_key=state / "ledger" / "signing_key.pub") == []
    with LedgerReader(state=state) as led:
        assert led.verify() == []
        kinds = [e.kind for e in led.entries()]
    assert kinds == ["run", "run", "review", "checkpoint"]

    runs = {r["run_id"]: r for r in list_runs(state=state)}
    assert set(runs) == RUNS
    assert runs[APPROVED]["review"] == "approved"
    assert runs[APPROVED]["reviewer"] == "bob"
    assert runs["premove-b"]["review"] == "pending"
    assert all(r["user"] == "alice" and r["present"] for r in runs.values())
    _no_private_key(state)


def test_premove_changed_adapter_is_reported(premove_state):
    state = premove_state
    adapter = state / "runs" / APPROVED / "adapter" / "lora.safetensors"
    os.chmod(adapter.parent.parent, 0o700)  # the sealed record folder may be 0700 already
    os.chmod(adapter, 0o644)
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01
    adapter.write_bytes(bytes(data))

    problems = verify(state=state, trusted_key=state / "ledger" / "signing_key.pub")
    changed = [p for p in problems if p.code == "changed"]
    assert changed, problems
    assert any(Path(p.where) == adapter for p in changed), problems
    assert all(APPROVED in p.where for p in problems), problems  # the other run is fine
    _no_private_key(state)
