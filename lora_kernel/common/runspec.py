"""What crosses the trust boundary about a run, typed: the pin step's answer
(:class:`PinnedInputs`) and the run's description (:class:`RunDescription`).

Neutral code (stdlib only): the user-side pin step produces the answer, the trusted side — the
local runner, the runner service and the Kubernetes backend of the runs service alike — turns
it into these values with ``from_untrusted`` once, and from then on works with checked fields;
a malformed answer is a :class:`~lora_kernel.common.errors.LoraError` naming the field. What
the pin step answers is the user's word (it runs as the user): the checks are of shape, the
record says whose word it is.

:func:`pinned_parameters` (the papermill parameters of a pinned run) and the states of a queued
run (:data:`RUN_STATUSES`, :data:`FINAL_STATUSES`) are shared by both sides.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import LoraError

__all__ = ["FINAL_STATUSES", "KINDS", "PinnedInputs", "RUN_STATUSES", "ResumePoint",
           "RunDescription", "pinned_parameters"]

KINDS = ("notebook", "training")
# The states of a queued run (the hub's runs queue), and those in which it has ended: one list
# for the queue, the runs service and its clients.
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What an unbelieved (or not yet given) pin answer is written as in a run description; the
# form the runs service wrote before the descriptions were typed (read back by recovery).
_UNPINNED = {"kind": None, "notebook_sha256": ""}


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


def _bad(where: str, key: str) -> LoraError:
    return LoraError(f"{where}: {key} is missing or of the wrong type")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resumed run continues from: the run it continues, the checkpoint's
    path in that run's work folder, its step and its digest."""

    run_id: str
    checkpoint: str
    step: int | None
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "checkpoint": self.checkpoint, "step": self.step,
                "sha256": self.sha256}


@dataclass(frozen=True)
class PinnedInputs:
    """The pin step's answer: the notebook (path, digest, declared parameters) and, for a
    training notebook, the resolved config, its file and digest, the dataset files' digests,
    the base model's digest and the seed. Build it with :meth:`from_untrusted`."""

    kind: str
    notebook: str
    notebook_sha256: str
    declared: tuple[str, ...]
    config: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None
    config_path: str | None = None
    config_sha256: str | None = None
    task: str | None = None
    seed: int | None = None
    dataset_digests: dict[str, str] | None = None
    dataset_version: str | None = None
    base_model_sha256: str | None = None
    init_adapter_sha256: str | None = None  # init_adapter: the adapter the run continues from
    dataset_warnings: tuple[str, ...] = ()
    model_family: str | None = None  # image: sd15, sd2, sdxl (read by the validator)
    resume: ResumePoint | None = None

    @property
    def training(self) -> bool:
        return self.kind == "training"

    @classmethod
    def from_untrusted(cls, doc: Any, *, where: str = "the pin answer",
                       resume: bool = True) -> PinnedInputs:
        """Check the shape of a pin answer (a JSON object) and type it; :class:`LoraError`
        naming the field when it is malformed. Keys it does not know (the answer's helper
        keys, ``notebook_source``) are left out; ``resume`` False drops a resume point
        (no resume on Kubernetes)."""
        if not isinstance(doc, Mapping):
            raise LoraError(f"{where} is not a JSON object")
        if not _is_sha256(doc.get("notebook_sha256")):
            raise LoraError(f"{where}: notebook_sha256 is not a sha256")
        if doc.get("kind") not in KINDS or not isinstance(doc.get("declared"), list) \
                or not all(isinstance(d, str) for d in doc["declared"]) \
                or not isinstance(doc.get("notebook"), str):
            raise LoraError(f"{where}: kind, notebook or declared parameters missing")
        optional: dict[str, Callable[[Any], bool]] = {
            "seed": lambda v: v is None or _is_int(v),
            "config": lambda v: v is None or isinstance(v, dict),
            "overrides": lambda v: v is None or isinstance(v, dict),
            "config_path": lambda v: v is None or isinstance(v, str),
            "task": lambda v: v is None or isinstance(v, str),
            "dataset_digests": lambda v: v is None or _str_map(v),
            "dataset_version": lambda v: v is None or isinstance(v, str),
            "base_model_sha256": lambda v: v is None or _is_sha256(v),
            "init_adapter_sha256": lambda v: v is None or _is_sha256(v),
            "dataset_warnings": lambda v: v is None or (isinstance(v, list) and all(
                isinstance(w, str) for w in v)),
            "model_family": lambda v: v is None or isinstance(v, str)}
        for key, ok in optional.items():
            if not ok(doc.get(key)):
                raise _bad(where, key)
        if doc["kind"] == "training":
            for key in ("config", "config_path", "dataset_digests", "base_model_sha256",
                        "overrides"):
                if doc.get(key) is None:
                    raise _bad(where, key)
            if not _is_sha256(doc.get("config_sha256")):
                raise _bad(where, "config_sha256")
        point = None
        if resume and doc.get("resume") is not None:
            point = _resume_point(doc["resume"], where)
        return cls(kind=str(doc["kind"]), notebook=str(doc["notebook"]),
                   notebook_sha256=str(doc["notebook_sha256"]),
                   declared=tuple(doc["declared"]), config=doc.get("config"),
                   overrides=doc.get("overrides"), config_path=doc.get("config_path"),
                   config_sha256=doc.get("config_sha256"), task=doc.get("task"),
                   seed=doc.get("seed"), dataset_digests=doc.get("dataset_digests"),
                   dataset_version=doc.get("dataset_version"),
                   base_model_sha256=doc.get("base_model_sha256"),
                   init_adapter_sha256=doc.get("init_adapter_sha256"),
                   dataset_warnings=tuple(doc.get("dataset_warnings") or ()),
                   model_family=doc.get("model_family"), resume=point)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, the keys the pin step answered (unset ones left out)."""
        out: dict[str, Any] = {"kind": self.kind, "notebook": self.notebook,
                               "notebook_sha256": self.notebook_sha256,
                               "declared": list(self.declared)}
        for key in ("config", "overrides", "config_path", "config_sha256", "task",
                    "dataset_digests", "dataset_version", "base_model_sha256",
                    "init_adapter_sha256", "model_family"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.training:
            out["seed"] = self.seed
            out["dataset_warnings"] = list(self.dataset_warnings)
        if self.resume is not None:
            out["resume"] = self.resume.to_dict()
        return out


def _resume_point(value: Any, where: str) -> ResumePoint:
    if not isinstance(value, Mapping) or not isinstance(value.get("run_id"), str) \
            or not isinstance(value.get("checkpoint"), str) \
            or not (value.get("step") is None or _is_int(value.get("step"))) \
            or not _is_sha256(value.get("sha256")):
        raise _bad(where, "resume")
    return ResumePoint(str(value["run_id"]), str(value["checkpoint"]), value.get("step"),
                       str(value["sha256"]))


def pinned_parameters(params: Mapping[str, Any], pinned: PinnedInputs | Mapping[str, Any],
                      work: Path) -> dict[str, Any]:
    """The papermill parameters a pinned run executes with: a training notebook gets the
    validated ``config_path`` and ``overrides`` (``output_dir`` in the work folder) of the pin
    step, and ``result_path`` when it declares one. ``pinned``: the typed answer, or the pin
    step's own dict (the user side, before it answers)."""
    if isinstance(pinned, Mapping):
        kind, declared = pinned.get("kind"), pinned["declared"]
        config_path, overrides = pinned.get("config_path"), pinned.get("overrides")
    else:
        kind, declared = pinned.kind, pinned.declared
        config_path, overrides = pinned.config_path, pinned.overrides
    out = dict(params)
    if kind == "training":
        out["config_path"] = config_path
        out["overrides"] = overrides
    if "result_path" in declared:
        out["result_path"] = str(work / "run_result.json")
    return out


@dataclass(frozen=True)
class RunActor:
    """Who asked for the run (the authenticated requester) and how they were identified."""

    name: str
    uid: int | None
    source: str


@dataclass(frozen=True)
class RunUser:
    """The OS user the run's steps run as (None: the runner's own user, local mode)."""

    uid: int | None
    name: str | None


@dataclass
class RunDescription:
    """A run the trusted side started: what ``<runs>/.active/<run_id>.json`` says and what
    :func:`lora_kernel.trusted.runseal.seal_run` seals. ``pinned`` None: no pin answer to
    believe (a Kubernetes run before its pod answered, or whose answer was changed); the
    record then pins nothing. ``backend`` ``"kubernetes"``: ``evidence`` names the Job's tar on
    the output volume. ``staging`` is set once the run is announced."""

    run_id: str
    notebook: str
    parameters: dict[str, Any]
    home: str
    work: str
    started: str
    actor: RunActor
    run_as: RunUser
    pinned: PinnedInputs | None
    extra: dict[str, Any] = field(default_factory=dict)
    staging: str | None = None
    backend: str | None = None
    evidence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (the ``.active`` file)."""
        out: dict[str, Any] = {
            "run_id": self.run_id, "notebook": self.notebook, "parameters": self.parameters,
            "home": self.home, "work": self.work, "started": self.started,
            "actor": {"name": self.actor.name, "uid": self.actor.uid,
                      "source": self.actor.source},
            "run_as": {"uid": self.run_as.uid, "name": self.run_as.name},
            "pinned": self.pinned.to_dict() if self.pinned is not None else dict(_UNPINNED)}
        for key in ("extra", "staging", "backend", "evidence"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out

    @classmethod
    def from_untrusted(cls, doc: Any, *, where: str = "the run description") -> RunDescription:
        """Check and type a run description read back (an ``.active`` file of a runner that
        died, possibly of an older version); :class:`LoraError` naming the field."""
        if not isinstance(doc, Mapping):
            raise LoraError(f"{where} is not a JSON object")
        for key in ("run_id", "notebook", "home", "work", "started"):
            if not isinstance(doc.get(key), str):
                raise _bad(where, key)
        for key in ("parameters", "actor", "run_as"):
            if not isinstance(doc.get(key), dict):
                raise _bad(where, key)
        actor, run_as = doc["actor"], doc["run_as"]
        if not isinstance(actor.get("name"), str) or not isinstance(actor.get("source"), str) \
                or not (actor.get("uid") is None or _is_int(actor.get("uid"))):
            raise _bad(where, "actor")
        if not (run_as.get("uid") is None or _is_int(run_as.get("uid"))) \
                or not (run_as.get("name") is None or isinstance(run_as.get("name"), str)):
            raise _bad(where, "run_as")
        for key in ("staging", "backend", "evidence"):
            if not (doc.get(key) is None or isinstance(doc.get(key), str)):
                raise _bad(where, key)
        if not (doc.get("extra") is None or isinstance(doc.get("extra"), dict)):
            raise _bad(where, "extra")
        raw = doc.get("pinned")
        pinned = None
        if isinstance(raw, Mapping) and raw.get("kind") is not None:
            pinned = PinnedInputs.from_untrusted(raw, where=f"{where}: pinned")
        elif not isinstance(raw, Mapping):
            raise _bad(where, "pinned")
        return cls(run_id=str(doc["run_id"]), notebook=str(doc["notebook"]),
                   parameters=dict(doc["parameters"]), home=str(doc["home"]),
                   work=str(doc["work"]), started=str(doc["started"]),
                   actor=RunActor(str(actor["name"]), actor.get("uid"), str(actor["source"])),
                   run_as=RunUser(run_as.get("uid"), run_as.get("name")), pinned=pinned,
                   extra=dict(doc.get("extra") or {}), staging=doc.get("staging"),
                   backend=doc.get("backend"), evidence=doc.get("evidence"))
