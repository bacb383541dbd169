"""Review and publication: each refusal paired with the case that must work."""
from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from lora_kernel.common.errors import PolicyRefusal, VerificationError
from lora_kernel.provenance.publications import review_state, verify_publications
from lora_kernel.trusted.identity import Actor
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.review import approve, is_reviewer, publish, reject


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """Review policy with bob and carol as reviewers (single-user style ``members:``)."""
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text(
        "reviewers_group: no-such-group-xyz\nmembers: [alice, alice2, ALICE, bob, carol]\n"
        "publication:\n  access_groups: [lora-users]\n  expiry_days: 30\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return pdir


@pytest.fixture
def led(state_tmp):
    with Ledger(state=state_tmp) as ledger:
        yield ledger


def test_self_approval_refused_other_reviewer_works(make_run, policies, led, actor):
    alice = actor("alice")
    make_run("r1", user="alice", uid=alice.uid)
    with pytest.raises(PolicyRefusal, match="self-approval"):
        approve("r1", "mine, looks great", actor=alice, ledger=led)
    # the trainer under another spelling: same uid, or the name in another case
    for other in (Actor("alice2", alice.uid, alice.gid, (), "test"), actor("ALICE")):
        with pytest.raises(PolicyRefusal, match="self-approval"):
            approve("r1", "still me", actor=other, ledger=led)
    assert review_state(led, "r1")[0] == "pending"
    entry = approve("r1", "checked samples", actor=actor("bob"), ledger=led)
    assert entry.payload["reviewer"] == "bob" and entry.payload["trainer"] == "alice"
    assert review_state(led, "r1", entry.payload["adapter_digest"])[0] == "approved"


def test_failed_or_adapterless_runs_cannot_be_approved(make_run, policies, led, actor,
                                                       state_tmp):
    make_run("ok", user="alice", seed=1)
    make_run("bad", user="alice", seed=2, status="failed")
    with pytest.raises(PolicyRefusal, match="only a succeeded run"):
        approve("bad", "looks fine", actor=actor("bob"), ledger=led)
    assert reject("bad", "it failed", actor=actor("bob"), ledger=led).payload["decision"] \
        == "rejected"
    assert approve("ok", "fine", actor=actor("bob"), ledger=led).payload["decision"] == "approved"


def test_a_plain_notebooks_adapter_is_not_approved_unless_the_policy_allows_it(
        make_run, policies, led, actor, monkeypatch):
    """A plain notebook's run (kind "notebook") wrote its own adapter: self-reported, so a
    reviewer cannot approve it (nor can it be published); a training run of the same trainer
    is approved; a group in self_reported_groups lets that trainer's notebook adapters pass."""
    from lora_kernel.trusted import review

    make_run("nb", user="alice", seed=1, kind="notebook")
    make_run("tr", user="alice", seed=2, kind="training")
    with pytest.raises(PolicyRefusal, match="self-reported"):
        approve("nb", "looks fine", actor=actor("bob"), ledger=led)
    assert approve("tr", "fine", actor=actor("bob"), ledger=led).payload["decision"] \
        == "approved"
    assert reject("nb", "not trained here", actor=actor("bob"), ledger=led)  # withholding is
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    mine = grp.getgrgid(me.pw_gid).gr_name
    assert review._self_reported_allowed(me.pw_name, {"self_reported_groups": [mine]})
    assert not review._self_reported_allowed(me.pw_name, {"self_reported_groups": ["nope-x"]})
    assert not review._self_reported_allowed(me.pw_name, {})
    monkeypatch.setattr(review, "_self_reported_allowed", lambda trainer, policy: True)
    assert approve("nb", "allowed for this group", actor=actor("bob"),
                   ledger=led).payload["decision"] == "approved"


def test_non_reviewer_refused(make_run, policies, led, actor):
    make_run("r1", user="alice")
    assert not is_reviewer(actor("mallory")) and is_reviewer(actor("carol"))
    with pytest.raises(PolicyRefusal, match="reviewers group"):
        approve("r1", "", actor=actor("mallory"), ledger=led)
    rejected = reject("r1", "bad samples", actor=actor("carol"), ledger=led)
    assert rejected.payload["decision"] == "rejected"


def test_os_group_membership(policies, actor):
    import grp
    import pwd
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(me.pw_gid).gr_name
    (policies / "review.yaml").write_text(f"reviewers_group: {group}\nmembers: []\n")
    from lora_kernel.trusted.identity import current_actor
    assert is_reviewer(current_actor()) and not is_reviewer(actor("no-such-user-xyz"))


def test_publish_approved_adapter(make_run, policies, led, tmp_path, actor):
    make_run("r1", user="alice")
    approve("r1", "ok", actor=actor("bob"), ledger=led)
    dest = publish("r1", tmp_path / "pub", "style-v1", actor=actor("bob"), ledger=led)
    assert sorted(p.name for p in dest.iterdir()) == ["lora.safetensors", "publication.json"]
    meta = json.loads((dest / "publication.json").read_text())
    assert meta["access_groups"] == ["lora-users"] and meta["run_id"] == "r1"
    assert meta["expires"] == (dt.date.today() + dt.timedelta(days=30)).isoformat() or \
        meta["expires"] == (dt.datetime.now(dt.UTC).date()
                            + dt.timedelta(days=30)).isoformat()
    assert led.latest("publication", "r1").payload["path"] == str(dest)
    assert verify_publications(led) == []
    with pytest.raises(PolicyRefusal, match="immutable"):
        publish("r1", tmp_path / "pub", "style-v1", actor=actor("bob"), ledger=led)
    os.chmod(dest / "lora.safetensors", 0o644)
    (dest / "lora.safetensors").write_bytes(b"swapped")
    problems = verify_publications(led)
    assert [(p.code, p.where) for p in problems] == [
        ("publication", str(dest / "lora.safetensors"))]


def test_unapproved_or_rejected_publish_refused(make_run, policies, led, tmp_path, actor):
    make_run("r1", user="alice")
    with pytest.raises(PolicyRefusal, match="pending"):
        publish("r1", tmp_path / "pub", ledger=led)
    approve("r1", "ok", actor=actor("bob"), ledger=led)
    dest = publish("r1", tmp_path / "pub", ledger=led)
    reject("r1", "found a problem", actor=actor("carol"), ledger=led)
    with pytest.raises(PolicyRefusal, match="rejected"):
        publish("r1", tmp_path / "pub", "again", ledger=led)
    assert "now rejected" in verify_publications(led)[0].what and dest.exists()


def test_approval_replayed_onto_different_digest_refused(make_run, policies, led, tmp_path, actor):
    make_run("r1", user="alice", seed=1)
    make_run("r2", user="alice", seed=2)
    approval = approve("r1", "ok", actor=actor("bob"), ledger=led)
    # the replay: r1's approval payload copied onto r2 (different adapter digest)
    led.append("review", "r2", approval.payload)
    with pytest.raises(PolicyRefusal, match="replayed"):
        publish("r2", tmp_path / "pub", ledger=led)
    assert review_state(led, "r2", led.run_entry("r2").payload["adapter_digest"])[0] == "void"
    assert publish("r1", tmp_path / "pub", ledger=led).is_dir()


def test_changed_adapter_voids_approval(make_run, policies, led, tmp_path, actor):
    record = make_run("r1", user="alice")
    approval = approve("r1", "ok", actor=actor("bob"), ledger=led)
    adapter = record / "adapter" / "lora.safetensors"
    os.chmod(adapter, 0o644)
    data = adapter.read_bytes()
    adapter.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(VerificationError, match="adapter file changed"):
        publish("r1", tmp_path / "pub", ledger=led)
    with pytest.raises(VerificationError):
        approve("r1", "re-approve the changed one", actor=actor("carol"), ledger=led)
    assert review_state(led, "r1", "0" * 64) == ("void", led.latest("review", "r1"))
    assert approval.payload["adapter_digest"] == led.run_entry("r1").payload["adapter_digest"]


def test_withdraw_by_stranger_refused_by_publisher_or_reviewer_works(make_run, policies, led,
                                                                     tmp_path, actor):
    from lora_kernel.common.errors import ConfigError
    from lora_kernel.provenance.publications import publications
    from lora_kernel.trusted.review import withdraw

    make_run("r1", user="alice")
    approve("r1", "ok", actor=actor("bob"), ledger=led)
    dave = actor("dave")  # publishes, but is no reviewer
    first = publish("r1", tmp_path / "pub", "one", actor=dave, ledger=led)
    second = publish("r1", tmp_path / "pub", "two", actor=dave, ledger=led)
    with pytest.raises(PolicyRefusal, match="neither a reviewer .* nor its publisher"):
        withdraw("r1", "not mine", actor=actor("mallory"), ledger=led)
    assert first.is_dir() and second.is_dir() and led.latest("withdrawal", "r1") is None
    [entry] = withdraw("r1", "superseded", name="one", actor=dave, ledger=led)
    assert not first.exists() and second.is_dir()
    assert entry.kind == "withdrawal" and entry.payload["as"] == "publisher"
    assert (entry.payload["by"], entry.payload["note"], entry.payload["path"],
            entry.payload["removed"]) == ("dave", "superseded", str(first), True)
    assert [p["withdrawn"] for p in publications(led)] == [entry.seq, None]
    assert verify_publications(led) == []
    with pytest.raises(ConfigError, match="no publication named 'one' to withdraw"):
        withdraw("r1", "again", name="one", actor=dave, ledger=led)
    # a reviewer may withdraw what someone else published, even when its folder is gone
    os.chmod(second, 0o755)
    for f in second.iterdir():
        f.unlink()
    second.rmdir()
    assert "published folder missing" in verify_publications(led)[0].what
    [entry] = withdraw("r1", "cleanup", actor=actor("carol"), ledger=led)
    assert entry.payload["as"] == "reviewer" and entry.payload["removed"] is False
    assert verify_publications(led) == []


def test_withdrawn_publication_folder_put_back_is_a_problem_republishing_is_not(
        make_run, policies, led, tmp_path, actor):
    import shutil

    from lora_kernel.trusted.review import withdraw

    make_run("r1", user="alice")
    approve("r1", "ok", actor=actor("bob"), ledger=led)
    dest = publish("r1", tmp_path / "pub", "style", actor=actor("bob"), ledger=led)
    shutil.copytree(dest, tmp_path / "kept")
    withdraw("r1", "pulled", actor=actor("bob"), ledger=led)
    shutil.copytree(tmp_path / "kept", dest)
    [problem] = verify_publications(led)
    assert problem.where == str(dest) and "withdrawn" in problem.what
    shutil.rmtree(dest)
    again = publish("r1", tmp_path / "pub", "style", actor=actor("bob"), ledger=led)
    assert again == dest and verify_publications(led) == []
