"""Records of kind ``derived``: what a post-training tool (``lora merge``, ``lora resize``,
``lora convert``) made from a pinned source, sealed like a run so that ``verify``, lineage,
review and publication cover it.

Runs as: the user who runs the tool in local mode (like a local run's sealing), on the
trusted side of the code base; the runner service's account when a service calls it.

A tool computes its output files, then::

    source = source_from_run("20261207T…-ab12cd")       # verifies the record (exit 5 if not)
    rec = seal_derived(tool="resize", params={"rank": 8}, source=source,
                       outputs={"adapter_model.safetensors": Path("/tmp/out.safetensors")})

The record's manifest pins the source: the source run's manifest sha256 (``source_run``) and
each of its adapter files' sha256 (``source/<file>``), or a single source file's sha256, as
resolved dependencies; ``extra`` keeps ``kind: derived``, the tool, its parameters and
``derived_from``. The source's base model and dataset version carry over, so lineage of the
dataset or the base finds the derived output too. A derived record's adapter can be approved
and published only when its source run is approved (:func:`check_source_approved`); one made
from a loose file counts as self-reported.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import sha256_file
from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.common.paths import check_run_id, runs_dir
from lora_kernel.common.timeutil import utc_now
from lora_kernel.provenance.ledger import LedgerReader, open_ledger
from lora_kernel.provenance.publications import review_state
from lora_kernel.provenance.records import load_manifest, manifest_sha256, record_files
from lora_kernel.trusted.identity import Actor, current_actor
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.review import check_source_approved, verified_summary
from lora_kernel.trusted.runner import new_run_id
from lora_kernel.trusted.runseal import RunRecord
from lora_kernel.trusted.sealing import (
    ManifestContext,
    build_manifest,
    make_staging_dir,
    seal_record,
    write_manifest,
)

__all__ = ["DerivedSource", "check_source_approved", "seal_derived", "source_from_file",
           "source_from_run"]

_State = str | os.PathLike[str] | None


@dataclass(frozen=True)
class DerivedSource:
    """What a derived output was made from: a sealed run (``run_id`` set; its record verified
    against the ledger) or a loose file (``path`` and ``sha256``)."""

    run_id: str | None = None
    manifest_sha256: str | None = None
    record: Path | None = None
    adapter_files: Mapping[str, str] = field(default_factory=dict)  # rel path -> sha256
    adapter_digest: str | None = None
    base_model: str = ""
    base_model_sha256: str = ""
    dataset_version: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    kind: str | None = None
    status: str | None = None
    user: str | None = None
    path: Path | None = None
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        """The manifest's ``extra.derived_from``."""
        if self.run_id is not None:
            return {"run_id": self.run_id, "manifest_sha256": self.manifest_sha256,
                    "adapter_digest": self.adapter_digest, "kind": self.kind,
                    "status": self.status, "user": self.user}
        return {"file": str(self.path), "sha256": self.sha256}

    def dependencies(self) -> tuple[dict[str, Any], ...]:
        """Resolved dependencies that pin this source in a derived record's manifest."""
        if self.run_id is not None:
            deps = [{"name": "source_run", "uri": f"lora-run:{self.run_id}",
                     "digest": {"sha256": self.manifest_sha256}}]
            deps += [{"name": f"source/{rel}", "digest": {"sha256": d}}
                     for rel, d in sorted(self.adapter_files.items())]
            return tuple(deps)
        return ({"name": f"source/{Path(str(self.path)).name}", "uri": str(self.path),
                 "digest": {"sha256": self.sha256}},)


def source_from_run(run_id: str, *, state: _State = None,
                    ledger: LedgerReader | None = None,
                    require_approved: bool = False) -> DerivedSource:
    """The source ``run_id``, after its record verifies against the ledger
    (:class:`VerificationError`, exit 5, otherwise). It must have succeeded and hold an
    adapter; with ``require_approved`` its adapter must be approved (:class:`PolicyRefusal`,
    exit 6: ``lora merge`` of an unapproved run)."""
    check_run_id(run_id)
    with open_ledger(ledger, state) as led:
        s = verified_summary(run_id, led, state)
        if s["status"] != "succeeded":
            raise PolicyRefusal(f"run {run_id} {s['status']}; only a succeeded run's adapter "
                                "can be merged, resized or converted")
        if not s["adapter_files"]:
            raise PolicyRefusal(f"run {run_id} has no adapter files to derive from")
        if require_approved:
            _require_approved(run_id, s["adapter_digest"], led)
        expected = led.expected_manifest_sha256(run_id)
    record = runs_dir(state) / run_id
    return DerivedSource(
        run_id=run_id, manifest_sha256=expected[0] if expected else manifest_sha256(record),
        record=record, adapter_files={r: s["files"][r] for r in s["adapter_files"]},
        adapter_digest=s["adapter_digest"], base_model=str(s.get("base_model") or ""),
        base_model_sha256=str(s.get("base_model_sha256") or ""),
        dataset_version=str(s.get("dataset_version") or ""), config=s.get("config") or {},
        kind=s.get("kind"), status=s["status"], user=s["user"])


def source_from_file(path: str | os.PathLike[str]) -> DerivedSource:
    """A loose adapter or model file as the source (pinned by its sha256)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file; fix: give a run id from `lora audit list` or "
                          "the path of an adapter file", key="SOURCE")
    return DerivedSource(path=p.resolve(), sha256=sha256_file(p))


def _require_approved(run_id: str, adapter_digest: str, ledger: LedgerReader) -> None:
    state, _entry = review_state(ledger, run_id, adapter_digest)
    if state != "approved":
        raise PolicyRefusal(f"run {run_id} is not approved (review state: {state}); fix: a "
                            f"reviewer approves it first (`lora review approve {run_id}`)")


def seal_derived(*, tool: str, params: Mapping[str, Any], source: DerivedSource,
                 outputs: Mapping[str, str | os.PathLike[str]], state: _State = None,
                 actor: Actor | None = None, task: str | None = None,
                 measured: Mapping[str, Any] | None = None) -> RunRecord:
    """Seal ``outputs`` (``{path under the record's adapter/: file to copy}``) as a record of
    kind ``derived`` made by ``tool`` with ``params`` from ``source``; append it to the ledger
    and return it. ``measured``: numbers the tool measured (kept energy, max difference…).
    Nothing is left behind when it fails: the staging folder is removed."""
    if not outputs:
        raise ValueError("seal_derived needs at least one output file")
    actor = actor or current_actor()
    started = utc_now()
    run_id = new_run_id(started)
    runs = runs_dir(state)
    runs.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(runs, run_id)
    try:
        for rel, src in sorted(outputs.items()):
            rel_path = Path(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise ValueError(f"output name {rel!r} must be a relative path")
            dest = staging / "adapter" / rel_path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        extra: dict[str, Any] = {"kind": "derived", "tool": tool, "params": dict(params),
                                 "derived_from": source.describe(),
                                 "measured": dict(measured or {}),
                                 "identity": actor.source}
        config: dict[str, Any] = {"derived": {"tool": tool, "params": dict(params)}}
        base = source.base_model or str(source.config.get("base_model") or "")
        if base:
            config["base_model"] = base
        if task or source.config.get("task"):
            config["task"] = task or source.config.get("task")
        context = ManifestContext(
            run_id=run_id, user=actor.name, uid=actor.uid, host=socket.gethostname(),
            started=started, ended=utc_now(), status="succeeded", config=config,
            base_model_sha256=source.base_model_sha256, dataset_version=source.dataset_version,
            dataset_digests={}, notebook_source_sha256="", seed=0, egress_refusals=0,
            extra=extra, dependencies=source.dependencies())
        write_manifest(staging, build_manifest(staging, context))
        record = seal_record(staging, runs, run_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with Ledger(state=state) as ledger:
        entry = ledger.append_run(record)
    return RunRecord(run_id=run_id, path=record, status="succeeded",
                     manifest_sha256=manifest_sha256(record), ledger_seq=entry.seq,
                     seconds=(utc_now() - started).total_seconds(), result=None,
                     files=record_files(record))


def derived_summary(run_id: str, state: _State = None) -> dict[str, Any]:
    """The ``extra`` of a derived record (tool, params, derived_from, measured)."""
    m = load_manifest(runs_dir(state) / check_run_id(run_id))
    extra = m["predicate"]["runDetails"]["metadata"].get("extra") or {}
    return dict(extra)
