"""The ledger's trust root through ``lora audit verify`` / ``lora audit key``: ``--trusted-key``,
the policy pin (``policies/ledger.yaml`` ``key_fingerprint``), the state pin (``pin.json``),
and an auditor's read-only copy without the private key. Each refusal is paired with a case
that must work."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lora_kernel.common.errors import PolicyRefusal
from lora_kernel.trusted.ledger import Ledger


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """An empty ``policies/`` folder (no ledger.yaml: no policy pin) the tests can write to."""
    pdir = tmp_path / "policies"
    pdir.mkdir()
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return pdir


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out, out


def _fingerprint(lora) -> str:
    code, out = lora("audit", "key")
    assert code == 0, out
    match = re.search(r"^key_fingerprint: ([0-9a-f]{64})\s+#", out, re.M)
    assert match, out
    return match.group(1)


def _other_pub(tmp_path):
    """The public key of a second, unrelated ledger (a valid Ed25519 key, not this one's)."""
    other = tmp_path / "other_state"
    with Ledger(state=other) as led:
        led.fingerprint()  # makes the key pair
        return led.pub_path


# -- 1. --trusted-key -----------------------------------------------------------------------
def test_trusted_key_bad_files_are_usage_errors_and_the_real_key_verifies(
        make_run, lora, state_tmp, policies, tmp_path):
    make_run("r1")
    missing = tmp_path / "no" / "such.pem"
    code, out = lora("audit", "verify", "--all", "--trusted-key", missing)
    assert code == 2 and str(missing) in out and "lora audit key --pem" in out, out
    _no_traceback(out)

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    code, out = lora("audit", "verify", "--all", "--trusted-key", garbage)
    assert code == 2 and str(garbage) in out and "lora audit key --pem" in out, out
    _no_traceback(out)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, out = lora("audit", "verify", "r1", "--trusted-key", rsa_pub)
    assert code == 2 and str(rsa_pub) in out and "Ed25519" in out, out
    _no_traceback(out)

    private = state_tmp / "ledger" / "signing_key.pem"  # the likeliest mistake: the secret half
    code, out = lora("audit", "verify", "--all", "--trusted-key", private)
    assert code == 2 and str(private) in out and "private key" in out, out
    _no_traceback(out)

    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, out = lora("audit", "verify", "--all", "--trusted-key", folder)
    assert code == 2 and str(folder) in out, out
    _no_traceback(out)

    real = state_tmp / "ledger" / "signing_key.pub"
    code, out = lora("audit", "verify", "--all", "--trusted-key", real)
    assert code == 0 and f"trusted-key {real}" in out and "OK:" in out, out
    _no_traceback(out)


def test_trusted_key_of_another_ledger_fails_verification(make_run, lora, policies, tmp_path):
    make_run("r1")
    code, out = lora("audit", "verify", "--all", "--trusted-key", _other_pub(tmp_path))
    assert code == 5 and "signature" in out, out
    _no_traceback(out)


# -- 2. policy pin --------------------------------------------------------------------------
def test_policy_pin_matching_verifies(make_run, lora, policies):
    make_run("r1")
    fp = _fingerprint(lora)
    (policies / "ledger.yaml").write_text(f"key_fingerprint: {fp}\n")
    code, out = lora("audit", "verify", "--all")
    assert code == 0 and "ledger key from policy pin" in out, out
    code, out = lora("audit", "key")
    assert code == 0 and fp in out and "policy pin" in out, out
    with Ledger(state=None) as led:  # the writer signs with the pinned key
        led.append("review", "x", {})
    assert lora("audit", "verify", "--all")[0] == 0


def test_policy_pin_of_another_key_fails_and_writer_refuses_to_sign(make_run, lora, state_tmp,
                                                                    policies):
    make_run("r1")
    assert lora("audit", "verify", "--all")[0] == 0
    (policies / "ledger.yaml").write_text(f"key_fingerprint: {'ab' * 32}\n")
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and "is not the pinned ledger key" in out and "policy pin" in out, out
    _no_traceback(out)
    code, out = lora("audit", "key")
    assert code == 5 and "is not the pinned ledger key" in out, out
    code, out = lora("audit", "key", "--pem")  # never hand out a key its pin disowns
    assert code == 5 and "BEGIN PUBLIC KEY" not in out, out
    with Ledger(state=state_tmp) as led:
        head = led.head()
        with pytest.raises(PolicyRefusal, match="refusing to sign"):
            led.append("review", "x", {})
        assert led.head() == head  # nothing written


def test_malformed_policy_pin_is_a_config_error(make_run, lora, policies):
    make_run("r1")
    for bad in ("abc", "'" + "g" * 64 + "'", "[1, 2]"):
        (policies / "ledger.yaml").write_text(f"key_fingerprint: {bad}\n")
        code, out = lora("audit", "verify", "--all")
        assert code == 2, out
        assert str(policies / "ledger.yaml") in out and "key_fingerprint" in out, out
        _no_traceback(out)
    (policies / "ledger.yaml").write_text("key_fingerprint:\n")  # empty: no pin
    assert lora("audit", "verify", "--all")[0] == 0


# -- 3. state pin (trust on first use) ------------------------------------------------------
def test_state_pin_catches_a_replaced_public_key(make_run, lora, state_tmp, policies, tmp_path):
    make_run("r1")
    assert (state_tmp / "ledger" / "pin.json").is_file()
    code, out = lora("audit", "verify", "--all")
    assert code == 0 and "ledger key from state pin" in out, out
    shutil.copyfile(_other_pub(tmp_path), state_tmp / "ledger" / "signing_key.pub")
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and "is not the pinned ledger key" in out and "state pin" in out, out
    _no_traceback(out)


def test_state_pin_with_garbage_public_key_is_a_problem_not_a_crash(make_run, lora, state_tmp,
                                                                     policies):
    make_run("r1")
    (state_tmp / "ledger" / "signing_key.pub").write_bytes(b"not a key")
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and "signing_key.pub" in out, out
    _no_traceback(out)


# -- 4. an auditor's copy without the private key ---------------------------------------------
def _auditor_copy(state_tmp, tmp_path):
    copy = tmp_path / "auditor"
    shutil.copytree(state_tmp / "runs", copy / "runs")
    (copy / "ledger").mkdir()
    shutil.copy2(state_tmp / "ledger" / "ledger.sqlite", copy / "ledger" / "ledger.sqlite")
    pub = tmp_path / "ledger.pub"
    pub.write_bytes((state_tmp / "ledger" / "signing_key.pub").read_bytes())
    return copy, pub


def test_auditor_copy_verifies_with_trusted_key_and_writes_nothing(make_run, lora, state_tmp,
                                                                   policies, tmp_path):
    make_run("r1")
    make_run("r2", seed=3)
    copy, pub = _auditor_copy(state_tmp, tmp_path)
    # a run that died before sealing: recovery must not seal it (and make a key) on a copy
    (copy / "runs" / ".active").mkdir(exist_ok=True)
    (copy / "runs" / ".active" / "r3.json").write_text(json.dumps(
        {"run_id": "r3", "started": "2020-01-01T00:00:00Z",
         "staging": str(copy / "runs" / ".staging" / "r3"), "run_as": {}}))
    before = sorted(p.name for p in (copy / "ledger").iterdir())
    code, out = lora("audit", "verify", "--all", "--state", copy, "--trusted-key", pub)
    assert code == 0 and "OK: 2 run(s)" in out and f"trusted-key {pub}" in out, out
    assert sorted(p.name for p in (copy / "ledger").iterdir()) == before == ["ledger.sqlite"]
    assert not (copy / "runs" / "r3").exists()

    # without any public key or pin, entries cannot be vouched for: not a silent pass
    code, out = lora("audit", "verify", "--all", "--state", copy)
    assert code == 5 and "no public key" in out, out
    _no_traceback(out)
    assert sorted(p.name for p in (copy / "ledger").iterdir()) == ["ledger.sqlite"]

    # tampering is still caught on the copy
    os.chmod(copy / "runs" / "r1" / "events.jsonl", 0o644)
    (copy / "runs" / "r1" / "events.jsonl").write_text("{}\n")
    code, out = lora("audit", "verify", "--all", "--state", copy, "--trusted-key", pub)
    assert code == 5 and "events.jsonl" in out, out


def test_auditor_copy_read_only_still_verifies(make_run, lora, state_tmp, policies, tmp_path):
    make_run("r1")
    copy, pub = _auditor_copy(state_tmp, tmp_path)
    code, out = lora("audit", "verify", "r1", "--state", copy, "--trusted-key", pub)
    assert code == 0, out
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes: the read-only part needs a normal user")
    db, ldir = copy / "ledger" / "ledger.sqlite", copy / "ledger"
    os.chmod(db, 0o444)
    os.chmod(ldir, 0o555)
    try:
        for argv in (("r1",), ("--all",)):
            code, out = lora("audit", "verify", *argv, "--state", copy, "--trusted-key", pub)
            assert code == 0, out
        assert sorted(p.name for p in ldir.iterdir()) == ["ledger.sqlite"]
    finally:
        os.chmod(ldir, 0o755)
        os.chmod(db, 0o644)


# -- 5. lora audit key --pem round trip -------------------------------------------------------
def test_key_pem_round_trips_into_trusted_key(make_run, lora, state_tmp, policies, tmp_path):
    make_run("r1")
    code, pem = lora("audit", "key", "--pem")
    assert code == 0 and pem.startswith("-----BEGIN PUBLIC KEY-----"), pem
    assert "PRIVATE" not in pem
    assert pem == (state_tmp / "ledger" / "signing_key.pub").read_text()
    out_file = tmp_path / "from_key.pem"
    out_file.write_text(pem)
    code, out = lora("audit", "verify", "--all", "--trusted-key", out_file)
    assert code == 0, out
    fp = _fingerprint(lora)
    (policies / "ledger.yaml").write_text(f"key_fingerprint: {fp}\n")
    assert lora("audit", "key", "--pem") == (0, pem)


def test_key_pem_without_a_key_yet_is_a_usage_error(lora, state_tmp, policies):
    with Ledger(state=state_tmp):
        pass  # an empty ledger: no key made yet
    code, out = lora("audit", "key", "--pem")
    assert code == 2 and "signing_key.pub" in out, out
    _no_traceback(out)
    assert not (state_tmp / "ledger" / "signing_key.pem").exists()
    assert stat.S_IMODE(os.stat(state_tmp / "ledger").st_mode) & 0o077 == 0
