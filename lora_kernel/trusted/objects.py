"""The content-addressed store of pinned inputs (``<state>/objects/``): every dataset file,
base model file and config file a recorded training run was pinned on, stored once by its
sha256 however many runs use it, owned by the service account. A recorded run reads only
its snapshot, materialized from here; a replay reads the same snapshot, whatever became of
the user's files since.

::

    <state>/objects/
      sha256/ab/cdef…        the bytes of one file (mode 0444), named by its sha256
      datasets/ds-….json     a dataset version: {key: sha256} as the manifest pins it, sizes,
                             the run that stored it first
      models/<sha256>.json   a base model: a single file ({"file": name, "sha256"}) or a
                             folder ({relative path: sha256}), its digest as the manifest's
                             ``base_model_sha256``
      tmp/                   files being received (renamed into sha256/ once hashed)

How files get here (:func:`ingest`): the pin step, as the user (who holds the read rights),
answers with where each pinned file is; the runner asks a ``snapshot`` child (as the user)
for the files this store lacks and reads its tar, hashing every byte itself. A file whose
sha256 is not the one the pin step answered (changed since, or a lying child) refuses the
run before anything trains; a model folder whose listing digest is not the pinned one
likewise. Nothing half-stored is left: a file is renamed into place only once its hash
checked, and indexes are written last.

:func:`materialize` lays a snapshot out as a folder tree (hard links, else copies, mode
0444) where the run reads it; :func:`prune` removes objects no kept record references.

Runs as: the service account (local mode: the requesting user's own account).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.digests import OUTSIDE_PREFIX, REG_PREFIX, VAL_PREFIX, listing_sha256
from lora_kernel.common.errors import ConfigError, LoraError, VerificationError
from lora_kernel.common.paths import state_dir
from lora_kernel.common.timeutil import iso_time
from lora_kernel.provenance.datasets import read_index, snapshots_in_use

CHUNK = 1 << 20
# Free space the store keeps beyond a snapshot's own size when it checks at the pin.
FREE_MARGIN = 64 << 20


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class ObjectStore:
    """The store under ``<state>/objects``."""

    root: Path

    @classmethod
    def of(cls, state: str | os.PathLike[str] | None = None) -> ObjectStore:
        return cls(state_dir(state) / "objects")

    def object_path(self, sha: str) -> Path:
        if not _is_sha(sha):
            raise VerificationError(f"not a sha256: {sha!r}")
        return self.root / "sha256" / sha[:2] / sha[2:]

    def has(self, sha: str) -> bool:
        return self.object_path(sha).is_file()

    def _index(self, kind: str, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"not a snapshot name: {name!r}")
        return self.root / kind / f"{name}.json"

    def read_index(self, kind: str, name: str) -> dict[str, Any] | None:
        return read_index(self.root, kind, name)

    def write_index(self, kind: str, name: str, doc: Mapping[str, Any]) -> None:
        path = self._index(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", mode=0o644)

    def indexes(self, kind: str) -> list[dict[str, Any]]:
        folder = self.root / kind
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            doc = self.read_index(kind, path.stem)
            if doc is not None:
                out.append(doc)
        return out

    # -- receiving ------------------------------------------------------------------------
    def receive(self, stream: IO[bytes]) -> dict[str, tuple[str, int]]:
        """Store every plain file of the tar on ``stream``; ``{arcname: (sha256, size)}``.
        Each file is hashed here while written to ``tmp/`` and renamed into place (dedup: a
        file already held is dropped). Links, folders and odd names are refused."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        got: dict[str, tuple[str, int]] = {}
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise VerificationError(f"the snapshot step sent {member.name!r}, not a "
                                            "plain file under a relative name")
                src = tar.extractfile(member)
                if src is None:
                    raise VerificationError(f"the snapshot step sent no bytes for "
                                            f"{member.name!r}")
                got[member.name] = self._store(src, tmp)
        return got

    def _store(self, src: IO[bytes], tmp: Path) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        fd, tmp_name = _mkstemp(tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = h.hexdigest()
            dest = self.object_path(sha)
            if dest.is_file():
                os.unlink(tmp_name)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                os.chmod(tmp_name, 0o444)
                os.replace(tmp_name, dest)
            return sha, size
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    # -- laying out -----------------------------------------------------------------------
    def materialize(self, files: Mapping[str, str], dest: Path) -> None:
        """Lay ``files`` (``{relative path: sha256}``) out under ``dest``: hard links to the
        objects (mode 0444), copies where the store is on another filesystem."""
        for rel, sha in sorted(files.items()):
            parts = PurePosixPath(rel).parts
            if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
                raise VerificationError(f"snapshot entry {rel!r} is not a relative path")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            src = self.object_path(sha)
            if not src.is_file():
                raise VerificationError(f"the snapshot's file {rel} (sha256 {sha[:16]}…) is "
                                        f"not in the store {self.root}")
            try:
                os.link(src, target)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(src, target)
                os.chmod(target, 0o444)

    def size_of(self, shas: Iterable[str]) -> int:
        return sum(self.object_path(s).stat().st_size for s in set(shas) if self.has(s))

    # -- pruning --------------------------------------------------------------------------
    def prune(self, keep: set[str], keep_datasets: set[str], keep_models: set[str]
              ) -> dict[str, int]:
        """Remove objects, dataset and model indexes no kept record references: ``keep``
        are object digests, ``keep_datasets`` dataset versions, ``keep_models`` model
        digests (their files are kept too). Returns the counts and bytes removed."""
        removed = {"objects": 0, "bytes": 0, "datasets": 0, "models": 0}
        for kind, kept, key in (("datasets", keep_datasets, "datasets"),
                                ("models", keep_models, "models")):
            for doc in self.indexes(kind):
                name = str(doc.get("id"))
                if name in kept:
                    keep.update(_index_objects(doc))
                    continue
                self._index(kind, name).unlink(missing_ok=True)
                removed[key] += 1
        objects = self.root / "sha256"
        for path in sorted(objects.glob("*/*")) if objects.is_dir() else []:
            sha = path.parent.name + path.name
            if sha not in keep:
                removed["bytes"] += path.stat().st_size
                path.unlink()
                removed["objects"] += 1
        return removed


def prune_store(state: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Remove from the store every snapshot (dataset version, base model, config, their
    files) that no kept record and no run in flight was pinned on (after ``lora audit
    prune``); the counts removed."""
    store = ObjectStore.of(state)
    if not store.root.is_dir():
        return {"objects": 0, "bytes": 0, "datasets": 0, "models": 0}
    datasets, models, configs = snapshots_in_use(state)
    return store.prune(set(configs), datasets, models)


def _mkstemp(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=folder, prefix="in-")


def _index_objects(doc: Mapping[str, Any]) -> set[str]:
    files = doc.get("files")
    return {v for v in files.values() if _is_sha(v)} if isinstance(files, dict) else set()


# -- what a run stores and reads ------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """The snapshot of one training run's pinned inputs: its dataset version and files
    (``{key: sha256}``), its base model (a file's name, or a folder's files) and digest, the
    config file's sha256. ``record()`` is what the manifest's ``extra.snapshot`` says."""

    dataset_version: str
    dataset: dict[str, str]
    base_model_sha256: str
    model_files: dict[str, str]  # relative path → sha256 (a single file: {name: sha256})
    model_is_file: bool
    config_sha256: str
    config_name: str
    init_adapter_sha256: str | None = None  # init_adapter: a file or folder, as the model
    init_files: dict[str, str] | None = None
    init_is_file: bool = False

    def record(self) -> dict[str, Any]:
        out = {"dataset_version": self.dataset_version,
               "base_model_sha256": self.base_model_sha256,
               "config_sha256": self.config_sha256, "config_name": self.config_name,
               "files": len(self.dataset) + len(self.model_files) + 1
               + len(self.init_files or {})}
        if self.init_adapter_sha256:
            out["init_adapter_sha256"] = self.init_adapter_sha256
        return out

    @property
    def objects(self) -> set[str]:
        return {*self.dataset.values(), *self.model_files.values(), self.config_sha256,
                *(self.init_files or {}).values()}


def snapshot_request(pinned: Mapping[str, Any], sources: Mapping[str, Any],
                     store: ObjectStore) -> list[list[str]]:
    """The ``[[arcname, path], ...]`` the ``snapshot`` child must send: the dataset files
    (arcname ``d/<sha256>``) and the config (``c/<sha256>``) the store lacks, and the base
    model (``m``: the file, or every file of the folder) unless the store holds it already."""
    want: list[list[str]] = []
    dataset = sources.get("dataset") or {}
    seen = set()
    for key, sha in sorted(pinned["dataset_digests"].items()):
        if not store.has(sha) and sha not in seen and isinstance(dataset.get(key), str):
            want.append([f"d/{sha}", dataset[key]])
            seen.add(sha)
    config_sha = pinned["config_sha256"]
    if not store.has(config_sha):
        want.append([f"c/{config_sha}", str(sources["config"])])
    for key, digest, source in (("m", pinned["base_model_sha256"], "base_model"),
                                ("i", pinned.get("init_adapter_sha256"), "init_adapter")):
        if not digest:
            continue
        tree = store.read_index("models", digest)
        if tree is None or not all(store.has(s) for s in _index_objects(tree)):
            want.append([key, str(sources[source])])
    return want


def check_free_space(store: ObjectStore, request: list[list[str]]) -> None:
    """The store's filesystem must hold the files about to be received plus
    :data:`FREE_MARGIN`; :class:`LoraError` (exit 2) naming both numbers when it does not."""
    need = 0
    for _name, path in request:
        p = Path(path)
        with contextlib.suppress(OSError):
            need += p.stat().st_size if p.is_file() else sum(
                f.stat().st_size for f in p.rglob("*") if f.is_file())
    store.root.mkdir(parents=True, exist_ok=True, mode=0o755)
    st = os.statvfs(store.root)
    free = st.f_bavail * st.f_frsize
    if free < need + FREE_MARGIN:
        raise ConfigError(f"the state store {store.root} has {free >> 20} MiB free and this "
                          f"run's snapshot needs {need >> 20} MiB plus {FREE_MARGIN >> 20} MiB "
                          "of margin; nothing was run; fix: free space there (lora audit prune "
                          "removes records the retention policy allows, and their snapshots)",
                          file=store.root)


def accept(pinned: Mapping[str, Any], sources: Mapping[str, Any], got: dict[str, tuple[str, int]],
           store: ObjectStore, run_id: str) -> Snapshot:
    """Check what the ``snapshot`` child sent (``got``, from :meth:`ObjectStore.receive`)
    against the pin step's digests and write the dataset and model indexes. A file whose
    hash is not the pinned one: :class:`VerificationError` naming it (changed since the pin)."""
    for name, (sha, _size) in sorted(got.items()):
        if name[:2] in ("d/", "c/") and name[2:] != sha:
            raise VerificationError(f"a pinned input changed while the run was pinned: "
                                    f"expected sha256 {name[2:16]}…, read {sha[:16]}…; nothing "
                                    "was run; fix: leave the dataset and config unchanged "
                                    "while a run starts, and run again")
    dataset = dict(pinned["dataset_digests"])
    missing = sorted(k for k, s in dataset.items() if not store.has(s))
    if missing:
        raise VerificationError(f"the snapshot lacks the dataset file {missing[0]}; nothing "
                                "was run")
    base_sha = pinned["base_model_sha256"]
    model = _tree(got, store, "m", base_sha, Path(str(sources["base_model"])).name, run_id,
                  "base model")
    init_sha = pinned.get("init_adapter_sha256")
    init = _tree(got, store, "i", init_sha, Path(str(sources.get("init_adapter"))).name,
                 run_id, "init_adapter") if init_sha else None
    version = pinned["dataset_version"]
    if store.read_index("datasets", version) is None:
        sizes = {k: store.object_path(s).stat().st_size for k, s in dataset.items()}
        store.write_index("datasets", version, {
            "id": version, "files": dataset, "sizes": sizes, "bytes": sum(sizes.values()),
            "first_run": run_id, "stored": iso_time(),
            "outside": sorted(k for k in dataset if k.startswith(OUTSIDE_PREFIX))})
    files = model["files"]
    return Snapshot(dataset_version=version, dataset=dataset, base_model_sha256=base_sha,
                    model_files=dict(files), model_is_file=model.get("kind") == "file",
                    config_sha256=pinned["config_sha256"],
                    config_name=Path(str(sources["config"])).name,
                    init_adapter_sha256=init_sha or None,
                    init_files=dict(init["files"]) if init else None,
                    init_is_file=bool(init and init.get("kind") == "file"))


def _tree(got: dict[str, tuple[str, int]], store: ObjectStore, key: str, digest: str,
          name: str, run_id: str, what: str) -> dict[str, Any]:
    """The index of a model-like input (a file, or a folder by its listing digest): the
    store's when it holds all of it, else built from what was received and written."""
    tree = store.read_index("models", digest)
    if tree is not None and all(store.has(s) for s in _index_objects(tree)):
        return tree
    tree = _tree_index(got, key, digest, name, run_id, what)
    store.write_index("models", digest, tree)
    return tree


def _tree_index(got: dict[str, tuple[str, int]], key: str, digest: str, name: str,
                run_id: str, what: str) -> dict[str, Any]:
    if key in got:  # a single file
        sha, size = got[key]
        if sha != digest:
            raise VerificationError(f"the {what} changed while the run was pinned "
                                    f"(sha256 {sha[:16]}…, pinned {digest[:16]}…); nothing was "
                                    "run; fix: run again once the file is complete")
        return {"id": digest, "kind": "file", "name": name, "files": {name: sha},
                "bytes": size, "stored": iso_time(), "first_run": run_id}
    files = {n[2:]: s for n, (s, _z) in got.items() if n.startswith(f"{key}/")}
    if not files:
        raise LoraError(f"the snapshot step sent no {what} files")
    listing = listing_sha256(files)
    if listing != digest:
        raise VerificationError(f"the {what} folder changed while the run was pinned "
                                f"(listing sha256 {listing[:16]}…, pinned {digest[:16]}…); "
                                "nothing was run; fix: run again once it is complete")
    size = sum(z for n, (_s, z) in got.items() if n.startswith(f"{key}/"))
    return {"id": digest, "kind": "folder", "name": name, "files": files, "bytes": size,
            "stored": iso_time(), "first_run": run_id}


def lay_out(store: ObjectStore, snap: Snapshot, dest: Path) -> dict[str, str]:
    """Materialize ``snap`` under ``dest``: ``dataset/`` (its keys as relative paths),
    ``reg/`` and ``val/`` (regularization and held-out images), ``model/`` (the folder, or
    ``model/<name>`` for a single file), ``config/<name>`` and ``init_adapter/``. Returns
    :func:`laid_paths`."""
    for part, files in _dataset_parts(snap.dataset).items():
        store.materialize(files, dest / part)
    store.materialize(snap.model_files, dest / "model")
    store.materialize({snap.config_name: snap.config_sha256}, dest / "config")
    if snap.init_files:
        store.materialize(snap.init_files, dest / "init_adapter")
    for folder in [dest, *dest.rglob("*")]:  # readable by the run's user whatever the umask
        if folder.is_dir() and not folder.is_symlink():
            os.chmod(folder, 0o755)
    return laid_paths(snap, dest)


# Dataset keys of the files of other folders than train_data_dir, and where they are laid out.
PREFIX_FOLDERS = ((REG_PREFIX, "reg"), (VAL_PREFIX, "val"))


def _dataset_parts(dataset: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The dataset's keys split by folder: ``dataset`` (train_data_dir's), ``reg``
    (``reg_data_dir``'s, keys ``reg:<path>``) and ``val`` (``validation_dir``'s)."""
    parts: dict[str, dict[str, str]] = {"dataset": {}}
    for key, sha in dataset.items():
        folder, rel = "dataset", key
        for prefix, name in PREFIX_FOLDERS:
            if key.startswith(prefix):
                folder, rel = name, key[len(prefix):]
        parts.setdefault(folder, {})[rel] = sha
    return parts


def laid_paths(snap: Snapshot, dest: Path) -> dict[str, str]:
    """Where :func:`lay_out` puts ``snap`` under ``dest``: the paths the run's config is
    pointed at (``train_data_dir``, ``base_model``, ``config``, ``init_adapter``)."""
    model = dest / "model" / next(iter(snap.model_files)) if snap.model_is_file \
        else dest / "model"
    out = {"train_data_dir": str(dest / "dataset"), "base_model": str(model),
           "config": str(dest / "config" / snap.config_name)}
    parts = _dataset_parts(snap.dataset)
    for key, folder in (("reg_data_dir", "reg"), ("validation_dir", "val")):
        if folder in parts:
            out[key] = str(dest / folder)
    if snap.init_files:
        out["init_adapter"] = str(dest / "init_adapter" / next(iter(snap.init_files))
                                  if snap.init_is_file else dest / "init_adapter")
    return out


def check_objects(store: ObjectStore, snap: Snapshot) -> None:
    """Re-hash every object of ``snap``: :class:`VerificationError` naming the first whose
    bytes are not its name (a damaged or edited store)."""
    from lora_kernel.common.digests import sha256_file

    for sha in sorted(snap.objects):
        path = store.object_path(sha)
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise VerificationError(f"{path}: the snapshot's object is unreadable "
                                    f"({exc.strerror or exc})") from None
        if got != sha:
            raise VerificationError(f"{path}: the snapshot's object was changed in the store "
                                    f"(its bytes hash to {got[:16]}…); the records pinned on "
                                    "it can no longer be replayed")


def snapshot_of_record(store: ObjectStore, snapshot: Mapping[str, Any]) -> Snapshot:
    """The :class:`Snapshot` a record's ``extra.snapshot`` names, from the store's indexes;
    :class:`VerificationError` when the store no longer holds it (pruned)."""
    version = str(snapshot.get("dataset_version"))
    base = str(snapshot.get("base_model_sha256"))
    ds, model = store.read_index("datasets", version), store.read_index("models", base)
    if ds is None or model is None:
        what = f"dataset {version}" if ds is None else f"base model {base[:16]}…"
        raise VerificationError(f"the snapshot store {store.root} no longer holds the {what} "
                                "this run was pinned on (pruned?)")
    init_sha = snapshot.get("init_adapter_sha256")
    init = store.read_index("models", str(init_sha)) if init_sha else None
    if init_sha and init is None:
        raise VerificationError(f"the snapshot store {store.root} no longer holds the "
                                f"init_adapter {str(init_sha)[:16]}… this run started from")
    return Snapshot(dataset_version=version, dataset=dict(ds["files"]), base_model_sha256=base,
                    model_files=dict(model["files"]), model_is_file=model.get("kind") == "file",
                    config_sha256=str(snapshot.get("config_sha256")),
                    config_name=str(snapshot.get("config_name") or "config.yaml"),
                    init_adapter_sha256=str(init_sha) if init_sha else None,
                    init_files=dict(init["files"]) if init else None,
                    init_is_file=bool(init and init.get("kind") == "file"))
