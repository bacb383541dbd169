"""The content-addressed snapshot store (lora_kernel.trusted.objects): files are stored once by
the sha256 the runner computes itself; a file whose bytes are not the pinned ones refuses the
run with nothing indexed; a laid-out snapshot hashes to exactly the pinned dataset version and
model digest; the store refuses a snapshot it has no room for; pruning keeps what kept
records use; ``lora data versions / show / diff`` read it. (Runs through the store:
tests/trusted/test_runner.py and test_replay.py.)"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from lora_kernel.common.digests import listing_sha256, path_sha256, sha256_bytes
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.trusted import objects


def _tar(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _inputs(tmp_path: Path) -> tuple[dict, dict, dict[str, bytes]]:
    """A small dataset folder, a model folder and a config, as the pin step answers them."""
    data, model = tmp_path / "data", tmp_path / "model"
    (data / "sub").mkdir(parents=True)
    (model / "unet").mkdir(parents=True)
    content = {"a.png": b"image a", "sub/b.txt": b"caption b", "dup.png": b"image a"}
    for rel, blob in content.items():
        (data / rel).write_bytes(blob)
    (model / "unet" / "w.safetensors").write_bytes(b"weights")
    (model / "model_index.json").write_bytes(b"{}")
    config = tmp_path / "cfg.yaml"
    config.write_bytes(b"task: image\n")
    digests = {rel: sha256_bytes(b) for rel, b in sorted(content.items())}
    pinned = {"dataset_digests": digests,
              "dataset_version": "ds-" + listing_sha256(digests)[:32],
              "config_sha256": sha256_bytes(config.read_bytes()),
              "base_model_sha256": path_sha256(model)}
    sources = {"dataset": {rel: str(data / rel) for rel in content}, "base_model": str(model),
               "config": str(config)}
    return pinned, sources, content


def _send(request: list[list[str]]) -> io.BytesIO:
    """What the executor's snapshot command writes for ``request``."""
    from lora_kernel.steps.executor import snapshot

    buf = io.BytesIO()
    snapshot({"files": request}, buf)
    buf.seek(0)
    return buf


def test_a_snapshot_is_stored_once_and_lays_out_to_the_pinned_digests(tmp_path):
    pinned, sources, _content = _inputs(tmp_path)
    store = objects.ObjectStore(tmp_path / "state" / "objects")
    request = objects.snapshot_request(pinned, sources, store)
    # two dataset files share their bytes: asked for once; the model folder as a whole
    assert sorted(name for name, _ in request if name.startswith("d/")) == sorted(
        {f"d/{s}" for s in pinned["dataset_digests"].values()})
    assert ["m", sources["base_model"]] in request
    got = store.receive(_send(request))
    snap = objects.accept(pinned, sources, got, store, "run-1")
    held = sorted(p for p in (store.root / "sha256").rglob("*") if p.is_file())
    assert len(held) == 2 + 1 + 2  # 2 distinct dataset blobs, the config, 2 model files
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in held)

    # the next run of the same inputs asks for nothing
    assert objects.snapshot_request(pinned, sources, store) == []

    dest = tmp_path / "work" / "inputs"
    laid = objects.lay_out(store, snap, dest)
    assert path_sha256(laid["base_model"]) == pinned["base_model_sha256"]
    root = Path(laid["train_data_dir"])
    assert {f.relative_to(root).as_posix(): sha256_bytes(f.read_bytes())
            for f in root.rglob("*") if f.is_file()} == pinned["dataset_digests"]
    assert sha256_bytes(Path(laid["config"]).read_bytes()) == pinned["config_sha256"]
    with pytest.raises(PermissionError):
        if os.geteuid() == 0:  # root ignores modes: the bits are what protects the store
            assert (root / "a.png").stat().st_mode & 0o222 == 0
            raise PermissionError
        (root / "a.png").write_bytes(b"edited")

    index = json.loads((store.root / "datasets" / f"{pinned['dataset_version']}.json")
                       .read_text())
    assert index["first_run"] == "run-1" and index["files"] == pinned["dataset_digests"]


def test_a_file_changed_after_the_pin_refuses_the_snapshot_and_indexes_nothing(tmp_path):
    pinned, sources, _content = _inputs(tmp_path)
    Path(sources["dataset"]["sub/b.txt"]).write_bytes(b"another caption")  # after the pin
    store = objects.ObjectStore(tmp_path / "state" / "objects")
    got = store.receive(_send(objects.snapshot_request(pinned, sources, store)))
    with pytest.raises(VerificationError, match="changed while the run was pinned"):
        objects.accept(pinned, sources, got, store, "run-1")
    assert not (store.root / "datasets").exists() and not (store.root / "models").exists()

    # the model folder changed after the pin: its listing is not the pinned digest
    pinned, sources, _content = _inputs(tmp_path / "again")
    (Path(sources["base_model"]) / "extra.bin").write_bytes(b"planted")
    got = store.receive(_send(objects.snapshot_request(pinned, sources, store)))
    with pytest.raises(VerificationError, match="base model folder changed"):
        objects.accept(pinned, sources, got, store, "run-2")

    # a tar that names a path outside the store, or a link, is refused as it comes
    with pytest.raises(VerificationError, match="not a plain file"):
        store.receive(_tar({"../escape": b"x"}))


def test_a_full_store_refuses_the_snapshot_before_anything_runs(tmp_path, monkeypatch):
    pinned, sources, _content = _inputs(tmp_path)
    store = objects.ObjectStore(tmp_path / "state" / "objects")
    request = objects.snapshot_request(pinned, sources, store)
    objects.check_free_space(store, request)  # a disk with room: accepted

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(objects.os, "statvfs", lambda _p: Full)
    with pytest.raises(ConfigError, match=r"MiB free.*fix: free space"):
        objects.check_free_space(store, request)


def test_prune_keeps_what_kept_records_use(tmp_path, monkeypatch):
    pinned, sources, _content = _inputs(tmp_path)
    state = tmp_path / "state"
    store = objects.ObjectStore(state / "objects")
    got = store.receive(_send(objects.snapshot_request(pinned, sources, store)))
    snap = objects.accept(pinned, sources, got, store, "run-1")
    record = state / "runs" / "run-1"
    record.mkdir(parents=True)
    manifest = {"subject": [], "predicate": {"runDetails": {"metadata": {"extra": {
        "snapshot": {"read_from": "snapshot", **snap.record()}}}}}}
    (record / "manifest.json").write_text(json.dumps(manifest))
    orphan = store.receive(_tar({"x": b"nobody pinned this"}))["x"][0]
    removed = objects.prune_store(state)
    assert removed["objects"] == 1 and not store.has(orphan)
    assert all(store.has(s) for s in snap.objects)

    # the record goes: so does its snapshot
    (record / "manifest.json").unlink()
    record.rmdir()
    removed = objects.prune_store(state)
    assert removed["datasets"] == 1 and removed["models"] == 1
    assert not any(store.has(s) for s in snap.objects)


def test_lora_data_versions_show_and_diff_read_the_store(tmp_path, monkeypatch, capsys):
    from lora_kernel.cli import main as cli

    def lora(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out + out.err

    state = tmp_path / "state"
    store = objects.ObjectStore(state / "objects")
    versions = []
    for n, extra in enumerate((b"", b" and more")):
        pinned, sources, _ = _inputs(tmp_path / f"v{n}")
        Path(sources["dataset"]["sub/b.txt"]).write_bytes(b"caption b" + extra)
        pinned["dataset_digests"]["sub/b.txt"] = sha256_bytes(b"caption b" + extra)
        pinned["dataset_version"] = "ds-" + listing_sha256(pinned["dataset_digests"])[:32]
        got = store.receive(_send(objects.snapshot_request(pinned, sources, store)))
        objects.accept(pinned, sources, got, store, f"run-{n}")
        versions.append(pinned["dataset_version"])
    code, out = lora("data", "versions", "--state", state)
    assert code == 0 and all(v in out for v in versions), out
    code, out = lora("data", "show", versions[0], "--state", state)
    assert code == 0 and "sub/b.txt" in out and "run-0" in out, out
    code, out = lora("data", "diff", versions[0], versions[1], "--state", state)
    assert code == 0 and "0 added, 0 removed, 1 changed" in out, out
    code, out = lora("data", "show", "ds-" + "0" * 32, "--state", state)
    assert code == 2 and "lora data versions" in out, out


def test_reg_and_held_out_images_are_laid_out_in_their_own_folders(tmp_path):
    """Dataset keys ``reg:<path>`` (reg_data_dir) and ``val:<path>`` (validation_dir) go to
    ``reg/`` and ``val/`` beside ``dataset/``, and the run's config points there: the same
    relative paths, so the training computes the pinned dataset version from them."""
    pinned, sources, _content = _inputs(tmp_path)
    extra = {"reg:1_person/r.png": b"reg image", "val:v.png": b"held out"}
    for key, blob in extra.items():
        path = tmp_path / key.replace(":", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        sources["dataset"][key] = str(path)
        pinned["dataset_digests"][key] = sha256_bytes(blob)
    pinned["dataset_version"] = "ds-" + listing_sha256(pinned["dataset_digests"])[:32]
    store = objects.ObjectStore(tmp_path / "state" / "objects")
    got = store.receive(_send(objects.snapshot_request(pinned, sources, store)))
    snap = objects.accept(pinned, sources, got, store, "run-1")
    laid = objects.lay_out(store, snap, tmp_path / "inputs")
    assert (Path(laid["reg_data_dir"]) / "1_person" / "r.png").read_bytes() == b"reg image"
    assert (Path(laid["validation_dir"]) / "v.png").read_bytes() == b"held out"
    data = Path(laid["train_data_dir"])
    assert not any(":" in p.name for p in data.rglob("*"))  # only the training folder's files
