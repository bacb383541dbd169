"""Review and publication: approve or reject a run's adapter, publish approved adapters.

Rules (``policies/review.yaml``; ``policies/publication.yaml`` may override ``publication``):

* the reviewer must be in the reviewers group (a real OS group, via :mod:`grp`, or the policy's
  ``members:`` list for single-user setups) and, to approve, must not be the run's trainer;
* an approval is a ledger ``review`` entry bound to the adapter digest (sha256 over the adapter
  files' digests, :func:`lora_kernel.records.adapter_digest_of`): a changed adapter voids it and
  an approval replayed onto another run or digest is refused at publication;
* :func:`publish` copies only approved, verified adapter files under a chosen name, with a
  ``publication.json`` (access groups, expiry date from policy) and a ``publication`` ledger
  entry; :func:`verify_publications` re-hashes the published copies.

The acting user is ``$LORA_USER`` if set (tests, the runs service acting for a user), else the
login name (:func:`getpass.getuser`).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import grp
import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from lora_kernel.data import sha256_file
from lora_kernel.errors import PolicyRefusal, VerificationError
from lora_kernel.home import lora_home
from lora_kernel.ledger import Entry, Ledger
from lora_kernel.policy import load_policy
from lora_kernel.records import (Problem, adapter_digest_of, check_run_id, file_role, iso_time,
                                 load_manifest, summary, verify_record)
from lora_kernel.version import __version__

REVIEW_DEFAULTS = {"reviewers_group": "lora-reviewers", "members": [],
                   "allow_self_approval": False}
PUBLICATION_DEFAULTS = {"access_groups": [], "expiry_days": 180}
PUBLICATION_FILE = "publication.json"


def current_user() -> str:
    """The acting user: ``$LORA_USER`` if set, else the login name."""
    return os.environ.get("LORA_USER") or getpass.getuser()


def review_policy() -> dict:
    """``policies/review.yaml`` over :data:`REVIEW_DEFAULTS`."""
    return load_policy("review", REVIEW_DEFAULTS)


def publication_policy() -> dict:
    """Access groups and expiry for publications: ``publication:`` in review.yaml, overridden
    key by key by ``policies/publication.yaml`` if that exists."""
    merged = dict(PUBLICATION_DEFAULTS)
    merged.update(review_policy().get("publication") or {})
    merged.update(load_policy("publication"))
    return merged


def is_reviewer(user: str, policy: dict | None = None) -> bool:
    """Whether ``user`` is in the reviewers group (OS group members, the group as primary
    group, or the policy's ``members:`` list)."""
    policy = policy if policy is not None else review_policy()
    if user in (policy.get("members") or []):
        return True
    group = policy.get("reviewers_group")
    if not group:
        return False
    try:
        gr = grp.getgrnam(group)
    except KeyError:
        return False
    if user in gr.gr_mem:
        return True
    try:
        return pwd.getpwnam(user).pw_gid == gr.gr_gid
    except KeyError:
        return False


@contextlib.contextmanager
def open_ledger(ledger: Ledger | None, home=None):
    """Yield ``ledger`` or, when None, a Ledger of ``home`` closed afterwards."""
    if ledger is not None:
        yield ledger
        return
    led = Ledger(home=home)
    try:
        yield led
    finally:
        led.close()


def record_path(run_id: str, home=None) -> Path:
    """``<home>/runs/<run_id>``."""
    return lora_home(home) / "runs" / check_run_id(run_id)


def verified_summary(run_id: str, ledger: Ledger, home=None) -> dict:
    """The manifest summary of a run whose files verify against its manifest and whose
    manifest matches the ledger; :class:`VerificationError` listing the problems otherwise."""
    expected = ledger.expected_manifest_sha256(run_id)
    if expected is None:
        raise VerificationError(f"run {run_id} has no entry in the ledger")
    record = record_path(run_id, home)
    problems = verify_record(record, expected_manifest_sha256=expected[0])
    if problems:
        raise VerificationError(f"run {run_id} does not verify: "
                                + "; ".join(map(str, problems)))
    return summary(load_manifest(record))


def review_state(ledger: Ledger, run_id: str, adapter_digest: str | None = None
                 ) -> tuple[str, Entry | None]:
    """``(state, latest review entry)``; state is pending, approved, rejected, or void (an
    approval whose digest differs from ``adapter_digest``, the adapter's current digest)."""
    entry = ledger.latest("review", run_id)
    if entry is None:
        return "pending", None
    decision = entry.payload.get("decision")
    if decision == "approved" and adapter_digest is not None \
            and entry.payload.get("adapter_digest") != adapter_digest:
        return "void", entry
    return decision, entry


def _review(run_id: str, decision: str, note: str, user, home, ledger) -> Entry:
    user = user or current_user()
    policy = review_policy()
    with open_ledger(ledger, home) as led:
        if not is_reviewer(user, policy):
            raise PolicyRefusal(f"{user} may not review: not in the reviewers group "
                                f"{policy.get('reviewers_group')!r} (policies/review.yaml); fix: an admin adds "
                                f"{user} to that OS group, or to `members:` in that policy "
                                f"on a single-user machine")
        s = verified_summary(run_id, led, home)
        if decision == "approved" and s["user"] == user and not policy.get("allow_self_approval"):
            raise PolicyRefusal(f"{user} trained run {run_id} and may not approve it "
                                "(self-approval); ask another reviewer")
        return led.append("review", run_id, {
            "decision": decision, "reviewer": user, "note": note, "trainer": s["user"],
            "adapter_digest": s["adapter_digest"],
            "manifest_sha256": led.expected_manifest_sha256(run_id)[0]})


def approve(run_id: str, note: str = "", *, user: str | None = None, home=None,
            ledger: Ledger | None = None) -> Entry:
    """Approve a run's adapter (bound to its current digest); returns the ledger entry.

    Raises :class:`PolicyRefusal` (not a reviewer, self-approval) or
    :class:`VerificationError` (the record does not verify).
    """
    return _review(run_id, "approved", note, user, home, ledger)


def reject(run_id: str, note: str = "", *, user: str | None = None, home=None,
           ledger: Ledger | None = None) -> Entry:
    """Reject a run's adapter (also revokes an earlier approval); returns the ledger entry."""
    return _review(run_id, "rejected", note, user, home, ledger)


def check_approved(run_id: str, s: dict, ledger: Ledger) -> Entry:
    """The approval entry that lets ``run_id`` (summary ``s``) be published, or
    :class:`PolicyRefusal` saying why not (pending, rejected, replayed/void, self-approved)."""
    state, entry = review_state(ledger, run_id, s["adapter_digest"])
    if state == "void":
        raise PolicyRefusal(
            f"the approval of run {run_id} (ledger seq {entry.seq}) is bound to adapter digest "
            f"{str(entry.payload.get('adapter_digest'))[:16]}… but the adapter's digest is "
            f"{s['adapter_digest'][:16]}… (adapter changed or approval replayed)")
    if state != "approved":
        raise PolicyRefusal(f"run {run_id} is not approved (review state: {state})")
    reviewer = entry.payload.get("reviewer")
    policy = review_policy()
    if reviewer == s["user"] and not policy.get("allow_self_approval"):
        raise PolicyRefusal(f"the approval of run {run_id} (seq {entry.seq}) is a "
                            "self-approval")
    if not is_reviewer(str(reviewer), policy):
        raise PolicyRefusal(f"the approval of run {run_id} (seq {entry.seq}) is by "
                            f"{reviewer!r}, who is not a reviewer")
    return entry


def publish(run_id: str, to_dir: str | os.PathLike, name: str | None = None, *,
            user: str | None = None, home=None, ledger: Ledger | None = None) -> Path:
    """Copy an approved, verified run's adapter files to ``to_dir/<name>``; return that path.

    Writes ``publication.json`` (run, digests, access groups and expiry date from policy) and a
    ``publication`` ledger entry. The folder appears by one rename. Raises
    :class:`PolicyRefusal` (not approved, approval void, name taken) or
    :class:`VerificationError` (record does not verify, copy differs).
    """
    name = check_run_id(name or run_id)
    user = user or current_user()
    with open_ledger(ledger, home) as led:
        s = verified_summary(run_id, led, home)
        approval = check_approved(run_id, s, led)
        if not s["adapter_files"]:
            raise PolicyRefusal(f"run {run_id} has no adapter files to publish")
        to = Path(to_dir).resolve()
        to.mkdir(parents=True, exist_ok=True)
        dest = to / name
        if dest.exists():
            raise PolicyRefusal(f"{dest} already exists; publications are immutable")
        record = record_path(run_id, home)
        policy = publication_policy()
        now = dt.datetime.now(dt.timezone.utc)
        expires = (now + dt.timedelta(days=int(policy["expiry_days"]))).date().isoformat()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=to))
        files = {}
        for rel in s["adapter_files"]:
            out_rel = rel[len("adapter/"):] if rel.startswith("adapter/") else rel
            out = tmp / out_rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record / rel, out)
            digest = sha256_file(out)
            if digest != s["files"][rel]:
                shutil.rmtree(tmp)
                raise VerificationError(f"{record / rel}: changed while being published")
            files[out_rel] = digest
            os.chmod(out, 0o444)
        meta = {"run_id": run_id, "name": name, "adapter_digest": s["adapter_digest"],
                "files": files, "access_groups": list(policy.get("access_groups") or []),
                "expires": expires, "published_at": iso_time(now), "published_by": user,
                "approval_seq": approval.seq, "lora_enclave": __version__}
        (tmp / PUBLICATION_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
        os.chmod(tmp / PUBLICATION_FILE, 0o444)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
        try:
            led.append("publication", run_id, {
                **meta, "path": str(dest), "metadata_sha256": sha256_file(dest / PUBLICATION_FILE)})
        except BaseException:
            shutil.rmtree(dest)  # never a publication the ledger does not know of
            raise
    return dest


def publications(ledger: Ledger, now: dt.datetime | None = None) -> list[dict]:
    """Every publication entry's payload plus ``seq`` and ``expired`` (past its expiry date)."""
    today = (now or dt.datetime.now(dt.timezone.utc)).date()
    out = []
    for e in ledger.entries("publication"):
        expired = dt.date.fromisoformat(e.payload["expires"]) < today \
            if e.payload.get("expires") else False
        out.append({**e.payload, "seq": e.seq, "expired": expired})
    return out


def verify_publications(ledger: Ledger, run_id: str | None = None) -> list[Problem]:
    """Re-hash published copies against their ledger entries; also flag publications whose
    run's approval was later revoked or voided."""
    problems = []
    for pub in publications(ledger):
        if run_id is not None and pub.get("run_id") != run_id:
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
        state, entry = review_state(ledger, pub["run_id"], pub["adapter_digest"])
        if state != "approved":
            problems.append(Problem("publication", str(dest),
                                    f"run {pub['run_id']} is published but its review is now "
                                    f"{state} (seq {entry.seq if entry else '-'})"))
    return problems


def adapter_digest(record_dir: str | os.PathLike) -> str:
    """The adapter digest of a record as its manifest states it."""
    files = {s["name"]: s["digest"]["sha256"] for s in load_manifest(record_dir)["subject"]
             if file_role(s["name"]) == "adapter"}
    return adapter_digest_of(files)
