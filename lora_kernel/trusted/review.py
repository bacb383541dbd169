"""Review and publication: approve or reject a run's adapter, publish approved adapters.

Rules (``policies/review.yaml``; ``policies/publication.yaml`` may override ``publication``):

* the reviewer must be in the reviewers group (a real OS group, or the policy's ``members:``
  list for single-user setups) and, to approve, must not be the run's trainer under any
  spelling (:meth:`lora_kernel.trusted.identity.Actor.same_person`);
* only a succeeded run with adapter files can be approved;
* an approval is a ledger ``review`` entry bound to the adapter digest (sha256 over the adapter
  files' digests, :func:`lora_kernel.provenance.records.adapter_digest_of`): a changed adapter
  voids it and an approval replayed onto another run or digest is refused at publication;
* :func:`publish` copies only approved, verified adapter files under a chosen name, with a
  ``publication.json`` (access groups, expiry date from policy) and a ``publication`` ledger
  entry; :func:`lora_kernel.provenance.publications.verify_publications` re-hashes the copies;
* :func:`withdraw` ends a publication (a reviewer, or whoever published it): the published
  folder is removed and a ``withdrawal`` ledger entry names the publication it ends, so a
  later rejection need not leave verification failing for good.

Who acts is an :class:`~lora_kernel.trusted.identity.Actor` handed in by the caller (the CLI:
the OS user; the runner service: the socket's peer) — never an environment variable.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import sha256_file
from lora_kernel.common.errors import ConfigError, PolicyRefusal, VerificationError
from lora_kernel.common.paths import check_run_id, runs_dir
from lora_kernel.common.policy import load_policy
from lora_kernel.common.timeutil import iso_time
from lora_kernel.common.version import __version__
from lora_kernel.provenance.ledger import Entry, LedgerReader, open_ledger
from lora_kernel.provenance.publications import PUBLICATION_FILE, publications, review_state
from lora_kernel.provenance.records import load_manifest, summary, verify_record
from lora_kernel.provenance.snapshots import snapshot_summary
from lora_kernel.trusted.identity import Actor, actor_by_name, current_actor, in_group
from lora_kernel.trusted.ledger import Ledger

REVIEW_DEFAULTS = {"reviewers_group": "lora-reviewers", "members": [],
                   "allow_self_approval": False}
PUBLICATION_DEFAULTS = {"access_groups": [], "expiry_days": 180}


def review_policy() -> dict[str, Any]:
    """``policies/review.yaml`` over :data:`REVIEW_DEFAULTS`."""
    return load_policy("review", REVIEW_DEFAULTS)


def publication_policy() -> dict[str, Any]:
    """Access groups and expiry for publications: ``publication:`` in review.yaml, overridden
    key by key by ``policies/publication.yaml`` if that exists."""
    merged = dict(PUBLICATION_DEFAULTS)
    merged.update(review_policy().get("publication") or {})
    merged.update(load_policy("publication"))
    return merged


def is_reviewer(actor: Actor, policy: dict[str, Any] | None = None) -> bool:
    """Whether ``actor`` is in the reviewers group (OS group) or the policy's ``members:``."""
    policy = policy if policy is not None else review_policy()
    if actor.name in (policy.get("members") or []):
        return True
    return in_group(actor, policy.get("reviewers_group"))


def verified_summary(run_id: str, ledger: LedgerReader, state: str | os.PathLike[str] | None
                     ) -> dict[str, Any]:
    """The manifest summary of a run whose files verify against its manifest and whose
    manifest matches the ledger; :class:`VerificationError` listing the problems otherwise."""
    expected = ledger.expected_manifest_sha256(run_id)
    record = runs_dir(state) / check_run_id(run_id)
    if expected is None and not record.exists():
        raise ConfigError(f"no such run {run_id!r} in {record.parent} or the ledger; fix: pick "
                          "a run id from `lora audit list`", key="RUN")
    if expected is None:
        raise VerificationError(f"run {run_id} has a record but no entry in the ledger (not "
                                "attested)")
    problems = verify_record(record, expected_manifest_sha256=expected[0])
    if problems:
        raise VerificationError(f"run {run_id} does not verify: "
                                + "; ".join(map(str, problems)))
    return summary(load_manifest(record))


def _self_reported_allowed(trainer: str, policy: dict[str, Any]) -> bool:
    """Whether ``policies/review.yaml`` ``self_reported_groups`` lets adapters that
    ``trainer``'s plain notebooks wrote be approved (an OS group the trainer is in)."""
    import grp
    import pwd

    groups = set(policy.get("self_reported_groups") or [])
    if not groups:
        return False
    try:
        entry = pwd.getpwnam(trainer)
    except KeyError:
        return False
    mine = {grp.getgrgid(g).gr_name for g in os.getgrouplist(trainer, entry.pw_gid)}
    return bool(groups & mine)


def check_source_approved(s: Mapping[str, Any], ledger: LedgerReader) -> None:
    """For a derived record's summary ``s``: refuse (:class:`PolicyRefusal`) unless the run
    it was derived from is approved with the adapter digest it had when the output was made.
    A derived record made from a loose file has no platform provenance and is refused
    (it may be approved only where self-reported adapters are allowed: the caller's rule)."""
    src = s.get("derived_from") or {}
    if not src.get("run_id"):
        raise PolicyRefusal(f"run {s['run_id']} was derived from a loose file "
                            f"({src.get('file')}), not from a platform run; its adapter is "
                            "self-reported")
    state, _entry = review_state(ledger, src["run_id"], src.get("adapter_digest"))
    if state != "approved":
        raise PolicyRefusal(f"run {s['run_id']} was derived from run {src['run_id']}, which is "
                            f"not approved (review state: {state}); fix: approve the source "
                            "run first")


def _review(run_id: str, decision: str, note: str, actor: Actor | None,
            state: str | os.PathLike[str] | None, ledger: Ledger | None,
            step: int | None = None) -> Entry:
    actor = actor or current_actor()
    policy = review_policy()
    check_run_id(run_id)
    with open_ledger(ledger, state, Ledger) as led:
        if not is_reviewer(actor, policy):
            raise PolicyRefusal(f"{actor.name} may not review: not in the reviewers group "
                                f"{policy.get('reviewers_group')!r} (policies/review.yaml); fix: "
                                f"an admin adds {actor.name} to that OS group, or to `members:` "
                                "in that policy on a single-user machine")
        s = verified_summary(run_id, led, state)
        if step is not None:  # one of the adapters the run saved mid-training
            s = snapshot_summary(runs_dir(state) / run_id, s, step)
        if decision == "approved":
            if actor.same_person(s["user"], s.get("uid")) \
                    and not policy.get("allow_self_approval"):
                raise PolicyRefusal(f"{actor.name} trained run {run_id} (as {s['user']}) and may "
                                    "not approve it (self-approval); ask another reviewer")
            if s["status"] != "succeeded":
                raise PolicyRefusal(f"run {run_id} {s['status']}; only a succeeded run can be "
                                    "approved (reject it, or approve a run that succeeded)")
            if not s["adapter_files"]:
                raise PolicyRefusal(f"run {run_id} has no adapter files; there is nothing to "
                                    "approve")
            if s.get("kind") == "notebook" and not _self_reported_allowed(s["user"], policy):
                raise PolicyRefusal(
                    f"run {run_id} is a plain notebook's run: its adapter and numbers are "
                    f"self-reported by user code, not trained and measured by the platform; "
                    f"fix: train it with `lora run --config` (a training run), or an admin "
                    f"lists the trainer's group in self_reported_groups (policies/review.yaml)")
            if s.get("kind") == "derived" and not (
                    not (s.get("derived_from") or {}).get("run_id")
                    and _self_reported_allowed(s["user"], policy)):
                check_source_approved(s, led)
        expected = led.expected_manifest_sha256(run_id)
        return led.append("review", run_id, {
            "decision": decision, "reviewer": actor.name, "reviewer_uid": actor.uid,
            "identity": actor.source, "note": note, "trainer": s["user"],
            "adapter_digest": s["adapter_digest"],
            **({"step": step, "adapter_files": s["adapter_files"]} if step is not None else {}),
            "manifest_sha256": expected[0] if expected else None})


def approve(run_id: str, note: str = "", *, actor: Actor | None = None,
            state: str | os.PathLike[str] | None = None, ledger: Ledger | None = None,
            step: int | None = None) -> Entry:
    """Approve a run's adapter (bound to its current digest); returns the ledger entry.
    ``step``: the adapter the run saved at that step (``snapshots/``) instead of the final
    one; a step it saved nothing at is a :class:`ConfigError` naming the saved steps.

    Raises :class:`PolicyRefusal` (not a reviewer, self-approval, failed run, no adapter) or
    :class:`VerificationError` (the record does not verify).
    """
    return _review(run_id, "approved", note, actor, state, ledger, step)


def reject(run_id: str, note: str = "", *, actor: Actor | None = None,
           state: str | os.PathLike[str] | None = None, ledger: Ledger | None = None,
           step: int | None = None) -> Entry:
    """Reject a run's adapter (also revokes an earlier approval); returns the ledger entry."""
    return _review(run_id, "rejected", note, actor, state, ledger, step)


def check_approved(run_id: str, s: dict[str, Any], ledger: LedgerReader) -> Entry:
    """The approval entry that lets ``run_id`` (summary ``s``) be published, or
    :class:`PolicyRefusal` saying why not (pending, rejected, replayed/void, self-approved)."""
    state, entry = review_state(ledger, run_id, s["adapter_digest"], s.get("step"))
    other = ledger.latest("review", run_id)  # an approval of another step, or of the final
    if state == "pending" and other is not None and other.payload.get("step") != s.get("step") \
            and other.payload.get("decision") == "approved":
        state, entry = "void", other
    if state == "void" and entry is not None and entry.payload.get("step") != s.get("step"):
        approved = entry.payload.get("step")
        what = (f"the adapter it saved at step {approved}; fix: lora publish {run_id} "
                f"--step {approved}" if approved is not None
                else f"its final adapter; fix: lora publish {run_id} without --step")
        raise PolicyRefusal(f"the approval of run {run_id} (ledger seq {entry.seq}) is of "
                            f"{what}, or have a reviewer approve the one you want")
    if state == "void" and entry is not None:
        raise PolicyRefusal(
            f"the approval of run {run_id} (ledger seq {entry.seq}) is bound to adapter digest "
            f"{str(entry.payload.get('adapter_digest'))[:16]}… but the adapter's digest is "
            f"{s['adapter_digest'][:16]}… (adapter changed or approval replayed)")
    if state != "approved" or entry is None:
        raise PolicyRefusal(f"run {run_id} is not approved (review state: {state})")
    reviewer = str(entry.payload.get("reviewer"))
    policy = review_policy()
    if reviewer == s["user"] and not policy.get("allow_self_approval"):
        raise PolicyRefusal(f"the approval of run {run_id} (seq {entry.seq}) is a "
                            "self-approval")
    who = actor_by_name(reviewer)
    if reviewer not in (policy.get("members") or []) and not (who and is_reviewer(who, policy)):
        raise PolicyRefusal(f"the approval of run {run_id} (seq {entry.seq}) is by "
                            f"{reviewer!r}, who is not a reviewer")
    return entry


def publish(run_id: str, to_dir: str | os.PathLike[str], name: str | None = None, *,
            actor: Actor | None = None, state: str | os.PathLike[str] | None = None,
            ledger: Ledger | None = None, step: int | None = None) -> Path:
    """Copy an approved, verified run's adapter files to ``to_dir/<name>``; return that path.
    ``step``: publish the adapter the run saved at that step, which must be the one approved.

    Writes ``publication.json`` (run, digests, access groups and expiry date from policy) and a
    ``publication`` ledger entry. The folder appears by one rename. Raises
    :class:`PolicyRefusal` (not approved, approval void, name taken) or
    :class:`VerificationError` (record does not verify, copy differs).
    """
    name = check_run_id(name or run_id)
    actor = actor or current_actor()
    with open_ledger(ledger, state, Ledger) as led:
        s = verified_summary(run_id, led, state)
        if step is not None:
            s = snapshot_summary(runs_dir(state) / run_id, s, step)
        approval = check_approved(run_id, s, led)
        if s.get("kind") == "derived" and (s.get("derived_from") or {}).get("run_id"):
            check_source_approved(s, led)  # the source may have been rejected since
        if not s["adapter_files"]:
            raise PolicyRefusal(f"run {run_id} has no adapter files to publish")
        to = Path(to_dir).resolve()
        to.mkdir(parents=True, exist_ok=True)
        dest = to / name
        if dest.exists():
            raise PolicyRefusal(f"{dest} already exists; publications are immutable")
        record = runs_dir(state) / run_id
        policy = publication_policy()
        now = dt.datetime.now(dt.UTC)
        expires = (now + dt.timedelta(days=int(policy["expiry_days"]))).date().isoformat()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=to))
        files = {}
        for rel in s["adapter_files"]:
            out_rel = rel.split("/", 1)[1] if rel.startswith(("adapter/", "snapshots/")) \
                else rel
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
                "expires": expires, "published_at": iso_time(now), "published_by": actor.name,
                "approval_seq": approval.seq, "lora_enclave": __version__,
                **({"step": step} if step is not None else {})}
        (tmp / PUBLICATION_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
        os.chmod(tmp / PUBLICATION_FILE, 0o444)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
        try:
            led.append("publication", run_id, {
                **meta, "path": str(dest), "published_by_uid": actor.uid,
                "metadata_sha256": sha256_file(dest / PUBLICATION_FILE)})
        except BaseException:
            shutil.rmtree(dest)  # never a publication the ledger does not know of
            raise
    return dest


def withdraw(run_id: str, note: str = "", *, name: str | None = None,
             actor: Actor | None = None, state: str | os.PathLike[str] | None = None,
             ledger: Ledger | None = None) -> list[Entry]:
    """Withdraw the run's current publications (only the one published as ``name`` if given):
    remove each published folder and append a ``withdrawal`` ledger entry (run id, path, who,
    note, the publication's seq); return the entries.

    Allowed to a reviewer (the rule of :func:`approve`) or to whoever published it. Raises
    :class:`ConfigError` (nothing published to withdraw) or :class:`PolicyRefusal` (neither
    reviewer nor publisher); nothing is removed unless every publication may be withdrawn.
    """
    actor = actor or current_actor()
    check_run_id(run_id)
    policy = review_policy()
    with open_ledger(ledger, state, Ledger) as led:
        every = publications(led)
        pubs = [p for p in every if p.get("run_id") == run_id and p["withdrawn"] is None
                and (name is None or p.get("name") == name)]
        if not pubs:
            what = f"publication named {name!r}" if name else "publication"
            raise ConfigError(f"run {run_id} has no {what} to withdraw (never published, or "
                              f"already withdrawn); fix: `lora audit show {run_id}` lists "
                              "where it is published", key="RUN")
        reviewer = is_reviewer(actor, policy)
        for pub in pubs:
            if not reviewer and not actor.same_person(pub.get("published_by"),
                                                      pub.get("published_by_uid")):
                raise PolicyRefusal(
                    f"{actor.name} may not withdraw {pub['path']}: neither a reviewer (group "
                    f"{policy.get('reviewers_group')!r}, policies/review.yaml) nor its "
                    f"publisher ({pub.get('published_by')}); fix: ask a reviewer or the "
                    "publisher")
        # a path published again after this one was removed belongs to the newer publication
        claimed = {p["path"]: p["seq"] for p in every if p["withdrawn"] is None}
        return [_withdraw_one(pub, note, "reviewer" if reviewer else "publisher", actor, led,
                              remove=claimed.get(pub["path"]) == pub["seq"]) for pub in pubs]


def _withdraw_one(pub: dict[str, Any], note: str, role: str, actor: Actor, led: Ledger, *,
                  remove: bool) -> Entry:
    """Move the published folder aside (it stops being served at once), append the withdrawal
    entry, then delete the folder; if the entry cannot be written, the folder is put back."""
    dest = Path(pub["path"])
    aside = None
    if remove and dest.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.withdrawn.", dir=dest.parent))
        os.rename(dest, aside / dest.name)
    try:
        entry = led.append("withdrawal", str(pub["run_id"]), {
            "run_id": pub["run_id"], "name": pub.get("name"), "path": str(dest),
            "publication_seq": pub["seq"], "adapter_digest": pub.get("adapter_digest"),
            "by": actor.name, "by_uid": actor.uid, "identity": actor.source, "as": role,
            "note": note, "removed": aside is not None})
    except BaseException:
        if aside is not None:
            os.rename(aside / dest.name, dest)
            aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside)
    return entry
