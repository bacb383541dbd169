"""Reading reviews, publications and withdrawals from the ledger, and re-verifying published
copies.

Writing them (approve, reject, publish, withdraw) is :mod:`lora_kernel.trusted.review`. A
``withdrawal`` entry names the publication it ends (``publication_seq``); a withdrawn
publication is no longer checked, except that its folder must be gone.

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import sha256_file
from lora_kernel.provenance.ledger import Entry, LedgerReader
from lora_kernel.provenance.records import Problem

PUBLICATION_FILE = "publication.json"


def review_state(ledger: LedgerReader, run_id: str, adapter_digest: str | None = None,
                 step: int | None = None) -> tuple[str, Entry | None]:
    """``(state, latest review entry)`` of a run's final adapter, or with ``step`` of the
    adapter it saved at that step (``lora review approve RUN --step N``): each has reviews of
    its own, so approving step 6 leaves the final adapter pending. State is pending,
    approved, rejected, or void (an approval whose digest differs from ``adapter_digest``,
    that adapter's current digest)."""
    entry = next((e for e in reversed(ledger.entries("review", run_id))
                  if e.payload.get("step") == step), None)
    if entry is None:
        return "pending", None
    decision = str(entry.payload.get("decision"))
    if decision == "approved" and adapter_digest is not None \
            and entry.payload.get("adapter_digest") != adapter_digest:
        return "void", entry
    return decision, entry


def step_reviews(ledger: LedgerReader, run_id: str) -> dict[int, Entry]:
    """``{step: latest review entry}`` of the adapters a run saved mid-training that a
    reviewer decided on (``--step``), by step."""
    out: dict[int, Entry] = {}
    for e in ledger.entries("review", run_id):
        step = e.payload.get("step")
        if isinstance(step, int):
            out[step] = e
    return dict(sorted(out.items()))


def withdrawals(ledger: LedgerReader) -> dict[int, Entry]:
    """``{publication seq: the withdrawal entry that ended it}``. An entry that names no
    publication of its own run withdraws nothing (that publication stays checked)."""
    published = {e.seq: e.subject for e in ledger.entries("publication")}
    out: dict[int, Entry] = {}
    for e in ledger.entries("withdrawal"):
        seq = e.payload.get("publication_seq")
        if isinstance(seq, int) and published.get(seq) == e.subject:
            out.setdefault(seq, e)
    return out


def publications(ledger: LedgerReader, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every publication entry's payload plus ``seq``, ``expired`` (past its expiry date) and
    ``withdrawn`` (the seq of the withdrawal entry, or None while it is published)."""
    today = (now or dt.datetime.now(dt.UTC)).date()
    ended = withdrawals(ledger)
    out = []
    for e in ledger.entries("publication"):
        expired = dt.date.fromisoformat(e.payload["expires"]) < today \
            if e.payload.get("expires") else False
        gone = ended.get(e.seq)
        out.append({**e.payload, "seq": e.seq, "expired": expired,
                    "withdrawn": gone.seq if gone is not None else None})
    return out


def _still_there(pub: dict[str, Any]) -> list[Problem]:
    """A withdrawn publication whose copy is still at its path (its publication.json unchanged):
    the withdrawal did not take, or the folder was put back."""
    meta = Path(pub["path"]) / PUBLICATION_FILE
    if meta.is_file() and sha256_file(meta) == pub.get("metadata_sha256"):
        return [Problem("publication", str(meta.parent),
                        f"run {pub['run_id']}'s publication (seq {pub['seq']}) was withdrawn "
                        f"(seq {pub['withdrawn']}) but its folder is still there")]
    return []


def verify_publications(ledger: LedgerReader, run_id: str | None = None) -> list[Problem]:
    """Re-hash published copies against their ledger entries; also flag publications whose
    run's approval was later revoked or voided. Withdrawn publications are skipped (a folder
    that is gone is what a withdrawal leaves), unless the withdrawn copy is still there."""
    problems = []
    for pub in publications(ledger):
        if run_id is not None and pub.get("run_id") != run_id:
            continue
        if pub["withdrawn"] is not None:
            problems += _still_there(pub)
            continue
        dest = Path(pub["path"])
        if not dest.is_dir():
            problems.append(Problem("publication", str(dest), "published folder missing"))
            continue
        present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
        for rel, digest in sorted(pub["files"].items()):
            if rel not in present:
                problems.append(Problem("publication", str(dest / rel), "published file missing"))
            elif sha256_file(dest / rel) != digest:
                problems.append(Problem("publication", str(dest / rel),
                                        "published file changed (sha256 differs from the "
                                        "ledger)"))
        for rel in sorted(present - set(pub["files"]) - {PUBLICATION_FILE}):
            problems.append(Problem("publication", str(dest / rel), "extra file in publication"))
        meta = dest / PUBLICATION_FILE
        if PUBLICATION_FILE not in present or sha256_file(meta) != pub.get("metadata_sha256"):
            problems.append(Problem("publication", str(meta),
                                    "publication.json missing or edited"))
        state, entry = review_state(ledger, pub["run_id"], pub["adapter_digest"],
                                    pub.get("step"))
        if state != "approved":
            problems.append(Problem("publication", str(dest),
                                    f"run {pub['run_id']} is published but its review is now "
                                    f"{state} (seq {entry.seq if entry else '-'})"))
    return problems
