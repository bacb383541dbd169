"""Adapters saved mid-run in a record (snapshots/): listed with sha256 beside the samples
drawn during training; a reviewer approves epoch 2's adapter (``--step N``) and publishes
exactly that file; a step the run saved nothing at is refused naming the saved ones; the
step's approval does not approve the run's final adapter."""
from __future__ import annotations

import json

import pytest

from lora_kernel.common.digests import sha256_file
from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.provenance.records import adapter_digest_of, load_manifest, verify_record
from lora_kernel.trusted.review import approve, publish
from lora_kernel.trusted.runner import run_config

pytestmark = pytest.mark.slow


def test_reviewer_approves_and_publishes_epoch_2s_adapter_then_resizes_the_run(
        tmp_path, monkeypatch, demo_home, lora_kernel_prefix, actor):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text("reviewers_group: no-such-group-xyz\nmembers: [bob]\n"
                                      "publication:\n  access_groups: []\n  expiry_days: 30\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    # 24 images, batches of 8: 3 steps per epoch, 3 epochs; samples every 3 steps
    rec = run_config(demo_home / "demo" / "image_lora.yaml",
                     {"epochs": 3, "max_train_steps": None, "batch_size": 8, "save_steps": 0,
                      "save_every_n_epochs": 1, "sample_every_n_steps": 3, "sample_steps": 1,
                      "sample_seeds": [0], "sample_prompts": ["a red circle in enclave style"]},
                     home=home)
    assert rec.status == "succeeded"
    assert not verify_record(rec.path)  # no problems
    files = set(rec.files)
    assert {"snapshots/snapshots.json", "snapshots/enclave_style-e0002.safetensors",
            "snapshots/enclave_style-e0002_kohya.safetensors",
            "samples/step-000003/grid.png", "samples/step-000006/grid.png"} <= files
    index = json.loads((rec.path / "snapshots" / "snapshots.json").read_text())["snapshots"]
    assert [(e["step"], e["epoch"]) for e in index] == [(3, 1), (6, 2), (9, 3)]
    manifest = load_manifest(rec.path)
    digests = {s["name"]: s["digest"]["sha256"] for s in manifest["subject"]}
    roles = {s["name"]: s["annotations"]["role"] for s in manifest["subject"]}
    for f in index[1]["files"].values():
        assert digests[f"snapshots/{f['name']}"] == f["sha256"]
        assert roles[f"snapshots/{f['name']}"] == "snapshot"  # not the run's adapter
    assert sorted(r for r, role in roles.items() if role == "adapter") == [
        "adapter/enclave_style.safetensors", "adapter/enclave_style_kohya.safetensors"]

    bob = actor("bob")
    with pytest.raises(ConfigError, match=r"no adapter at step 7; the steps it saved: 3, 6, 9"):
        approve(rec.run_id, "epoch 2", actor=bob, step=7)
    entry = approve(rec.run_id, "epoch 2 looks best", actor=bob, step=6)
    assert entry.payload["step"] == 6
    assert entry.payload["adapter_digest"] != adapter_digest_of(digests)
    with pytest.raises(PolicyRefusal, match="saved at step 6; fix: lora publish .* --step 6"):
        publish(rec.run_id, tmp_path / "webui", "final", actor=bob)
    dest = publish(rec.run_id, tmp_path / "webui", "epoch2", actor=bob, step=6)
    assert sorted(p.name for p in dest.glob("*.safetensors")) == [
        "enclave_style-e0002.safetensors", "enclave_style-e0002_kohya.safetensors"]
    for f in index[1]["files"].values():
        assert sha256_file(dest / f["name"]) == f["sha256"]
    assert json.loads((dest / "publication.json").read_text())["step"] == 6

    # lora resize of the run: a derived record pinning the run, found by lineage
    from lora_kernel.cli import main as cli
    from lora_kernel.provenance.audit import lineage
    from lora_kernel.provenance.records import summary
    assert cli.main(["resize", rec.run_id, "--rank", "2"]) == 0
    found = {h["run_id"] for h in lineage(rec.run_id)} - {rec.run_id}
    assert len(found) == 1
    derived = rec.path.parent / found.pop()
    s = summary(load_manifest(derived))
    assert s["kind"] == "derived" and s["derived_from"]["run_id"] == rec.run_id
    assert s["adapter_files"] == ["adapter/enclave_style-r2_kohya.safetensors"]
