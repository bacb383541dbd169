"""``lora audit verify --inputs``: a run's dataset files and base model re-hashed against its
manifest, naming what changed or went missing; inputs are only checked when asked."""
from __future__ import annotations

import datetime as dt

import pytest

from lora_kernel.common.digests import OUTSIDE_PREFIX, path_sha256, sha256_file
from lora_kernel.provenance.inputs import verify_inputs
from lora_kernel.provenance.records import load_manifest, summary
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.sealing import (
    build_manifest,
    make_staging_dir,
    seal_record,
    write_manifest,
)


@pytest.fixture(autouse=True)
def policies(tmp_path, monkeypatch):
    """No policy pin from the repository: these tests are about inputs, not keys."""
    pdir = tmp_path / "policies"
    pdir.mkdir()
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return pdir


def _inputs(state_tmp, dataset="ds-a", model="tiny"):
    base = state_tmp.parent / "inputs"
    return base / dataset, base / "models" / model / "model.safetensors"


def _manifest(tmp_path, config, dataset_digests, base_model_sha256=""):
    """A manifest as the runner builds it (over an empty record folder)."""
    folder = tmp_path / "empty_record"
    folder.mkdir(exist_ok=True)
    return build_manifest(folder, run_id="hand", user="alice", host="h",
                          started="2024-01-01T00:00:00Z", ended="2024-01-01T00:01:00Z",
                          status="succeeded", config=config,
                          base_model_sha256=base_model_sha256, dataset_version="ds-x",
                          dataset_digests=dataset_digests, notebook_source_sha256="ab" * 32,
                          seed=1, egress_refusals=0)


# -- 6. through the CLI ---------------------------------------------------------------------
def test_fresh_record_inputs_verify(make_run, lora):
    make_run("r1")
    make_run("r2", dataset="ds-b", seed=2)
    code, out = lora("audit", "verify", "r1", "--inputs")
    assert code == 0 and "inputs" in out and "OK:" in out, out
    code, out = lora("audit", "verify", "--all", "--inputs")
    assert code == 0 and "OK: 2 run(s)" in out, out


def test_changed_dataset_file_is_named_only_with_inputs(make_run, lora, state_tmp):
    make_run("r1")
    make_run("r2", dataset="ds-b", seed=2)
    ddir, _ = _inputs(state_tmp)
    with open(ddir / "a.png", "ab") as fh:
        fh.write(b"\x00appended")
    code, out = lora("audit", "verify", "r1", "--inputs")
    assert code == 5 and f"[drifted] {ddir / 'a.png'}" in out and "changed" in out, out
    assert "metadata.csv" not in out and "Traceback" not in out, out
    code, out = lora("audit", "verify", "--all", "--inputs")
    assert code == 5 and str(ddir / "a.png") in out and "run r1" in out, out
    assert "ds-b" not in out and "run r2" not in out, out  # r2's dataset is untouched
    assert lora("audit", "verify", "r2", "--inputs")[0] == 0
    code, out = lora("audit", "verify", "r1")  # inputs are only checked when asked
    assert code == 0, out
    assert lora("audit", "verify", "--all")[0] == 0


def test_deleted_dataset_file_is_named_missing(make_run, lora, state_tmp):
    make_run("r1")
    ddir, _ = _inputs(state_tmp)
    (ddir / "metadata.csv").unlink()
    code, out = lora("audit", "verify", "r1", "--inputs")
    assert code == 5 and str(ddir / "metadata.csv") in out and "missing" in out, out
    assert "a.png" not in out, out
    assert lora("audit", "verify", "r1")[0] == 0


def test_changed_base_model_is_named(make_run, lora, state_tmp):
    make_run("r1")
    _, model = _inputs(state_tmp)
    with open(model, "ab") as fh:
        fh.write(b"x")
    code, out = lora("audit", "verify", "--all", "--inputs")
    assert code == 5 and str(model) in out and "base model of run r1 changed" in out, out
    assert lora("audit", "verify", "--all")[0] == 0
    model.unlink()
    code, out = lora("audit", "verify", "r1", "--inputs")
    assert code == 5 and "base model of run r1 is missing" in out, out


def test_unreadable_manifest_with_inputs_reports_not_crashes(make_run, lora):
    r1 = make_run("r1")
    make_run("r2", seed=2)
    (r1 / "manifest.json").chmod(0o644)
    (r1 / "manifest.json").write_text("{not json")
    code, out = lora("audit", "verify", "--all", "--inputs")
    assert code == 5 and "Traceback" not in out, out
    assert f"[manifest] {r1 / 'manifest.json'}" in out and "trust: ledger key" in out, out
    assert lora("audit", "verify", "r2", "--inputs")[0] == 0


# -- 7. files outside the dataset folder (allow_outside_dataset) ------------------------------
def test_outside_dataset_file_rehashed_at_its_absolute_path(tmp_path, state_tmp):
    ddir = tmp_path / "data"
    ddir.mkdir()
    (ddir / "metadata.csv").write_text("file_name,text\na.png,x\n")
    outside = tmp_path / "elsewhere" / "b.png"
    outside.parent.mkdir()
    outside.write_bytes(b"outside bytes")
    (ddir / "b.png").write_bytes(b"a decoy inside the folder with the same name")
    digests = {"metadata.csv": sha256_file(ddir / "metadata.csv"),
               OUTSIDE_PREFIX + str(outside): sha256_file(outside)}
    manifest = _manifest(tmp_path, {"train_data_dir": str(ddir)}, digests)
    assert OUTSIDE_PREFIX + str(outside) in summary(manifest)["dataset_digests"]
    assert verify_inputs(manifest, "hand") == []
    outside.write_bytes(b"changed")
    problems = verify_inputs(manifest, "hand")
    assert [(p.code, p.where) for p in problems] == [("drifted", str(outside))]
    assert "changed" in problems[0].what and "run hand" in problems[0].what
    outside.unlink()
    problems = verify_inputs(manifest, "hand")
    assert [(p.where, "missing" in p.what) for p in problems] == [(str(outside), True)]


def test_outside_dataset_record_through_the_cli(tmp_path, state_tmp, lora):
    ddir = tmp_path / "data"
    ddir.mkdir()
    (ddir / "metadata.csv").write_text("file_name,text\n../elsewhere/b.png,x\n")
    outside = tmp_path / "elsewhere" / "b.png"
    outside.parent.mkdir()
    outside.write_bytes(b"outside bytes")
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    staging = make_staging_dir(state_tmp / "runs", "ro1")
    (staging / "events.jsonl").write_text("{}\n")
    manifest = build_manifest(
        staging, run_id="ro1", user="alice", host="h",
        started=dt.datetime.now(dt.UTC), ended=dt.datetime.now(dt.UTC),
        status="succeeded", config={"base_model": str(model), "train_data_dir": str(ddir),
                                    "allow_outside_dataset": True},
        base_model_sha256=path_sha256(model), dataset_version="ds-o",
        dataset_digests={"metadata.csv": sha256_file(ddir / "metadata.csv"),
                         OUTSIDE_PREFIX + str(outside.resolve()): sha256_file(outside)},
        notebook_source_sha256="ab" * 32, seed=1, egress_refusals=0)
    write_manifest(staging, manifest)
    record = seal_record(staging, state_tmp / "runs", "ro1")
    with Ledger(state=state_tmp) as led:
        led.append_run(record)
    assert summary(load_manifest(record))["dataset_digests"]
    code, out = lora("audit", "verify", "ro1", "--inputs")
    assert code == 0, out
    outside.write_bytes(b"tampered")
    code, out = lora("audit", "verify", "ro1", "--inputs")
    assert code == 5 and f"[drifted] {outside.resolve()}" in out, out
    assert OUTSIDE_PREFIX not in out.split("[drifted]", 1)[1].split(":", 1)[0], out
    assert lora("audit", "verify", "ro1")[0] == 0


def test_image_captions_file_outside_the_folder_rehashed_where_it_is(tmp_path):
    """An image dataset's metadata_path outside train_data_dir is keyed by its file name (see
    ``dataset_digests``): it is re-hashed at metadata_path, not inside train_data_dir."""
    ddir = tmp_path / "images"
    ddir.mkdir()
    (ddir / "a.png").write_bytes(b"img")
    meta = tmp_path / "captions" / "metadata.csv"
    meta.parent.mkdir()
    meta.write_text("file_name,text\na.png,x\n")
    digests = {"a.png": sha256_file(ddir / "a.png"), "metadata.csv": sha256_file(meta)}
    config = {"task": "image", "train_data_dir": str(ddir), "metadata_path": str(meta)}
    manifest = _manifest(tmp_path, config, digests)
    assert verify_inputs(manifest, "hand") == []
    meta.write_text("file_name,text\na.png,changed caption\n")
    problems = verify_inputs(manifest, "hand")
    assert [(p.code, p.where) for p in problems] == [("drifted", str(meta))]
    # the usual layout (captions inside the folder) is unchanged
    inside = ddir / "metadata.csv"
    inside.write_text("file_name,text\na.png,x\n")
    config = {"task": "image", "train_data_dir": str(ddir), "metadata_path": str(inside)}
    manifest = _manifest(tmp_path, config, {"a.png": sha256_file(ddir / "a.png"),
                                            "metadata.csv": sha256_file(inside)})
    assert verify_inputs(manifest, "hand") == []
    inside.write_text("edited\n")
    assert [p.where for p in verify_inputs(manifest, "hand")] == [str(inside)]


def test_no_pinned_inputs_nothing_to_check(tmp_path):
    manifest = _manifest(tmp_path, {"parameters": {"x": 1}}, {})
    assert verify_inputs(manifest, "hand") == []
