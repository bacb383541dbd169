"""Reviews of the adapters a run saved mid-training (``lora review approve RUN --step N``):
each step's adapter and the final one have reviews of their own, so a step approval shows as
approved for that step in ``audit show`` / ``audit list`` while the final adapter stays
pending (it was shown as void before); publishing follows the same split."""
from __future__ import annotations

import pytest

from lora_kernel.common.errors import PolicyRefusal
from lora_kernel.provenance.publications import review_state, verify_publications
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.review import approve, publish, reject


@pytest.fixture
def policies(tmp_path, monkeypatch):
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text("reviewers_group: no-such-group-xyz\nmembers: [bob]\n"
                                      "publication:\n  access_groups: []\n  expiry_days: 30\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))


def test_a_step_approval_is_approved_for_that_step_and_the_final_adapter_stays_pending(
        make_run, policies, state_tmp, tmp_path, actor, lora):
    make_run("r1", user="alice", snapshots=(3, 6))
    bob = actor("bob")
    with Ledger(state=state_tmp) as led:
        final = led.run_entry("r1").payload["adapter_digest"]
        entry = approve("r1", "epoch 2 looks best", actor=bob, ledger=led, step=6)
        assert review_state(led, "r1", final) == ("pending", None)
        assert review_state(led, "r1", entry.payload["adapter_digest"], step=6) == (
            "approved", entry)
        assert review_state(led, "r1", step=3) == ("pending", None)
        # publishing the final adapter is refused naming the approved step; step 6 publishes
        with pytest.raises(PolicyRefusal, match="saved at step 6; fix: lora publish r1 --step 6"):
            publish("r1", tmp_path / "pub", "final", actor=bob, ledger=led)
        publish("r1", tmp_path / "pub", "epoch2", actor=bob, ledger=led, step=6)
        assert verify_publications(led) == []  # the step's publication checks its own review
        reject("r1", "the final one overfits", actor=bob, ledger=led)
        assert review_state(led, "r1", final)[0] == "rejected"
        assert review_state(led, "r1", entry.payload["adapter_digest"], step=6)[0] == "approved"
        assert verify_publications(led) == []
    code, out = lora("audit", "show", "r1")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["review"].split()[1] == "rejected"  # the final adapter's
    assert "step 6: approved by bob" in lines["review_steps"]
    code, out = lora("audit", "list", "--review", "rejected")
    assert code == 0 and "r1" in out


def test_without_step_reviews_show_lists_no_step_line(make_run, policies, actor, lora,
                                                      state_tmp):
    make_run("r2", user="alice")
    with Ledger(state=state_tmp) as led:
        approve("r2", "fine", actor=actor("bob"), ledger=led)
    code, out = lora("audit", "show", "r2")
    assert code == 0 and "review_steps" not in out
    assert any(line.split()[:2] == ["review", "approved"] for line in out.splitlines())
