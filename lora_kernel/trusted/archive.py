"""Encrypted audit archives: ``lora audit export`` / ``lora audit import``.

An archive is a tar of ``export.json``, ``ledger.jsonl`` (the ledger from the first entry at or
after ``since`` to the head, checkpoints included) and ``records/<run_id>/...``, encrypted with
AES-256-GCM in 1 MiB chunks. The key is derived with scrypt from a key file's bytes or a
passphrase and a random salt. File layout::

    b"LORAAUD1" | u32 header length | header (canonical JSON: kdf, salt, nonce prefix, chunk
    size, key fingerprint) | repeated: u32 length | ciphertext chunk

Each chunk's nonce is ``prefix (7 bytes) | chunk index (4) | final flag (1)`` and its associated
data is the magic and header, so an edited header, a reordered, truncated or extended chunk
stream, or any flipped byte fails authentication. The key fingerprint (sha256 of the derived
key, which is salted per archive) goes into the ledger's ``export`` / ``import`` entries.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.digests import canonical_json, sha256_bytes, sha256_file
from lora_kernel.common.errors import ConfigError, PolicyRefusal, VerificationError
from lora_kernel.common.paths import runs_dir, state_dir
from lora_kernel.common.timeutil import iso_time, parse_time
from lora_kernel.common.version import __version__
from lora_kernel.provenance.audit import verify_run
from lora_kernel.provenance.ledger import (
    key_fingerprint as ledger_key_fingerprint,
)
from lora_kernel.provenance.ledger import (
    load_public_key,
    open_ledger,
    pinned_fingerprint,
    public_key_pem,
    verify_entries,
)
from lora_kernel.provenance.records import Problem, manifest_sha256, verify_record
from lora_kernel.trusted.ledger import Ledger

MAGIC = b"LORAAUD1"
CHUNK = 1 << 20
SCRYPT_N = 1 << 15


def key_material(key_file: str | os.PathLike[str] | None = None,
                 passphrase: str | None = None) -> bytes:
    """The secret an archive key is derived from: a key file's bytes or a passphrase."""
    if (key_file is None) == (passphrase is None):
        raise ConfigError("give exactly one of a key file or a passphrase")
    if key_file is not None:
        data = Path(key_file).read_bytes()
        if len(data) < 16:
            raise ConfigError("key file is shorter than 16 bytes", file=key_file)
        return data
    if passphrase is None:  # not reached: exactly one of the two was given
        raise ConfigError("give exactly one of a key file or a passphrase")
    if len(passphrase) < 8:
        raise ConfigError("passphrase is shorter than 8 characters")
    return passphrase.encode("utf-8")


def _derive(secret: bytes, kdf: dict[str, Any]) -> bytes:
    return Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=int(kdf["n"]),
                  r=int(kdf["r"]), p=int(kdf["p"])).derive(secret)


def key_fingerprint(key: bytes) -> str:
    """Fingerprint of a derived archive key (first 32 hex of sha256)."""
    return sha256_bytes(b"lora-enclave archive key\0" + key)[:32]


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">I", index) + (b"\x01" if final else b"\x00")


def encrypt_file(src: Path, dst: Path, secret: bytes) -> str:
    """Encrypt ``src`` into ``dst`` (format above); return the key fingerprint."""
    kdf = {"name": "scrypt", "n": SCRYPT_N, "r": 8, "p": 1,
           "salt": base64.b64encode(os.urandom(16)).decode()}
    key = _derive(secret, kdf)
    fingerprint = key_fingerprint(key)
    header = canonical_json({"format": 1, "cipher": "AES-256-GCM", "kdf": kdf, "chunk": CHUNK,
                             "nonce_prefix": base64.b64encode(os.urandom(7)).decode(),
                             "key_fingerprint": fingerprint})
    prefix = base64.b64decode(json.loads(header)["nonce_prefix"])
    aes, aad = AESGCM(key), MAGIC + header
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(MAGIC + struct.pack(">I", len(header)) + header)
        index, done = 0, 0
        while True:
            block = fin.read(CHUNK)
            done += len(block)
            final = done >= size
            ct = aes.encrypt(_nonce(prefix, index, final), block, aad)
            fout.write(struct.pack(">I", len(ct)) + ct)
            index += 1
            if final:
                break
        fout.flush()
        os.fsync(fout.fileno())
    return fingerprint


def decrypt_file(src: Path, dst: Path, secret: bytes) -> str:
    """Decrypt an archive into ``dst``; return the key fingerprint.

    :class:`VerificationError` for a wrong key or any tampering (header, chunks, truncation).
    """
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        if fin.read(len(MAGIC)) != MAGIC:
            raise VerificationError(f"{src}: not a LoRA Enclave audit archive")
        try:
            (hlen,) = struct.unpack(">I", fin.read(4))
            header = fin.read(hlen)
            meta = json.loads(header)
            key = _derive(secret, meta["kdf"])
            prefix = base64.b64decode(meta["nonce_prefix"])
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise VerificationError(f"{src}: archive header damaged: {exc}") from None
        aes, aad, index = AESGCM(key), MAGIC + header, 0
        while True:
            raw_len = fin.read(4)
            if len(raw_len) < 4:
                raise VerificationError(f"{src}: archive truncated after chunk {index}")
            (clen,) = struct.unpack(">I", raw_len)
            ct = fin.read(clen)
            final = fin.peek(1)[:1] == b"" if hasattr(fin, "peek") else False
            try:
                fout.write(aes.decrypt(_nonce(prefix, index, final), ct, aad))
            except InvalidTag:
                raise VerificationError(f"{src}: chunk {index} failed authentication: wrong "
                                        "key, or the archive was tampered with") from None
            index += 1
            if final:
                break
    fingerprint = key_fingerprint(key)
    if fingerprint != meta.get("key_fingerprint"):
        raise VerificationError(f"{src}: key fingerprint does not match the header")
    return fingerprint


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def export_archive(to_file: str | os.PathLike[str], *, since: dt.datetime, secret: bytes,
                   state: str | os.PathLike[str] | None = None,
                   ledger: Ledger | None = None) -> dict[str, Any]:
    """Write an encrypted archive of the runs sealed at or after ``since`` (and the ledger
    slice from there on); record an ``export`` ledger entry. Returns that entry's payload."""
    to = Path(to_file).resolve()
    with open_ledger(ledger, state, Ledger) as led:
        rows = [r for r in led.slice_rows(1) if parse_time(r["time"]) >= since]
        if not rows:
            raise PolicyRefusal(f"nothing in the ledger since {iso_time(since)} to export")
        rows = led.slice_rows(rows[0]["seq"])
        runs = {}
        for r in rows:
            if r["kind"] == "run" and (runs_dir(state) / r["subject"]).is_dir():
                problems = verify_run(r["subject"], led, state)
                if problems:
                    raise VerificationError(f"run {r['subject']} does not verify; fix or "
                                            "investigate before exporting: "
                                            + "; ".join(map(str, problems)))
                runs[r["subject"]] = r["payload"]["manifest_sha256"]
        meta = {"format": 1, "created": iso_time(), "since": iso_time(since), "runs": runs,
                "ledger_from_seq": rows[0]["seq"], "ledger_to_seq": rows[-1]["seq"],
                "public_key_pem": public_key_pem(led.signing_key().public_key()),
                "source_key_fingerprint": led.fingerprint(), "lora_enclave": __version__}
        to.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=to.parent, prefix=".export.") as tmp:
            plain = Path(tmp) / "archive.tar"
            with tarfile.open(plain, "w") as tar:
                _add_bytes(tar, "export.json", canonical_json(meta))
                _add_bytes(tar, "ledger.jsonl",
                           b"".join(canonical_json(r) + b"\n" for r in rows))
                for rid in sorted(runs):
                    tar.add(runs_dir(state) / rid, arcname=f"records/{rid}")
            with atomic_path(to) as out:
                fingerprint = encrypt_file(plain, out, secret)
        payload = {"to": str(to), "archive_sha256": sha256_file(to), "since": iso_time(since),
                   "key_fingerprint": fingerprint, "runs": runs,
                   "ledger_from_seq": meta["ledger_from_seq"],
                   "ledger_to_seq": meta["ledger_to_seq"]}
        led.append("export", to.name, payload)
    return payload


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    for member in tar.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise VerificationError(f"archive member {member.name!r} refused (absolute path, "
                                    "'..', link or special file)")
        if parts[0] not in ("records", "export.json", "ledger.jsonl"):
            raise VerificationError(f"unexpected archive member {member.name!r}")
    for member in tar.getmembers():
        target = dest / member.name
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        if src is None:  # not reached: only regular files and folders pass the check above
            raise VerificationError(f"archive member {member.name!r} has no data")
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def import_archive(archive: str | os.PathLike[str], *, secret: bytes,
                   state: str | os.PathLike[str] | None = None,
                   ledger: Ledger | None = None,
                   trusted_key: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Decrypt, verify and restore an archive into ``<state>/runs``; record an ``import``
    ledger entry (which attests the restored manifests). Returns that entry's payload.

    Nothing is restored unless the archive authenticates, its ledger slice verifies with the
    exporting ledger's key, that key is the trusted one (``trusted_key``, a PEM file, else the
    fingerprint ``policies/ledger.yaml`` pins; with neither the archive's own key is taken
    and the payload says ``"unpinned"``), and every record matches its manifest and the
    slice's run entry. A run already present with the same manifest is skipped; a different
    one is refused. A refused import leaves no state behind that was not there before.
    """
    root = state_dir(state)
    existed = root.exists()
    try:
        return _import_archive(Path(archive).resolve(), secret=secret, state=state,
                               ledger=ledger, trusted_key=trusted_key)
    except BaseException:
        if not existed and ledger is None:
            shutil.rmtree(root, ignore_errors=True)
        raise


def _expected_key(trusted_key: str | os.PathLike[str] | None) -> tuple[str | None, str]:
    """``(fingerprint the exporting key must have, where that comes from)``."""
    if trusted_key is not None:
        path = Path(trusted_key)
        try:
            key = load_public_key(path.read_bytes(), where=str(path))
        except (OSError, VerificationError) as exc:
            raise ConfigError(f"not a readable PEM public key: {exc}; fix: give the exporting "
                              "ledger's public key (`lora audit key --pem` prints it)",
                              file=path, key="--trusted-key") from None
        return ledger_key_fingerprint(key), f"--trusted-key {path}"
    pin = pinned_fingerprint()
    return (pin, "the policies/ledger.yaml pin") if pin else (None, "unpinned")


def _import_archive(archive: Path, *, secret: bytes, state: str | os.PathLike[str] | None,
                    ledger: Ledger | None,
                    trusted_key: str | os.PathLike[str] | None) -> dict[str, Any]:
    expected, key_source = _expected_key(trusted_key)
    base = runs_dir(state)
    staging_root = base / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    with open_ledger(ledger, state, Ledger) as led, \
            tempfile.TemporaryDirectory(dir=staging_root, prefix="import.") as tmp:
        plain = Path(tmp) / "archive.tar"
        fingerprint = decrypt_file(archive, plain, secret)
        out = Path(tmp) / "x"
        try:
            with tarfile.open(plain, "r:") as tar:
                _safe_extract(tar, out)
            meta = json.loads((out / "export.json").read_text(encoding="utf-8"))
            rows = [json.loads(line) for line in
                    (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]
            public_key = load_public_key(meta["public_key_pem"])
        except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
            raise VerificationError(f"{archive}: archive content damaged: {exc}") from None
        signer = ledger_key_fingerprint(public_key)
        if expected is not None and signer != expected:
            raise VerificationError(
                f"{archive}: refused: its ledger slice is signed by key {signer[:16]}…, not "
                f"the trusted key {expected[:16]}… ({key_source}); fix: import only archives "
                "of the production ledger, or give its key with --trusted-key")
        problems = verify_entries(rows, public_key, anchor_prev=None, where=f"{archive} ledger")
        attested = {r["subject"]: r["payload"].get("manifest_sha256") for r in rows
                    if r["kind"] == "run"}
        for rid, sha in sorted(meta["runs"].items()):
            if not isinstance(sha, str) or not sha:
                problems.append(Problem("ledger", f"{archive} run {rid}",
                                        "no manifest digest for this run in the archive"))
                continue
            if attested.get(rid) != sha:
                problems.append(Problem("ledger", f"{archive} run {rid}",
                                         "run not attested by the archived ledger slice"))
            problems += verify_record(out / "records" / rid, expected_manifest_sha256=sha)
        if problems:
            raise VerificationError(f"{archive}: refused, {len(problems)} problem(s): "
                                    + "; ".join(map(str, problems)))
        restored, skipped = [], []
        for rid, sha in sorted(meta["runs"].items()):
            target = base / rid
            if target.exists():
                if (target / "manifest.json").exists() and manifest_sha256(target) == sha:
                    skipped.append(rid)
                    continue
                raise PolicyRefusal(f"{target} exists with a different manifest; not "
                                    "overwriting a record")
        for rid in sorted(set(meta["runs"]) - set(skipped)):
            for dirpath, _dirs, files in os.walk(out / "records" / rid):
                for name in files:
                    os.chmod(Path(dirpath) / name, 0o444)
            os.rename(out / "records" / rid, base / rid)
            restored.append(rid)
        slice_dir = led.dir / "imports"
        slice_dir.mkdir(exist_ok=True)
        archive_sha = sha256_file(archive)
        shutil.copyfile(out / "ledger.jsonl", slice_dir / f"{archive_sha}.jsonl")
        payload = {"archive": str(archive), "archive_sha256": archive_sha,
                   "key_fingerprint": fingerprint,
                   "source_key_fingerprint": meta.get("source_key_fingerprint"),
                   "signer_key_fingerprint": signer, "trusted_by": key_source,
                   "runs": meta["runs"], "restored": restored, "skipped": skipped,
                   "ledger_from_seq": meta["ledger_from_seq"],
                   "ledger_to_seq": meta["ledger_to_seq"],
                   "source_head_hash": rows[-1]["hash"] if rows else None}
        led.append("import", archive_sha[:16], payload)
    return payload
