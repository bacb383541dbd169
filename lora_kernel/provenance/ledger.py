"""The audit ledger, read-only: the entry format, chain and signature verification, and the
trust root (the pinned public key). The writer and the signing key are
:mod:`lora_kernel.trusted.ledger`; nothing here loads a private key.

The ledger is an append-only, hash-chained log in SQLite with Ed25519-signed checkpoints.

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

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self, TypeVar, overload

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lora_kernel.common.digests import canonical_json, sha256_bytes
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.paths import ledger_path
from lora_kernel.common.policy import load_policy, policy_path
from lora_kernel.provenance.records import Problem

# kernel_events: one entry per batch of kernel execution-log events the hub's audit service
# accepted (subject: the kernel id; the events themselves are in <state>/hub/events.sqlite).
# replay: a `lora audit replay` of a run (subject: the replayed run; payload: the replay's run
# id and the verdict).
KINDS = ("run", "review", "publication", "withdrawal", "prune", "export", "import", "checkpoint",
         "kernel_events", "replay")
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
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data (as exported in ledger slices)."""
        return asdict(self)


def entry_hash(seq: int, time: str, kind: str, subject: str, payload: dict[str, Any],
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


def _parse_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key; ``ValueError`` saying what it is instead."""
    data = pem.encode() if isinstance(pem, str) else bytes(pem)
    if b"PRIVATE KEY-----" in data:
        raise ValueError("this is a private key, not the public key (keep it secret; the "
                         "public half is signing_key.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key (a {type(key).__name__.lstrip('_')})")
    return key


def load_public_key(pem: str | bytes, where: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key; :class:`VerificationError` naming ``where`` if it is
    not one (garbage, another algorithm, a private key)."""
    try:
        return _parse_public_key(pem)
    except ValueError as exc:
        raise VerificationError(f"{where}: {exc}") from None


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


def _relocated(row: dict[str, Any], lo: int, hi: int) -> int | None:
    """If the row's stored hash matches its content under another seq, return that seq."""
    for seq in range(lo, hi + 1):
        if seq != row["seq"] and entry_hash(seq, row["time"], row["kind"], row["subject"],
                                            row["payload"], row["prev_hash"]) == row["hash"]:
            return seq
    return None


def verify_entries(rows: list[dict[str, Any]], public_key: Ed25519PublicKey | None, *,
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
        if row["kind"] == "checkpoint" and public_key is not None and fingerprint is not None:
            problems += _verify_checkpoint(row, public_key, fingerprint, seq_hash, first_seq, at)
        prev_hash = row["hash"]
        prev_flagged = flagged
        expected_seq = seq + 1
    return problems


def _verify_checkpoint(row: dict[str, Any], public_key: Ed25519PublicKey, fingerprint: str,
                       seq_hash: dict[int, str], first: int, at: str) -> list[Problem]:
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


PUB_NAME = "signing_key.pub"
KEY_NAME = "signing_key.pem"
PIN_NAME = "pin.json"


@dataclass(frozen=True)
class TrustRoot:
    """The public key a ledger is verified against, and why it is trusted.

    ``source`` is ``trusted-key FILE`` (given by the auditor), ``policy pin``
    (``policies/ledger.yaml`` ``key_fingerprint``), ``state pin`` (``pin.json`` written when the
    key was made: trust on first use) or ``unpinned`` (the key beside the ledger, nothing else).
    ``problems`` are pin mismatches: a ledger whose key differs from its pin.
    """

    key: Ed25519PublicKey | None
    source: str
    fingerprint: str | None
    problems: tuple[Problem, ...] = ()


def pinned_fingerprint() -> str | None:
    """The fingerprint ``policies/ledger.yaml`` pins (``key_fingerprint:``), or None."""
    value = load_policy("ledger", {}).get("key_fingerprint")
    if value in (None, ""):
        return None
    text = str(value).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError("key_fingerprint must be 64 hex digits (`lora audit key` prints it)",
                          file=policy_path("ledger"), key="key_fingerprint")
    return text


def trust_root(ledger_dir: str | os.PathLike[str],
               trusted_key: str | os.PathLike[str] | None = None) -> TrustRoot:
    """Decide which public key verifies the ledger in ``ledger_dir``.

    ``trusted_key`` (``--trusted-key``) must be a readable PEM Ed25519 public key, else
    :class:`ConfigError` (a bad argument, exit 2). Without it, the key beside the ledger is used
    only as far as a pin vouches for it: the policy's ``key_fingerprint``, else the state's
    ``pin.json``; a key that differs from its pin is reported as a ``signature`` problem.
    """
    ldir = Path(ledger_dir)
    if trusted_key is not None:
        path = Path(trusted_key)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the trusted key: {exc.strerror or exc}; fix: give "
                              "the ledger's public key PEM (`lora audit key --pem` prints it)",
                              file=path) from None
        try:
            key = _parse_public_key(data)
        except ValueError as exc:
            raise ConfigError(f"{exc}; fix: give the ledger's public key PEM "
                              "(`lora audit key --pem` prints it)", file=path) from None
        return TrustRoot(key, f"trusted-key {path}", key_fingerprint(key))
    pub = ldir / PUB_NAME
    pin, source = pinned_fingerprint(), "policy pin"
    beside = None
    if pub.is_file():
        try:
            beside = _parse_public_key(pub.read_bytes())
        except (OSError, ValueError) as exc:
            what = exc.strerror if isinstance(exc, OSError) else str(exc)
            return TrustRoot(None, source if pin is not None else "unpinned", pin, (Problem(
                "signature", str(pub), f"the public key beside the ledger is unusable: "
                f"{what}"),))
    fp = key_fingerprint(beside) if beside is not None else None
    if pin is None:
        pin_file = ldir / PIN_NAME
        if pin_file.is_file():
            try:
                pin = str(json.loads(pin_file.read_text(encoding="utf-8"))["key_fingerprint"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return TrustRoot(None, "state pin", None, (Problem(
                    "signature", str(pin_file), f"pin file unreadable or malformed: {exc}"),))
            source = "state pin"
    if pin is None:
        return TrustRoot(beside, "unpinned", fp)
    if fp != pin:
        what = "no public key beside the ledger" if fp is None else f"key {fp[:16]}…"
        return TrustRoot(None, source, pin, (Problem(
            "signature", str(pub), f"{what} is not the pinned ledger key {pin[:16]}… "
            f"({source}); the ledger was re-keyed or replaced"),))
    return TrustRoot(beside, source, pin)


class LedgerReader:
    """Read-only view of the ledger at ``path`` (default ``<state>/ledger/ledger.sqlite``).

    Opens SQLite read-only (``mode=ro``): verifying never writes, never creates a key, and
    works on a copy of the ledger on a machine without the private key.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 state: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else ledger_path(state)
        self.dir = self.path.parent
        self.pub_path = self.dir / PUB_NAME
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise ConfigError(f"no ledger at {self.path}; fix: pass --state (the state "
                              "directory that holds ledger/ and runs/)")
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                             timeout=30)
        return db

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry; ``(0, GENESIS)`` when empty."""
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _rows(self, where: str = "", params: tuple[object, ...] = ()) -> list[dict[str, Any]]:
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
        clauses: list[str] = ["seq >= ?"]
        params: list[object] = [from_seq]
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
        entry, else the newest ``import`` entry that brought it in; None if neither exists
        (an entry without a digest attests nothing)."""
        entry = self.run_entry(run_id)
        if entry is not None:
            sha = entry.payload.get("manifest_sha256")
            if isinstance(sha, str) and sha:
                return sha, entry.seq
        for imp in reversed(self.entries("import")):
            sha = imp.payload.get("runs", {}).get(run_id)
            if isinstance(sha, str) and sha:
                return sha, imp.seq
        return None

    def slice_rows(self, from_seq: int) -> list[dict[str, Any]]:
        """Entries from ``from_seq`` to the head as plain dicts (for exports)."""
        return self._rows("WHERE seq >= ?", (from_seq,))

    # -- verifying --------------------------------------------------------------------------
    def verify(self, trusted_key: str | os.PathLike[str] | None = None) -> list[Problem]:
        """Verify the chain, every checkpoint signature and the signed head against the trust
        root (:func:`trust_root`); return the problems (empty: the ledger verifies)."""
        rows = self._rows()
        root = trust_root(self.dir, trusted_key)
        where = str(self.path)
        if root.key is None:
            if root.problems:
                return list(root.problems)
            return ([Problem("signature", where, "entries present but no public key to "
                                                 "verify them with")] if rows else [])
        problems = verify_entries(rows, root.key, where=where)
        problems += self._verify_head(rows, root.key)
        return problems

    def _verify_head(self, rows: list[dict[str, Any]], key: Ed25519PublicKey) -> list[Problem]:
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


_L = TypeVar("_L", bound=LedgerReader)


@overload
def open_ledger(ledger: LedgerReader | None = None, state: str | os.PathLike[str] | None = None,
                ) -> contextlib.AbstractContextManager[LedgerReader]: ...


@overload
def open_ledger(ledger: _L | None, state: str | os.PathLike[str] | None,
                factory: Callable[..., _L]) -> contextlib.AbstractContextManager[_L]: ...


@contextlib.contextmanager
def open_ledger(ledger: LedgerReader | None = None, state: str | os.PathLike[str] | None = None,
                factory: Callable[..., LedgerReader] = LedgerReader) -> Iterator[Any]:
    """Yield ``ledger`` or, when None, ``factory(state=state)`` (a :class:`LedgerReader`, or the
    trusted writer) closed afterwards: the one way every command opens the ledger.

    Typed by ``factory``: ``open_ledger(ledger, state, Ledger)`` yields a ``Ledger``."""
    if ledger is not None:
        yield ledger
        return
    led = factory(state=state)
    try:
        yield led
    finally:
        led.close()
