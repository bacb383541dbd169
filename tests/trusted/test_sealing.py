"""Sealing (lora_kernel.trusted.sealing): atomic rename, immutability, nothing half-written."""
from __future__ import annotations

import json

import pytest

from lora_kernel.common.errors import ConfigError, PolicyRefusal, VerificationError
from lora_kernel.provenance.records import MANIFEST, hash_record, load_manifest, verify_record
from lora_kernel.trusted.sealing import make_staging_dir, seal_record, write_manifest


def test_seal_is_atomic_and_refuses_overwrite_or_unverified_staging(make_run, state_tmp):
    record = make_run("r1")
    runs = state_tmp / "runs"
    staging = make_staging_dir(runs, "r1")
    (staging / "events.jsonl").write_text("x\n")
    write_manifest(staging, {**load_manifest(record), "subject": hash_record(staging)})
    with pytest.raises(PolicyRefusal):
        seal_record(staging, runs, "r1")
    assert verify_record(record) == []  # the existing record is untouched

    staging2 = make_staging_dir(runs, "r9")
    (staging2 / "events.jsonl").write_text("x\n")
    m = load_manifest(record)
    m["predicate"]["runDetails"]["metadata"]["invocationId"] = "r9"
    write_manifest(staging2, {**m, "subject": hash_record(staging2)})
    (staging2 / "late.txt").write_text("written after the manifest")
    with pytest.raises(VerificationError, match="late.txt"):
        seal_record(staging2, runs, "r9")
    assert not (runs / "r9").exists()  # never a half-written record
    (staging2 / "late.txt").unlink()
    sealed = seal_record(staging2, runs, "r9")
    assert sealed == runs / "r9" and not staging2.exists() and verify_record(sealed) == []
    assert json.loads((sealed / MANIFEST).read_text())["subject"][0]["name"] == "events.jsonl"


def test_invalid_run_id_refused(state_tmp):
    make_staging_dir(state_tmp / "runs", "r-ok.1")  # must work
    with pytest.raises(ConfigError, match="invalid run id"):
        make_staging_dir(state_tmp / "runs", "../evil")
