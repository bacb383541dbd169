"""Retention: ``lora audit prune`` removes records older than ``policies/retention.yaml``
allows. Each removal is a ``prune`` ledger entry written before the files go; young, approved
or unverifiable records are kept (evidence first).

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from typing import Any

from lora_kernel.common.errors import ConfigError, PolicyRefusal, VerificationError
from lora_kernel.common.paths import check_run_id, runs_dir
from lora_kernel.common.policy import load_policy
from lora_kernel.common.timeutil import parse_time
from lora_kernel.provenance.audit import run_ids, verify_run
from lora_kernel.provenance.ledger import open_ledger
from lora_kernel.provenance.publications import review_state
from lora_kernel.provenance.records import load_manifest, manifest_sha256, summary
from lora_kernel.trusted.identity import Actor, current_actor
from lora_kernel.trusted.ledger import Ledger

RETENTION_DEFAULTS = {"keep_days": 180, "keep_approved": True}


def retention_policy() -> dict[str, Any]:
    """``policies/retention.yaml`` over :data:`RETENTION_DEFAULTS`."""
    return load_policy("retention", RETENTION_DEFAULTS)


def prune(run_ids_: list[str] | None = None, *, state: str | os.PathLike[str] | None = None,
          ledger: Ledger | None = None, now: dt.datetime | None = None, dry_run: bool = False,
          actor: Actor | None = None) -> list[dict[str, Any]]:
    """Remove records older than the retention policy's ``keep_days``; each removal is a
    ``prune`` ledger entry written before the files go.

    With explicit ``run_ids_``, a record that is too young, approved (``keep_approved``) or
    does not verify raises :class:`PolicyRefusal` / :class:`VerificationError` before anything
    is removed. Without, such records are skipped. Returns what was (or would be) pruned.
    """
    policy = retention_policy()
    keep_days = int(policy["keep_days"])
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(days=keep_days)
    explicit = run_ids_ is not None
    done = []
    with open_ledger(ledger, state, Ledger) as led:
        base = runs_dir(state)
        candidates = run_ids_ if run_ids_ is not None else [
            r for r in run_ids(led, state) if (base / r).is_dir()]
        plan = []
        for rid in candidates:
            record = base / check_run_id(rid)
            if not record.is_dir():
                if explicit:
                    raise ConfigError(f"no such record {record}; fix: pick a run id from "
                                      "`lora audit list`", key="RUN")
                continue
            problems = verify_run(rid, led, state)
            if problems:
                if explicit:
                    raise VerificationError(f"refusing to prune {rid}, it does not verify "
                                            "(evidence is kept): " + "; ".join(map(str, problems)))
                continue
            s = summary(load_manifest(record))
            ended = parse_time(s["ended"])
            if ended > cutoff:
                if explicit:
                    raise PolicyRefusal(f"run {rid} ended {s['ended']}, younger than the "
                                        f"{keep_days} days policies/retention.yaml keeps")
                continue
            if policy.get("keep_approved") and review_state(led, rid, s["adapter_digest"]
                                                            )[0] == "approved":
                if explicit:
                    raise PolicyRefusal(f"run {rid} is approved; retention keeps approved runs")
                continue
            plan.append((rid, record, s))
        for rid, record, s in plan:
            item = {"run_id": rid, "ended": s["ended"], "manifest_sha256":
                    manifest_sha256(record)}
            if not dry_run:
                trash = base / ".pruning" / rid
                trash.parent.mkdir(exist_ok=True)
                os.rename(record, trash)
                try:
                    entry = led.append("prune", rid, {**item, "keep_days": keep_days,
                                                      "by": (actor or current_actor()).name})
                except BaseException:
                    os.rename(trash, record)
                    raise
                shutil.rmtree(trash)
                item["seq"] = entry.seq
            done.append(item)
    if done and not dry_run:
        from lora_kernel.trusted.objects import prune_store

        prune_store(state)  # the snapshots only the pruned records were pinned on
    return done
