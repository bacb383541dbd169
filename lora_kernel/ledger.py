"""The audit ledger: an append-only, hash-chained log in SQLite with Ed25519-signed checkpoints.

Every entry has ``seq`` (1, 2, ...), ``time`` (ISO UTC), ``kind`` (one of :data:`KINDS`),
``subject`` (usually a run id), ``payload`` (a JSON object, stored canonically), ``prev_hash``
(the previous entry's hash; 64 zeros for the first) and
``hash = sha256(canonical([seq, time, kind, subject, payload, prev_hash]))``.

Tamper evidence, in layers:

* the chain: an edited entry no longer matches its hash; a deleted or reordered entry breaks
  the ``prev_hash`` links (:func:`verify_entries` says which seq and how);
* checkpoints: every ``checkpoint_every`` entries (and on demand) a ``checkpoint`` entry signs
  ``(upto_seq, head_hash)`` with the ledger's Ed25519 key (``<ledger dir>/signing_key.pem``,
  mode 0600, made on first use; its public key fingerprint is in each checkpoint), so re-hashing
  the whole chain after an edit is caught without the key;
* a signed head (seq and hash of the newest entry, table ``head``, rewritten in the same
  transaction as each append) catches deleted *trailing* entries, which a chain alone cannot
  see.

SQLite triggers refuse UPDATE and DELETE, against accidents; the chain is what proves it.
"""
from __future__ import annotations

import base64
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lora_kernel.errors import PolicyRefusal, VerificationError
from lora_kernel.home import lora_home
from lora_kernel.records import (Problem, canonical_json, iso_time, load_manifest,
                                 manifest_sha256, sha256_bytes, summary)
from lora_kernel.version import __version__

KINDS = ("run", "review", "publication", "prune", "export", "import", "checkpoint")
GENESIS = "0" * 64
DEFAULT_CHECKPOINT_EVERY = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL, signature TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_subject ON entries (subject, kind);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


@dataclass(frozen=True)
class Entry:
    """One ledger entry (``payload`` parsed)."""

    seq: int
    time: str
    kind: str
    subject: str
    payload: dict
    prev_hash: str
    hash: str

    def to_dict(self) -> dict:
        """Plain data (as exported in ledger slices)."""
        return asdict(self)


def entry_hash(seq: int, time: str, kind: str, subject: str, payload: dict,
               prev_hash: str) -> str:
    """The hash of an entry: sha256 of canonical JSON ``[seq, time, kind, subject, payload,
    prev_hash]``."""
    return sha256_bytes(canonical_json([seq, time, kind, subject, payload, prev_hash]))


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """The public key as PEM text (SubjectPublicKeyInfo)."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key; :class:`VerificationError` if it is not one."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError("the ledger public key is not an Ed25519 key")
    return key


def _checkpoint_message(upto_seq: int, head_hash: str) -> bytes:
    return canonical_json({"ledger": "lora-enclave", "upto_seq": upto_seq, "head_hash": head_hash})


def _head_message(seq: int, head_hash: str) -> bytes:
    return canonical_json({"ledger-head": "lora-enclave", "seq": seq, "hash": head_hash})


def _sig_ok(key: Ed25519PublicKey, signature_b64: str, message: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _relocated(row: dict, lo: int, hi: int) -> int | None:
    """If the row's stored hash matches its content under another seq, return that seq."""
    for seq in range(lo, hi + 1):
        if seq != row["seq"] and entry_hash(seq, row["time"], row["kind"], row["subject"],
                                            row["payload"], row["prev_hash"]) == row["hash"]:
            return seq
    return None


def verify_entries(rows: list[dict], public_key: Ed25519PublicKey | None, *,
                   anchor_prev: str | None = GENESIS, where: str = "ledger") -> list[Problem]:
    """Check a run of entries (dicts with parsed ``payload``), sorted by seq.

    Reports per seq: a gap (deleted entries), content that does not match its hash (edited),
    an entry found at another position (reordered), a broken ``prev_hash`` link, and checkpoints
    whose signature, key or head hash is wrong. ``anchor_prev`` is the expected ``prev_hash`` of
    the first row (None: accept it, for a slice that starts mid-ledger).
    """
    problems: list[Problem] = []
    by_hash = {row["hash"]: row["seq"] for row in rows}
    seq_hash = {row["seq"]: row["hash"] for row in rows}
    fingerprint = key_fingerprint(public_key) if public_key is not None else None
    first_seq = rows[0]["seq"] if rows else 1
    expected_seq = rows[0]["seq"] if rows and anchor_prev is None else 1
    prev_hash = anchor_prev
    prev_flagged = False  # the previous row was already reported: its link is explained
    for row in rows:
        seq = row["seq"]
        at = f"{where} seq {seq}"
        if seq > expected_seq:
            gap = f"{expected_seq}" if seq - expected_seq == 1 else f"{expected_seq}-{seq - 1}"
            problems.append(Problem("deleted", f"{where} seq {gap}",
                                    f"entr{'y' if seq - expected_seq == 1 else 'ies'} missing "
                                    f"(deleted); seq jumps from {expected_seq - 1} to {seq}"))
        if row["kind"] not in KINDS:
            problems.append(Problem("edited", at, f"unknown kind {row['kind']!r}"))
        recomputed = entry_hash(seq, row["time"], row["kind"], row["subject"], row["payload"],
                                row["prev_hash"])
        flagged = recomputed != row["hash"]
        if flagged:
            moved = _relocated(row, max(1, seq - 8), seq + 8)
            if moved is not None:
                problems.append(Problem("reordered", at,
                                        f"entry written as seq {moved} now stands at seq {seq}"))
            else:
                problems.append(Problem("edited", at,
                                        f"{row['kind']} entry for {row['subject']!r}: content "
                                        "does not match its hash (entry edited)"))
        elif (prev_hash is not None and row["prev_hash"] != prev_hash and seq == expected_seq
              and not prev_flagged):
            linked = by_hash.get(row["prev_hash"])
            if linked is not None:
                problems.append(Problem("reordered", at,
                                        f"chains after seq {linked}, not seq {seq - 1} "
                                        "(entries reordered)"))
            else:
                problems.append(Problem("edited", f"{where} seq {seq - 1}",
                                        f"entry edited and re-hashed (or replaced): seq {seq} "
                                        "links to a different hash"))
        if row["kind"] == "checkpoint" and public_key is not None:
            problems += _verify_checkpoint(row, public_key, fingerprint, seq_hash, first_seq, at)
        prev_hash = row["hash"]
        prev_flagged = flagged
        expected_seq = seq + 1
    return problems


def _verify_checkpoint(row, public_key, fingerprint, seq_hash, first, at) -> list[Problem]:
    p = row["payload"]
    if p.get("key_fingerprint") != fingerprint:
        return [Problem("signature", at, f"checkpoint signed by unknown key "
                                         f"{str(p.get('key_fingerprint'))[:16]}… (trusted: "
                                         f"{fingerprint[:16]}…)")]
    try:
        upto, head = int(p["upto_seq"]), str(p["head_hash"])
        message = _checkpoint_message(upto, head)
    except (KeyError, TypeError, ValueError):
        return [Problem("signature", at, "malformed checkpoint payload")]
    if not _sig_ok(public_key, p.get("signature", ""), message):
        return [Problem("signature", at, f"checkpoint signature over seq 1-{upto} is invalid")]
    if upto >= first and seq_hash.get(upto) != head:  # a slice may start after ``upto``
        return [Problem("signature", at, f"signed head hash of seq {upto} does not match the "
                                         f"entry stored at seq {upto} (history rewritten)")]
    return []


class Ledger:
    """The ledger at ``path`` (default ``<home>/ledger/ledger.sqlite``).

    ``checkpoint_every``: a signed checkpoint is appended after that many entries (0: only on
    demand). ``trusted_public_key``: a PEM file to verify checkpoints with (default: the key
    beside the ledger). ``durable=False`` skips SQLite's fsync per append (benchmarks, tests).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, home=None,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 trusted_public_key: str | os.PathLike | None = None, durable: bool = True):
        self.path = Path(path) if path else lora_home(home) / "ledger" / "ledger.sqlite"
        self.dir = self.path.parent
        self.key_path = self.dir / "signing_key.pem"
        self.pub_path = self.dir / "signing_key.pub"
        self.checkpoint_every = int(checkpoint_every)
        self.trusted_public_key = Path(trusted_public_key) if trusted_public_key else None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.executescript(_SCHEMA)
        if not durable:
            self._db.execute("PRAGMA synchronous = OFF")
        self._key: Ed25519PrivateKey | None = None

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- keys -------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 signing key, created (mode 0600, public half beside it) on first use."""
        if self._key is not None:
            return self._key
        if not self.key_path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first: load theirs below
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
                self.pub_path.write_text(public_key_pem(key.public_key()), encoding="utf-8")
        if os.stat(self.key_path).st_mode & 0o077:
            raise VerificationError(f"{self.key_path}: signing key is readable or writable by "
                                    "others; fix: chmod 600")
        loaded = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise VerificationError(f"{self.key_path}: not an Ed25519 private key")
        self._key = loaded
        return loaded

    def public_key(self) -> Ed25519PublicKey | None:
        """The key checkpoints are verified with: ``trusted_public_key``, else the public file
        beside the ledger, else the private key's public half; None if there is none yet."""
        for path in (self.trusted_public_key, self.pub_path):
            if path is not None and path.exists():
                return load_public_key(path.read_bytes())
        if self.key_path.exists():
            return self.signing_key().public_key()
        return None

    def fingerprint(self) -> str | None:
        """Fingerprint of the verifying public key (None before the first signature)."""
        key = self.public_key()
        return key_fingerprint(key) if key is not None else None

    # -- writing ----------------------------------------------------------------------------
    def append(self, kind: str, subject: str, payload: dict) -> Entry:
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

    def _append(self, kind: str, subject: str, payload: dict) -> Entry:
        if kind not in KINDS:
            raise VerificationError(f"unknown ledger entry kind {kind!r} (one of {KINDS})")
        payload = json.loads(canonical_json({**payload, "lora_enclave": __version__}))
        self.signing_key()  # make sure head and checkpoints can be signed before writing
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                                   ).fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            time = iso_time(None)
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

    def append_run(self, record_dir: str | os.PathLike) -> Entry:
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

    # -- reading ----------------------------------------------------------------------------
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry; ``(0, GENESIS)`` when empty."""
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _rows(self, where: str = "", params: tuple = ()) -> list[dict]:
        cur = self._db.execute("SELECT seq, time, kind, subject, payload, prev_hash, hash "
                               f"FROM entries {where} ORDER BY seq", params)
        out = []
        for seq, time, kind, subject, payload, prev_hash, digest in cur:
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = {"_unparseable": payload}
            out.append({"seq": seq, "time": time, "kind": kind, "subject": subject,
                        "payload": parsed, "prev_hash": prev_hash, "hash": digest})
        return out

    def entries(self, kind: str | None = None, subject: str | None = None,
                from_seq: int = 1) -> list[Entry]:
        """Entries in seq order, optionally of one kind / subject, from ``from_seq`` on."""
        clauses, params = ["seq >= ?"], [from_seq]
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        if subject is not None:
            clauses.append("subject = ?")
            params.append(subject)
        return [Entry(**r) for r in self._rows("WHERE " + " AND ".join(clauses), tuple(params))]

    def latest(self, kind: str, subject: str) -> Entry | None:
        """The newest entry of ``kind`` for ``subject``, or None."""
        found = self.entries(kind, subject)
        return found[-1] if found else None

    def run_entry(self, run_id: str) -> Entry | None:
        """The ``run`` entry of a run id, or None."""
        found = self.entries("run", run_id)
        return found[0] if found else None

    def expected_manifest_sha256(self, run_id: str) -> tuple[str, int] | None:
        """``(manifest sha256, seq of the entry that attests it)`` for a run: its ``run``
        entry, else the newest ``import`` entry that brought it in; None if neither exists."""
        entry = self.run_entry(run_id)
        if entry is not None:
            return entry.payload.get("manifest_sha256"), entry.seq
        for imp in reversed(self.entries("import")):
            sha = imp.payload.get("runs", {}).get(run_id)
            if sha:
                return sha, imp.seq
        return None

    def slice_rows(self, from_seq: int) -> list[dict]:
        """Entries from ``from_seq`` to the head as plain dicts (for exports)."""
        return self._rows("WHERE seq >= ?", (from_seq,))

    # -- verifying --------------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Verify the chain, every checkpoint signature and the signed head; return problems."""
        rows = self._rows()
        key = self.public_key()
        where = str(self.path)
        if key is None:
            return ([Problem("signature", where, "entries present but no signing key to "
                                                 "verify them with")] if rows else [])
        problems = verify_entries(rows, key, where=where)
        problems += self._verify_head(rows, key)
        return problems

    def _verify_head(self, rows: list[dict], key: Ed25519PublicKey) -> list[Problem]:
        where = f"{self.path} head"
        head = self._db.execute("SELECT seq, hash, signature FROM head WHERE id = 1").fetchone()
        if head is None:
            return [Problem("signature", where, "signed head missing")] if rows else []
        seq, digest, signature = head
        if not _sig_ok(key, signature, _head_message(seq, digest)):
            return [Problem("signature", where, "signed head has an invalid signature")]
        last = rows[-1]["seq"] if rows else 0
        stored = {r["seq"]: r["hash"] for r in rows}
        if seq > last:
            return [Problem("deleted", f"{self.path} seq {last + 1}-{seq}",
                            f"trailing entries deleted: the signed head is seq {seq}, "
                            f"the ledger ends at seq {last}")]
        if stored.get(seq) != digest:
            return [Problem("edited", f"{self.path} seq {seq}",
                            "entry does not match the signed head hash")]
        if seq < last:
            return [Problem("signature", f"{self.path} seq {seq + 1}-{last}",
                            "entries after the signed head (appended without the key)")]
        return []
