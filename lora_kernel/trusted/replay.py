"""``lora audit replay RUN``: re-execute a sealed training run from its pinned inputs and
prove (or refute) that they produce its adapter.

::

    replay_run(run_id)
      ├─ the original must verify (record against manifest, manifest against the ledger)
      ├─ re-hash every pinned input BEFORE anything runs: each dataset file and the base model
      │    (lora_kernel.provenance.inputs), the notebook and the config file the record names;
      │    any change or missing file: ConfigError (exit 2) listing them, nothing trained
      ├─ package versions that differ from the record: listed, the replay still runs
      ├─ run_notebook(...) — the same runner, papermill, guarded kernel, sealing and ledger as
      │    any run — as a new record with extra.kind "replay", extra.replay_of = RUN; the pin
      │    step's answer must match the record (notebook sha256, resolved config, dataset
      │    files, base model, seed) or the replay stops before it trains (exit 2)
      ├─ before sealing: compare the adapter tensors and the per-step loss series with the
      │    original's → replay.json in the new record and extra.replay in its manifest
      └─ a "replay" ledger entry (subject: RUN) carrying the verdict
The verdict is ``identical`` (CPU: every adapter tensor bit-identical, the loss series
equal), ``within tolerance`` (only when a side trained on a GPU, where kernels are not
bit-reproducible: max abs difference per tensor and the loss-series correlation against the
tolerances recorded in the verdict) or ``differs``; the CLI exits 0, 0 or 5.

Standard library and numpy only (no torch): safetensors files are parsed here (8-byte header
length, JSON header, raw little-endian data).

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import sha256_file
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.paths import check_run_id, runs_dir
from lora_kernel.common.runspec import PinnedInputs
from lora_kernel.provenance.inputs import verify_inputs
from lora_kernel.provenance.records import Problem, load_manifest, summary
from lora_kernel.trusted.runner import RunContext, RunHooks, RunRecord, run_notebook
from lora_kernel.trusted.sealing import environment_info

__all__ = ["REPLAY_FILE", "IDENTICAL", "WITHIN_TOLERANCE", "DIFFERS", "GPU_TOLERANCE",
           "ReplayOutcome", "check_replay_inputs", "compare_adapters", "compare_losses",
           "verdict_of", "replay_run"]

REPLAY_FILE = "replay.json"
IDENTICAL, WITHIN_TOLERANCE, DIFFERS = "identical", "within tolerance", "differs"
# GPU kernels (atomics in reductions, cuBLAS split choices) are not bit-reproducible run to
# run: a replay that trained on a GPU, or of a run that did, is judged by these instead.
GPU_TOLERANCE = {"max_abs_diff": 1e-3, "loss_correlation": 0.99}
# Config keys a replay may change: where it writes (its own work folder).
FREE_KEYS = ("output_dir",)
# ... and, replaying from the snapshot store, where the laid-out dataset and model are.
SNAPSHOT_KEYS = ("train_data_dir", "metadata_path", "base_model")

_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
           "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
           "U8": ("u1", 1), "BOOL": ("?", 1)}


# -- safetensors without torch --------------------------------------------------------------
def read_safetensors(path: str | os.PathLike[str]) -> dict[str, tuple[str, list[int], bytes]]:
    """``{name: (dtype, shape, raw bytes)}`` of a safetensors file (``__metadata__`` left out).
    :class:`VerificationError` for a file that is not one."""
    raw = Path(path).read_bytes()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data = raw[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            out[name] = (str(info["dtype"]), [int(d) for d in info["shape"]], data[lo:hi])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"{path}: not a safetensors file ({exc})") from None
    return out


def _as_float(dtype: str, data: bytes) -> Any:
    """The values of a tensor's raw bytes as a float64 numpy array."""
    import numpy as np

    code, _size = _DTYPES.get(dtype, ("u1", 1))
    arr = np.frombuffer(data, dtype=np.dtype(code))
    if dtype == "BF16":  # the upper half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float64)


def _adapter_tensor_files(adapter_dir: Path) -> dict[str, Path]:
    if not adapter_dir.is_dir():
        return {}
    return {p.relative_to(adapter_dir).as_posix(): p
            for p in sorted(adapter_dir.rglob("*.safetensors")) if p.is_file()}


def compare_adapters(original: str | os.PathLike[str], replayed: str | os.PathLike[str]
                     ) -> dict[str, Any]:
    """Compare every ``*.safetensors`` file under two adapter folders tensor by tensor.

    Returns ``{"identical": bool, "max_abs_diff": float, "files": {rel: {...}},
    "problems": [...]}``: per file whether every tensor has the same dtype, shape and bytes,
    the max abs difference per tensor that differs, and missing/extra files or tensors.
    (Headers' ``__metadata__`` is not compared: it names the run's own output folder.)"""
    a_files = _adapter_tensor_files(Path(original))
    b_files = _adapter_tensor_files(Path(replayed))
    problems: list[str] = []
    files: dict[str, Any] = {}
    worst = 0.0
    if not a_files:
        problems.append("the original record holds no adapter tensors")
    for rel in sorted(set(a_files) - set(b_files)):
        problems.append(f"adapter/{rel}: in the original, not produced by the replay")
    for rel in sorted(set(b_files) - set(a_files)):
        problems.append(f"adapter/{rel}: produced by the replay, not in the original")
    for rel in sorted(set(a_files) & set(b_files)):
        a, b = read_safetensors(a_files[rel]), read_safetensors(b_files[rel])
        diffs: dict[str, float] = {}
        for name in sorted(set(a) - set(b)):
            problems.append(f"adapter/{rel}: tensor {name} missing from the replay")
        for name in sorted(set(b) - set(a)):
            problems.append(f"adapter/{rel}: tensor {name} not in the original")
        for name in sorted(set(a) & set(b)):
            (da, sa, ba), (db, sb, bb) = a[name], b[name]
            if (da, sa) != (db, sb):
                problems.append(f"adapter/{rel}: tensor {name} is {db}{sb} in the replay, "
                                f"{da}{sa} in the original")
                diffs[name] = math.inf
                continue
            if ba == bb:
                continue
            import numpy as np

            delta = float(np.max(np.abs(_as_float(da, ba) - _as_float(db, bb))))
            diffs[name] = delta if math.isfinite(delta) else math.inf
        tensors = len(set(a) & set(b))
        worst = max([worst, *diffs.values()])
        files[rel] = {"tensors": tensors, "identical": not diffs and set(a) == set(b),
                      "differing_tensors": len(diffs),
                      "max_abs_diff": max(diffs.values(), default=0.0),
                      "max_abs_diff_per_tensor": {k: diffs[k] for k in sorted(diffs)}}
    identical = not problems and all(f["identical"] for f in files.values())
    return {"identical": identical, "max_abs_diff": worst, "files": files,
            "problems": problems, "other_files": _other_files(Path(original), Path(replayed))}


def _other_files(a: Path, b: Path) -> dict[str, str]:
    """Adapter files that are no tensors (``adapter_config.json``...): ``same`` / ``differs``
    / ``missing`` / ``extra`` (information only: the verdict is about the tensors)."""
    def listing(root: Path) -> dict[str, Path]:
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                if p.is_file() and p.suffix != ".safetensors"}
    la, lb = listing(a), listing(b)
    out = {}
    for rel in sorted(set(la) | set(lb)):
        if rel not in lb:
            out[rel] = "missing"
        elif rel not in la:
            out[rel] = "extra"
        else:
            out[rel] = "same" if la[rel].read_bytes() == lb[rel].read_bytes() else "differs"
    return out


def compare_losses(original: list[float] | None, replayed: list[float] | None
                   ) -> dict[str, Any]:
    """Compare two per-step loss series: equal, their length, max abs difference and the
    Pearson correlation (1.0 for equal series; None when undefined)."""
    a = [float(x) for x in original or []]
    b = [float(x) for x in replayed or []]
    out: dict[str, Any] = {"steps_original": len(a), "steps_replay": len(b),
                           "identical": bool(a) and a == b, "max_abs_diff": None,
                           "correlation": None}
    n = min(len(a), len(b))
    if n == 0:
        return out
    out["max_abs_diff"] = max(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True))
    if a[:n] == b[:n]:
        out["correlation"] = 1.0
    elif n > 1:
        ma, mb = sum(a[:n]) / n, sum(b[:n]) / n
        cov = sum((x - ma) * (y - mb) for x, y in zip(a[:n], b[:n], strict=True))
        va = sum((x - ma) ** 2 for x in a[:n])
        vb = sum((y - mb) ** 2 for y in b[:n])
        out["correlation"] = cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None
    return out


def verdict_of(adapters: Mapping[str, Any], losses: Mapping[str, Any], *, gpu: bool,
               tolerance: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The verdict from :func:`compare_adapters` and :func:`compare_losses`.

    CPU (``gpu`` False): ``identical`` only when every tensor is bit-identical and the loss
    series are equal; anything else ``differs``. GPU: bit-identical is still ``identical``;
    else ``within tolerance`` when every tensor's max abs difference and the loss correlation
    meet ``tolerance`` (default :data:`GPU_TOLERANCE`), which the verdict records."""
    tol = dict(tolerance or GPU_TOLERANCE)
    out: dict[str, Any] = {"mode": "gpu" if gpu else "cpu",
                           "adapter_identical": bool(adapters.get("identical")),
                           "max_abs_diff": adapters.get("max_abs_diff"),
                           "losses_identical": bool(losses.get("identical")),
                           "loss_max_abs_diff": losses.get("max_abs_diff"),
                           "loss_correlation": losses.get("correlation")}
    if out["adapter_identical"] and out["losses_identical"]:
        out.update(verdict=IDENTICAL, reason="every adapter tensor is bit-identical and the "
                   "per-step loss series are equal")
        return out
    why = [*adapters.get("problems", [])]
    if not out["adapter_identical"]:
        why.append(f"adapter tensors differ (max abs diff {adapters.get('max_abs_diff'):.3g})")
    if not out["losses_identical"]:
        why.append(f"loss series differ ({losses.get('steps_original')} vs "
                   f"{losses.get('steps_replay')} steps, max abs diff "
                   f"{losses.get('max_abs_diff')}, correlation {losses.get('correlation')})")
    if not gpu:
        out.update(verdict=DIFFERS, reason="CPU training is deterministic, so a replay must be "
                   "bit-identical: " + "; ".join(why))
        return out
    out["tolerance"] = tol
    corr = losses.get("correlation")
    ok = (not adapters.get("problems")
          and losses.get("steps_original") == losses.get("steps_replay")
          and float(adapters.get("max_abs_diff") or 0.0) <= tol["max_abs_diff"]
          and corr is not None and corr >= tol["loss_correlation"])
    if ok:
        out.update(verdict=WITHIN_TOLERANCE, reason="trained on a GPU, whose kernels are not "
                   "bit-reproducible: every tensor within max abs diff "
                   f"{tol['max_abs_diff']:g} and loss correlation >= "
                   f"{tol['loss_correlation']:g} (" + "; ".join(why) + ")")
    else:
        out.update(verdict=DIFFERS, reason="trained on a GPU, outside the tolerance "
                   f"(max abs diff {tol['max_abs_diff']:g}, loss correlation >= "
                   f"{tol['loss_correlation']:g}): " + "; ".join(why))
    return out


# -- inputs ---------------------------------------------------------------------------------
def _extra(manifest: Mapping[str, Any]) -> dict[str, Any]:
    extra = manifest.get("predicate", {}).get("runDetails", {}).get("metadata", {}).get("extra")
    return extra if isinstance(extra, dict) else {}


def check_replay_inputs(manifest: dict[str, Any], run_id: str, *, inputs: bool = True
                        ) -> list[Problem]:
    """Every pinned input of a record re-hashed: dataset files and base model
    (:func:`~lora_kernel.provenance.inputs.verify_inputs`), the notebook (its source sha256)
    and the config file (its sha256). Empty: all still as pinned. ``inputs`` False (a run
    that trained on a snapshot, which the replay reads instead): the notebook only."""
    s, extra = summary(manifest), _extra(manifest)
    problems = verify_inputs(manifest, run_id) if inputs else []
    checks = [("notebook", extra.get("notebook_path"), s.get("notebook_source_sha256"))]
    if inputs:
        checks.append(("config file", extra.get("config_path"), extra.get("config_sha256")))
    for what, path, want in checks:
        if not path or not want:
            problems.append(Problem("drifted", str(path or what),
                                    f"the record of run {run_id} names no {what} to re-hash"))
            continue
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            problems.append(Problem("drifted", str(path), f"{what} of run {run_id} is missing"))
            continue
        except OSError as exc:
            problems.append(Problem("unreadable", str(path), f"{what} of run {run_id}: "
                                    f"{exc.strerror}"))
            continue
        if got != want:
            problems.append(Problem("drifted", str(path), f"{what} of run {run_id} changed: "
                                    f"sha256 {got[:16]}… was {str(want)[:16]}…"))
    return problems


def package_differences(manifest: Mapping[str, Any]) -> list[str]:
    """Library versions (and lora_enclave's version / git commit) that differ between the
    record and this machine, one line each."""
    build = manifest.get("predicate", {}).get("buildDefinition", {})
    then = build.get("internalParameters", {}).get("environment", {}) or {}
    now = environment_info()
    out = []
    if then.get("python") != now.get("python"):
        out.append(f"python {then.get('python')} -> {now.get('python')}")
    old_pk, new_pk = then.get("packages") or {}, now.get("packages") or {}
    for name in sorted(set(old_pk) | set(new_pk)):
        if old_pk.get(name) != new_pk.get(name):
            out.append(f"{name} {old_pk.get(name)} -> {new_pk.get(name)}")
    from lora_kernel.common.version import version_info

    producer = manifest.get("predicate", {}).get("runDetails", {}).get("builder", {}).get(
        "version") or {}
    mine = version_info()
    for key in ("lora_enclave", "git_commit"):
        if producer.get(key) != mine.get(key):
            out.append(f"{key} {producer.get(key)} -> {mine.get(key)}")
    return out


def _pinned_differences(pinned: PinnedInputs, manifest: dict[str, Any], *,
                        snapshot: bool = False) -> list[str]:
    """What the replay's pin step found that differs from the record (before it trains).
    ``snapshot``: the replay reads the laid-out snapshot, so the config's paths to the
    dataset and model differ (their contents are compared by digest) and so does the
    config file's path (its bytes by sha256)."""
    s = summary(manifest)
    free = FREE_KEYS + (SNAPSHOT_KEYS if snapshot else ())
    out = []
    if not pinned.training:
        out.append("the notebook is no longer a training notebook")
        return out
    if pinned.notebook_sha256 != s["notebook_source_sha256"]:
        out.append("notebook: its sha256 changed between the check and the run")
    if pinned.base_model_sha256 != s["base_model_sha256"]:
        out.append("base model: sha256 changed")
    if pinned.dataset_digests != s["dataset_digests"]:
        old, new = s["dataset_digests"], pinned.dataset_digests or {}
        names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        out.append("dataset files differ: " + ", ".join(names[:20]))
    old_cfg, new_cfg = s["config"], pinned.config or {}
    for key in sorted(old_cfg):
        if key not in free and old_cfg.get(key) != new_cfg.get(key):
            out.append(f"config {key}: {new_cfg.get(key)!r}, recorded {old_cfg.get(key)!r}")
    if int(pinned.seed if pinned.seed is not None else -1) != int(s.get("seed") or 0):
        out.append(f"seed {pinned.seed}, recorded {s.get('seed')}")
    return out


def _device_of(folder: Path) -> str | None:
    """The device a run trained on, from its ``training_summary.json``."""
    try:
        data = json.loads((folder / "training_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(data.get("device")) if isinstance(data, dict) and data.get("device") else None


def _losses_of(folder: Path) -> list[float] | None:
    try:
        data = json.loads((folder / "run_result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    losses = data.get("losses") if isinstance(data, dict) else None
    return [float(x) for x in losses] if isinstance(losses, list) else None


@dataclass
class ReplayOutcome:
    """A finished replay: the original run, the replay's record, the verdict (what
    ``replay.json`` holds) and the ledger entry's seq."""

    run_id: str
    record: RunRecord
    verdict: dict[str, Any]
    ledger_seq: int
    kept: Path | None = None
    package_differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Identical or within tolerance."""
        return self.verdict.get("verdict") in (IDENTICAL, WITHIN_TOLERANCE)


def replay_run(run_id: str, *, home: str | os.PathLike[str] | None = None,
               state: str | os.PathLike[str] | None = None, to: str | os.PathLike[str] | None
               = None, timeout: float | None = None, ctx: RunContext | None = None,
               log: Callable[[str], None] | None = None,
               tolerance: Mapping[str, float] | None = None) -> ReplayOutcome:
    """Replay the sealed training run ``run_id`` (see the module docstring).

    Raises :class:`VerificationError` when the original does not verify, :class:`ConfigError`
    (exit 2, nothing trained) for a run that cannot be replayed (unknown, failed, not a
    training run) or whose pinned inputs changed (the message lists each), and
    :class:`~lora_kernel.common.errors.RunFailed` when the replay run itself fails. ``to``
    keeps a copy of the replayed adapter files there."""
    from lora_kernel.provenance.audit import verify_run
    from lora_kernel.provenance.ledger import LedgerReader
    from lora_kernel.trusted.ledger import Ledger

    say = log or (lambda _msg: None)
    check_run_id(run_id)
    record = runs_dir(state) / run_id
    with LedgerReader(state=state) as ledger:
        if ledger.run_entry(run_id) is None and not record.is_dir():
            raise ConfigError(f"no such run {run_id!r}; fix: pick a run id from "
                              "`lora audit list`", key="RUN")
        problems = verify_run(run_id, ledger, state)
    if problems:
        raise VerificationError(f"run {run_id} does not verify, so it is not replayed: "
                                + "; ".join(map(str, problems)))
    if not record.is_dir():
        raise ConfigError(f"run {run_id} was pruned: nothing to replay", key="RUN")
    manifest = load_manifest(record)
    s, extra = summary(manifest), _extra(manifest)
    if extra.get("kind") not in ("training", "replay") or not extra.get("config_path"):
        raise ConfigError(f"run {run_id} is not a training run: nothing to replay", key="RUN")
    if s["status"] != "succeeded" or not s["adapter_files"]:
        raise ConfigError(f"run {run_id} did not succeed (status {s['status']}): it has no "
                          "adapter to reproduce", key="RUN")
    snapshot = extra.get("snapshot") if isinstance(extra.get("snapshot"), dict) else None
    if snapshot is not None and snapshot.get("read_from") != "snapshot":
        snapshot = None  # trained on the user's files (allow_outside_dataset): re-hash those
    changed = check_replay_inputs(manifest, run_id, inputs=snapshot is None)
    if changed:
        raise ConfigError(f"the pinned inputs of run {run_id} changed, so it is not replayed "
                          f"(nothing trained): " + "; ".join(map(str, changed)), key="RUN")
    packages = package_differences(manifest)
    for line in packages:
        say(f"package differs from the record: {line} (the replay runs anyway)")
    overrides = dict((extra.get("parameters") or {}).get("overrides") or {})
    overrides.pop("output_dir", None)  # the replay's own work folder replaces it
    params = {"config_path": extra["config_path"], "overrides": overrides}
    if extra.get("resumed_from_run"):
        say(f"run {run_id} was resumed from run {extra['resumed_from_run']}: the replay trains "
            "it uninterrupted (resume is exact, so the adapter must be the same)")

    def check_pinned(pinned: PinnedInputs) -> None:
        diffs = _pinned_differences(pinned, manifest, snapshot=snapshot is not None)
        if diffs:
            raise ConfigError(f"the replay of run {run_id} would not use the recorded inputs "
                              "(nothing trained): " + "; ".join(diffs), key="RUN")

    def before_seal(staging: Path, man_extra: dict[str, Any]) -> None:
        try:
            adapters = compare_adapters(record / "adapter", staging / "adapter")
            losses = compare_losses(extra.get("losses"), _losses_of(staging))
            devices = {"original": _device_of(record), "replay": _device_of(staging)}
            gpu = any(str(d).startswith("cuda") for d in devices.values())
            verdict = verdict_of(adapters, losses, gpu=gpu, tolerance=tolerance)
            verdict.update({"devices": devices, "adapters": adapters, "losses": losses})
        except Exception as exc:  # noqa: BLE001 - a broken comparison is a "differs" verdict
            verdict = {"verdict": DIFFERS, "reason": f"the comparison failed: {exc}"}
        verdict.update({"replay_of": run_id, "package_differences": packages})
        (staging / REPLAY_FILE).write_text(json.dumps(verdict, indent=1, sort_keys=True)
                                           + "\n", encoding="utf-8")
        man_extra["replay"] = {k: verdict.get(k) for k in (
            "verdict", "reason", "mode", "max_abs_diff", "loss_max_abs_diff",
            "loss_correlation", "tolerance", "package_differences")}

    say(f"replaying run {run_id}: " + ("inputs re-hashed and unchanged" if snapshot is None
                                        else "from its snapshot in the store"))
    rec = run_notebook(str(extra.get("notebook_path") or extra["notebook"]), params, home=home,
                       state=state, timeout=timeout, ctx=ctx, log=log,
                       hooks=RunHooks(check_pinned=check_pinned,
                                      snapshot=None if snapshot is None else {
                                          **snapshot, "config": s["config"]},
                                      extra={"kind": "replay", "replay_of": run_id},
                                      before_seal=before_seal, model_hash_cache=False))
    try:
        verdict = json.loads((rec.path / REPLAY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        verdict = {"verdict": DIFFERS, "reason": "the replay record holds no verdict"}
    with Ledger(state=state) as ledger:
        entry = ledger.append("replay", run_id, {
            "replay_run": rec.run_id, "verdict": verdict.get("verdict"),
            "reason": verdict.get("reason"), "max_abs_diff": verdict.get("max_abs_diff"),
            "loss_correlation": verdict.get("loss_correlation"),
            "tolerance": verdict.get("tolerance"), "replay_manifest_sha256":
                rec.manifest_sha256, "package_differences": packages})
    kept = None
    if to is not None:
        kept = Path(to)
        kept.mkdir(parents=True, exist_ok=True)
        for item in sorted((rec.path / "adapter").iterdir()):
            dest = kept / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(item, dest)
        for path in kept.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)  # the record's copies are 0444
    say(f"replay of {run_id}: {verdict.get('verdict')} ({rec.run_id})")
    return ReplayOutcome(run_id, rec, verdict, entry.seq, kept, packages)
