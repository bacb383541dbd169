"""Run records: manifest contents, atomic sealing, and every tamper case paired with a clean
record that verifies."""
from __future__ import annotations

import os
import shutil

import nbformat
import pytest

from lora_kernel.provenance.ledger import LedgerReader
from lora_kernel.provenance.records import (
    MANIFEST,
    PREDICATE_TYPE,
    hash_record,
    load_manifest,
    summary,
    verify_record,
)
from lora_kernel.trusted.sealing import manifest_bytes


def writable(path):
    """Sealed files are read-only; a tamperer with write access to the store just chmods."""
    os.chmod(path, 0o644)
    return path


def flip_byte(path, offset=-1):
    data = bytearray(writable(path).read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def ledger_sha(home, run_id):
    with LedgerReader(state=home) as led:
        return led.run_entry(run_id).payload["manifest_sha256"]


def test_manifest_pins_inputs_outputs_and_environment(make_run):
    record = make_run("r1")
    m = load_manifest(record)
    assert m["predicateType"] == PREDICATE_TYPE and m["_type"].startswith("https://in-toto.io")
    names = {s["name"]: s["annotations"]["role"] for s in m["subject"]}
    assert names == {"adapter/lora.safetensors": "adapter", "executed.ipynb": "notebook",
                     "events.jsonl": "events", "tb/events.out.tfevents.1": "tensorboard"}
    s = summary(m)
    assert s["run_id"] == "r1" and s["user"] == "alice" and s["status"] == "succeeded"
    assert s["dataset_version"] == "ds-a" and set(s["dataset_digests"]) == {"a.png", "metadata.csv"}
    assert len(s["base_model_sha256"]) == 64 and s["seed"] == 42 and s["egress_refusals"] == 0
    env = m["predicate"]["buildDefinition"]["internalParameters"]["environment"]
    assert env["packages"]["torch"] and env["packages"]["papermill"] and env["python"]
    assert env["hardware"]["cpu_count"] >= 1
    assert m["predicate"]["runDetails"]["builder"]["version"]["lora_enclave"]
    assert all(not (record / n).stat().st_mode & 0o222 for n in names)  # sealed read-only


def test_clean_record_verifies_against_ledger(make_run, state_tmp):
    record = make_run("r1")
    assert verify_record(record, expected_manifest_sha256=ledger_sha(state_tmp, "r1")) == []


@pytest.mark.parametrize("rel", ["adapter/lora.safetensors", "events.jsonl",
                                 "tb/events.out.tfevents.1"])
def test_changed_byte_in_any_file_is_reported(make_run, rel):
    record = make_run("r1")
    flip_byte(record / rel)
    problems = verify_record(record)
    assert [(p.code, p.where) for p in problems] == [("changed", str(record / rel))]
    assert "sha256" in problems[0].what


def _edit_notebook(record, fn):
    path = writable(record / "executed.ipynb")
    nb = nbformat.read(str(path), as_version=4)
    fn(nb)
    nbformat.write(nb, str(path))


def test_removed_cell_is_reported_with_its_index(make_run):
    record = make_run("r1")
    _edit_notebook(record, lambda nb: nb.cells.pop(1))
    problems = verify_record(record)
    assert [(p.where, p.what) for p in problems] == [
        (f"{record / 'executed.ipynb'} cell 1", "cell removed or replaced")]


def test_edited_cell_and_notebook_metadata_are_reported(make_run):
    record = make_run("r1")

    def edit(nb):
        nb.cells[2].source = "# done (improved)"
    _edit_notebook(record, edit)
    assert [(p.where.rsplit(" ", 2)[-2:], p.what) for p in verify_record(record)] == [
        (["cell", "2"], "cell edited")]
    record2 = make_run("r2", seed=2)
    _edit_notebook(record2, lambda nb: nb.metadata.update({"x": 1}))
    assert "metadata" in verify_record(record2)[0].what


def test_swapped_adapter_missing_and_extra_files(make_run):
    r1, r2 = make_run("r1"), make_run("r2", seed=7)
    os.chmod(r1 / "adapter", 0o755)
    writable(r1 / "adapter" / "lora.safetensors")
    shutil.copyfile(r2 / "adapter" / "lora.safetensors", r1 / "adapter" / "lora.safetensors")
    (r1 / "events.jsonl").unlink()
    (r1 / "adapter" / "extra.safetensors").write_bytes(b"x")
    got = {(p.code, p.where.replace(str(r1) + "/", "")) for p in verify_record(r1)}
    assert got == {("changed", "adapter/lora.safetensors"), ("missing", "events.jsonl"),
                   ("extra", "adapter/extra.safetensors")}
    assert verify_record(r2) == []


def test_edited_manifest_caught_even_with_recomputed_digests(make_run, state_tmp):
    record = make_run("r1")
    expected = ledger_sha(state_tmp, "r1")
    flip_byte(record / "events.jsonl")
    m = load_manifest(record)
    m["subject"] = hash_record(record)  # the forger re-hashes everything...
    m["predicate"]["runDetails"]["metadata"]["status"] = "approved-looking"
    writable(record / MANIFEST).write_bytes(manifest_bytes(m))
    assert verify_record(record) == []  # ...so the manifest alone is consistent,
    problems = verify_record(record, expected_manifest_sha256=expected)
    assert [(p.code, p.where) for p in problems] == [("manifest", str(record / MANIFEST))]
    assert "ledger" in problems[0].what  # ...but not with the ledger's hash.


def test_unparseable_manifest_and_missing_record(make_run, tmp_path):
    record = make_run("r1")
    writable(record / MANIFEST).write_text("{not json")
    assert verify_record(record)[0].code == "manifest"
    assert verify_record(tmp_path / "nope")[0].code == "missing"
