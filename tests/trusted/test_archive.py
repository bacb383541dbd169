"""Encrypted audit archives: export/import roundtrip through the CLI, and every kind of
tampering (flipped byte, truncation, reordered chunks, edited header, wrong key) refused."""
from __future__ import annotations

import datetime as dt
import os
import struct

import pytest

from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.trusted import archive as arc
from lora_kernel.trusted.ledger import Ledger

NOW = dt.datetime.now(dt.UTC)


def test_export_import_roundtrip_and_tampered_archive_refused(make_run, lora, state_tmp,
                                                              tmp_path, monkeypatch):
    make_run("r1", seed=1)
    make_run("r2", seed=2)
    key = tmp_path / "archive.key"
    key.write_bytes(os.urandom(32))
    archive = tmp_path / "audit.lea"
    code, out = lora("audit", "export", "--since", (NOW - dt.timedelta(days=1)).date(),
                     "--to", archive, "--key-file", key)
    assert code == 0 and "exported 2 run(s)" in out
    with Ledger(state=state_tmp) as led:
        exp = led.entries("export")[0].payload
        assert exp["key_fingerprint"] and sorted(exp["runs"]) == ["r1", "r2"]

    other = tmp_path / "auditor_home"
    tampered = tmp_path / "tampered.lea"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    code, out = lora("audit", "import", tampered, "--key-file", key, "--state", other)
    assert code == 5 and "failed authentication" in out and not (other / "runs" / "r1").exists()
    truncated = tmp_path / "truncated.lea"
    truncated.write_bytes(archive.read_bytes()[:-40])
    assert lora("audit", "import", truncated, "--key-file", key, "--state", other)[0] == 5
    monkeypatch.setenv("WRONG_PASS", "not the key at all")
    assert lora("audit", "import", archive, "--passphrase-env", "WRONG_PASS",
                "--state", other)[0] == 5
    assert not other.exists()  # a refused import leaves nothing behind

    # the exporting ledger's key must be the trusted one: another key's PEM is refused
    code, pem = lora("audit", "key", "--pem")
    assert code == 0 and "BEGIN PUBLIC KEY" in pem
    prod_pem = tmp_path / "prod.pem"
    prod_pem.write_text(pem[pem.index("-----BEGIN"):])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, out = lora("audit", "import", archive, "--key-file", key, "--state", other,
                     "--trusted-key", stranger)
    assert code == 5 and "not the trusted key" in out and not other.exists()
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "ledger.yaml").write_text("key_fingerprint: '" + "ab" * 32 + "'\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    code, out = lora("audit", "import", archive, "--key-file", key, "--state", other)
    assert code == 5 and "policies/ledger.yaml pin" in out and not other.exists(), out
    monkeypatch.delenv("LORA_POLICIES")

    code, out = lora("audit", "import", archive, "--key-file", key, "--state", other,
                     "--trusted-key", prod_pem)
    assert code == 0 and "restored ['r1', 'r2']" in out and "trusted by --trusted-key" in out
    assert lora("audit", "verify", "--all", "--state", other)[0] == 0
    with Ledger(state=other) as led:
        imp = led.entries("import")[0].payload
        assert imp["key_fingerprint"] == exp["key_fingerprint"]
    code, out = lora("audit", "import", archive, "--key-file", key, "--state", other)
    assert code == 0 and "already present ['r1', 'r2']" in out


def _chunks(data: bytes):
    """Split an encrypted file into (prefix bytes, [chunk records])."""
    hlen = struct.unpack(">I", data[8:12])[0]
    pos, out = 12 + hlen, []
    while pos < len(data):
        clen = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append(data[pos:pos + 4 + clen])
        pos += 4 + clen
    return data[:12 + hlen], out


def test_chunked_encryption_roundtrip_and_stream_tampering(tmp_path, monkeypatch):
    monkeypatch.setattr(arc, "CHUNK", 1000)
    monkeypatch.setattr(arc, "SCRYPT_N", 1 << 14)
    src, enc, dec = tmp_path / "plain", tmp_path / "enc", tmp_path / "dec"
    src.write_bytes(os.urandom(3500))
    secret = arc.key_material(passphrase="correct horse battery")
    fp = arc.encrypt_file(src, enc, secret)
    assert arc.decrypt_file(enc, dec, secret) == fp and dec.read_bytes() == src.read_bytes()
    head, chunks = _chunks(enc.read_bytes())
    assert len(chunks) == 4
    cases = {"reordered": head + chunks[1] + chunks[0] + b"".join(chunks[2:]),
             "dropped last": head + b"".join(chunks[:-1]),
             "extended": head + b"".join(chunks) + chunks[0],
             "header edited": head.replace(b'"p":1', b'"p":2') + b"".join(chunks)}
    for name, data in cases.items():
        bad = tmp_path / name.replace(" ", "_")
        bad.write_bytes(data)
        with pytest.raises(VerificationError):
            arc.decrypt_file(bad, dec, secret)
    with pytest.raises(ConfigError):
        arc.key_material(passphrase="short")
