"""Derived records (``lora merge`` / ``resize`` / ``convert`` outputs): sealed like runs,
pinning their source; tampered sources refused, unapproved sources never published, and
lineage finds the derived output from its source run, its adapter file or its dataset."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_kernel.common.errors import PolicyRefusal, VerificationError
from lora_kernel.provenance.audit import lineage
from lora_kernel.provenance.records import load_manifest, summary, verify_record
from lora_kernel.trusted.derive import seal_derived, source_from_file, source_from_run
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.review import approve, publish, reject


@pytest.fixture
def policies(tmp_path, monkeypatch):
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text(
        "reviewers_group: no-such-group-xyz\nmembers: [bob]\n"
        "publication:\n  access_groups: [lora-users]\n  expiry_days: 30\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return pdir


def _output(tmp_path, value=1.0):
    out = tmp_path / f"resized-{value}.safetensors"
    save_file({"lora_A": torch.full((1, 4), value), "lora_B": torch.zeros(4, 1)}, str(out))
    return out


def test_a_derived_record_pins_its_source_and_lineage_finds_it(make_run, state_tmp, tmp_path,
                                                                actor, policies):
    make_run("src", user="alice", dataset="ds-a", kind="training")
    source = source_from_run("src", state=state_tmp)
    rec = seal_derived(tool="resize", params={"rank": 1}, source=source,
                       outputs={"adapter_model.safetensors": _output(tmp_path)},
                       state=state_tmp, actor=actor("alice"), measured={"kept_energy": 0.93})
    assert verify_record(rec.path) == []
    s = summary(load_manifest(rec.path))
    assert s["kind"] == "derived" and s["status"] == "succeeded"
    assert s["derived_from"]["run_id"] == "src"
    assert s["dataset_version"] == "ds-a" and s["base_model_sha256"] == source.base_model_sha256
    assert s["adapter_files"] == ["adapter/adapter_model.safetensors"]
    deps = load_manifest(rec.path)["predicate"]["buildDefinition"]["resolvedDependencies"]
    by_name = {d["name"]: d for d in deps}
    assert by_name["source_run"]["digest"]["sha256"] == source.manifest_sha256
    assert by_name["source/adapter/lora.safetensors"]["digest"]["sha256"] \
        == source.adapter_files["adapter/lora.safetensors"]
    with Ledger(state=state_tmp) as led:
        assert led.expected_manifest_sha256(rec.run_id)[0] == rec.manifest_sha256
    # lineage: by the source run's id, by the source adapter file, by the dataset version
    for query in ("src", str(state_tmp / "runs" / "src" / "adapter" / "lora.safetensors"),
                  "ds-a"):
        assert rec.run_id in {h["run_id"] for h in lineage(query, state=state_tmp)}, query


def test_a_tampered_source_is_refused_and_nothing_is_sealed(make_run, state_tmp, tmp_path):
    rec_dir = make_run("src", user="alice")
    adapter = rec_dir / "adapter" / "lora.safetensors"
    adapter.chmod(0o644)
    adapter.write_bytes(adapter.read_bytes() + b" ")
    with pytest.raises(VerificationError, match="does not verify"):
        source_from_run("src", state=state_tmp)
    assert sorted(p.name for p in (state_tmp / "runs").iterdir() if p.name != ".staging") \
        == ["src"]
    make_run("src2", user="alice", seed=7)  # the paired honest source works
    assert source_from_run("src2", state=state_tmp).run_id == "src2"


def test_merge_of_an_unapproved_run_is_refused(make_run, state_tmp, actor, policies):
    make_run("src", user="alice", kind="training")
    with pytest.raises(PolicyRefusal, match="not approved"):
        source_from_run("src", state=state_tmp, require_approved=True)
    with Ledger(state=state_tmp) as led:
        approve("src", "ok", actor=actor("bob"), ledger=led)
    assert source_from_run("src", state=state_tmp, require_approved=True).run_id == "src"


def test_a_derived_adapter_is_published_only_while_its_source_is_approved(
        make_run, state_tmp, tmp_path, actor, policies):
    make_run("src", user="alice", kind="training")
    source = source_from_run("src", state=state_tmp)
    rec = seal_derived(tool="convert", params={"to": "kohya"}, source=source,
                       outputs={"lora.safetensors": _output(tmp_path)}, state=state_tmp,
                       actor=actor("alice"))
    bob = actor("bob")
    with Ledger(state=state_tmp) as led:
        with pytest.raises(PolicyRefusal, match="not approved"):
            approve(rec.run_id, "derived", actor=bob, ledger=led)
        approve("src", "source ok", actor=bob, ledger=led)
        approve(rec.run_id, "derived ok", actor=bob, ledger=led)
        dest = publish(rec.run_id, tmp_path / "pub", actor=bob, ledger=led)
        assert (dest / "lora.safetensors").is_file()
        reject("src", "found a problem", actor=bob, ledger=led)
        with pytest.raises(PolicyRefusal, match="not approved"):
            publish(rec.run_id, tmp_path / "pub", name="again", actor=bob, ledger=led)


def test_a_loose_file_source_counts_as_self_reported(state_tmp, tmp_path, actor, policies):
    source = source_from_file(_output(tmp_path, 3.0))
    rec = seal_derived(tool="convert", params={"to": "peft"}, source=source,
                       outputs={"adapter_model.safetensors": _output(tmp_path, 4.0)},
                       state=state_tmp, actor=actor("alice"))
    assert summary(load_manifest(rec.path))["derived_from"]["sha256"] == source.sha256
    with Ledger(state=state_tmp) as led, pytest.raises(PolicyRefusal, match="loose file"):
        approve(rec.run_id, "?", actor=actor("bob"), ledger=led)
    with pytest.raises(Exception, match="no such file"):
        source_from_file(tmp_path / "missing.safetensors")
