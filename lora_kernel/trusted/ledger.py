"""The ledger writer: appends entries and signs checkpoints and the head with the ledger's
Ed25519 key. Only the trusted side (the service account in service mode) runs this.

The key lives at ``<state>/ledger/signing_key.pem`` (mode 0600, made on first use), its public
half beside it (``signing_key.pub``) and its fingerprint in ``pin.json`` (trust on first use;
``policies/ledger.yaml`` ``key_fingerprint`` pins it for the whole platform, and a writer whose
key differs from that pin refuses to sign). Reading and verifying is
:class:`lora_kernel.provenance.ledger.LedgerReader`, which this extends.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import base64
import json
import os
import sqlite3
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lora_kernel.common.digests import canonical_json
from lora_kernel.common.errors import PolicyRefusal, VerificationError
from lora_kernel.common.timeutil import iso_time
from lora_kernel.common.version import __version__
from lora_kernel.provenance.ledger import (
    _SCHEMA,
    GENESIS,
    KEY_NAME,
    KINDS,
    PIN_NAME,
    Entry,
    LedgerReader,
    _checkpoint_message,
    _head_message,
    entry_hash,
    key_fingerprint,
    pinned_fingerprint,
    public_key_pem,
)
from lora_kernel.provenance.records import load_manifest, manifest_sha256, summary

DEFAULT_CHECKPOINT_EVERY = 100


class Ledger(LedgerReader):
    """The ledger at ``path`` (default ``<state>/ledger/ledger.sqlite``), opened for writing.

    ``checkpoint_every``: a signed checkpoint is appended after that many entries (0: only on
    demand). ``durable=False`` skips SQLite's fsync per append (benchmarks, tests).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 state: str | os.PathLike[str] | None = None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, durable: bool = True) -> None:
        self.checkpoint_every = int(checkpoint_every)
        self._durable = durable
        self._key: Ed25519PrivateKey | None = None
        super().__init__(path, state=state)
        self.key_path = self.dir / KEY_NAME

    def _connect(self) -> sqlite3.Connection:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.executescript(_SCHEMA)
        if not self._durable:
            db.execute("PRAGMA synchronous = OFF")
        return db

    # -- keys -------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 signing key, created (mode 0600, public half and pin beside it) on first
        use. Refuses a key readable by others or one that differs from the policy's pin."""
        if self._key is not None:
            return self._key
        if not self.key_path.exists():
            self._create_key()
        if os.stat(self.key_path).st_mode & 0o077:
            raise PolicyRefusal(f"{self.key_path}: signing key is readable or writable by "
                                "others, refusing to sign with it; fix: chmod 600 (and rotate "
                                "the key if others may have read it)")
        loaded = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise VerificationError(f"{self.key_path}: not an Ed25519 private key")
        pin = pinned_fingerprint()
        fp = key_fingerprint(loaded.public_key())
        if pin is not None and fp != pin:
            raise PolicyRefusal(f"{self.key_path}: key {fp[:16]}… is not the key "
                                f"policies/ledger.yaml pins ({pin[:16]}…); refusing to sign")
        self._key = loaded
        return loaded

    def _create_key(self) -> None:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process made it first: load theirs
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        pub = key.public_key()
        self.pub_path.write_text(public_key_pem(pub), encoding="utf-8")
        (self.dir / PIN_NAME).write_text(json.dumps(
            {"key_fingerprint": key_fingerprint(pub), "pinned_at": iso_time(),
             "how": "trust on first use: written when the key was made"}, indent=1) + "\n",
            encoding="utf-8")

    def fingerprint(self) -> str:
        """Fingerprint of the signing key (made on first use)."""
        return key_fingerprint(self.signing_key().public_key())

    # -- writing ----------------------------------------------------------------------------
    def append(self, kind: str, subject: str, payload: dict[str, Any]) -> Entry:
        """Append one entry (payload stamped with the lora_enclave version) and return it.

        Appends a signed checkpoint after it when ``checkpoint_every`` entries have passed
        since the last one.
        """
        entry = self._append(kind, subject, payload)
        if self.checkpoint_every and kind != "checkpoint":
            last_cp = self._db.execute("SELECT MAX(seq) FROM entries WHERE kind='checkpoint'"
                                       ).fetchone()[0] or 0
            if entry.seq - last_cp >= self.checkpoint_every:
                self.checkpoint()
        return entry

    def _append(self, kind: str, subject: str, payload: dict[str, Any]) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown ledger entry kind {kind!r} (one of {KINDS})")
        payload = json.loads(canonical_json({**payload, "lora_enclave": __version__}))
        self.signing_key()  # make sure head and checkpoints can be signed before writing
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                                   ).fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            time = iso_time()
            digest = entry_hash(seq, time, kind, subject, payload, prev)
            self._db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?)",
                             (seq, time, kind, subject, canonical_json(payload).decode(), prev,
                              digest))
            self._write_head(seq, digest)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return Entry(seq, time, kind, subject, payload, prev, digest)

    def _write_head(self, seq: int, digest: str) -> None:
        key = self.signing_key()
        sig = base64.b64encode(key.sign(_head_message(seq, digest))).decode()
        self._db.execute("INSERT OR REPLACE INTO head VALUES (1, ?, ?, ?, ?)",
                         (seq, digest, key_fingerprint(key.public_key()), sig))

    def checkpoint(self) -> Entry:
        """Append a checkpoint signing the current head (seq and hash) and return it."""
        key = self.signing_key()
        upto, head = self.head()
        sig = key.sign(_checkpoint_message(upto, head))
        return self._append("checkpoint", "ledger", {
            "upto_seq": upto, "head_hash": head, "algorithm": "Ed25519",
            "key_fingerprint": key_fingerprint(key.public_key()),
            "signature": base64.b64encode(sig).decode()})

    def append_run(self, record_dir: str | os.PathLike[str]) -> Entry:
        """Record a sealed run: manifest sha256, adapter digest and the inputs' digests.

        Raises :class:`PolicyRefusal` when the run already has a run entry.
        """
        manifest = load_manifest(record_dir)
        s = summary(manifest)
        if self.run_entry(s["run_id"]) is not None:
            raise PolicyRefusal(f"run {s['run_id']} is already in the ledger")
        return self.append("run", s["run_id"], {
            "manifest_sha256": manifest_sha256(record_dir), "adapter_digest": s["adapter_digest"],
            "user": s["user"], "status": s["status"], "started": s["started"],
            "ended": s["ended"], "dataset_version": s["dataset_version"],
            "base_model_sha256": s["base_model_sha256"],
            "notebook_source_sha256": s["notebook_source_sha256"]})

