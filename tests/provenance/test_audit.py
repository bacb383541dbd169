"""``lora audit`` / ``lora review`` / ``lora publish`` through the real CLI entry point, and the
audit library: verify, list, show (sanitized HTML), lineage, prune, export/import."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3

import nbformat
import pytest

from lora_kernel.common.errors import PolicyRefusal
from lora_kernel.provenance.audit import lineage, list_runs, render_notebook_html, verify
from lora_kernel.trusted.identity import current_actor
from lora_kernel.trusted.ledger import Ledger
from lora_kernel.trusted.retention import prune

ME = current_actor().name

NOW = dt.datetime.now(dt.UTC)
OLD = NOW - dt.timedelta(days=400)


@pytest.fixture
def policies(tmp_path, monkeypatch):
    """bob and carol review; publications expire after 30 days; keep records 180 days."""
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "review.yaml").write_text("reviewers_group: no-such-group-xyz\n"
                                      f"members: [bob, carol, {ME}]\n"
                                      "publication: {access_groups: [lora-users], "
                                      "expiry_days: 30}\n")
    (pdir / "retention.yaml").write_text("keep_days: 180\nkeep_approved: true\n")
    monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return pdir


def test_verify_clean_then_tampered_file_and_ledger(make_run, lora, state_tmp):
    r1 = make_run("r1")
    make_run("r2", seed=3)
    assert lora("audit", "verify", "--all") == (0, lora("audit", "verify", "--all")[1])
    assert lora("audit", "verify", "r1")[0] == 0
    os.chmod(r1 / "events.jsonl", 0o644)
    (r1 / "events.jsonl").write_text('{"event": "nothing happened"}\n')
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and f"[changed] {r1 / 'events.jsonl'}" in out and "r2" not in out
    assert lora("audit", "verify", "r2")[0] == 0
    db = sqlite3.connect(state_tmp / "ledger" / "ledger.sqlite", isolation_level=None)
    db.execute("DROP TRIGGER entries_no_delete")
    db.execute("DELETE FROM entries WHERE seq = 1")
    code, out = lora("audit", "verify", "r2")
    assert code == 5 and "seq 1" in out and "deleted" in out


def test_unknown_run_id_is_a_usage_error_not_tampering(make_run, lora, state_tmp):
    make_run("r1")
    assert lora("audit", "verify", "r1")[0] == 0
    code, out = lora("audit", "verify", "nosuchrun")
    assert code == 2 and "no such run 'nosuchrun'" in out and "lora audit list" in out


def test_deleted_record_without_prune_entry_reported(make_run, state_tmp):
    import shutil
    r1 = make_run("r1")
    shutil.rmtree(r1)
    problems = verify()
    assert [(p.code, p.where) for p in problems] == [("missing", str(r1))]


def test_review_publish_and_list_filters(make_run, lora, policies, tmp_path, monkeypatch):
    make_run("r1", user="alice", started=OLD)
    make_run("r2", user=ME, seed=5)
    code, out = lora("review", "approve", "r2", "--note", "mine")
    assert code == 6 and "self-approval" in out
    for var in ("LORA_USER", "USER", "LOGNAME", "JUPYTERHUB_USER"):  # no variable changes who acts
        monkeypatch.setenv(var, "bob")
    code, out = lora("review", "approve", "r2", "--note", "as bob?")
    assert code == 6 and f"{ME} trained run r2" in out
    code, out = lora("review", "approve", "r1", "--note", "checked samples")
    assert code == 0 and f"approved r1 by {ME}" in out
    assert lora("publish", "r2", "--to", tmp_path / "pub")[0] == 6  # not approved
    code, out = lora("publish", "r1", "--to", tmp_path / "pub", "--name", "style")
    assert code == 0 and (tmp_path / "pub" / "style" / "lora.safetensors").exists()
    assert lora("audit", "verify", "--all")[0] == 0
    assert [r["run_id"] for r in list_runs(user=ME)] == ["r2"]
    assert [r["run_id"] for r in list_runs(review="approved")] == ["r1"]
    assert [r["run_id"] for r in list_runs(since=NOW - dt.timedelta(days=1))] == ["r2"]
    assert [r["run_id"] for r in list_runs(until=NOW - dt.timedelta(days=1))] == ["r1"]
    assert list_runs(expired=True) == []
    later = NOW + dt.timedelta(days=40)
    assert [r["run_id"] for r in list_runs(expired=True, now=later)] == ["r1"]
    code, out = lora("audit", "list", "--status", "succeeded")
    assert code == 0 and "r1" in out and "r2" in out and "published" in out
    os.chmod(tmp_path / "pub" / "style" / "lora.safetensors", 0o644)
    (tmp_path / "pub" / "style" / "lora.safetensors").write_bytes(b"other adapter")
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and f"[publication] {tmp_path / 'pub' / 'style' / 'lora.safetensors'}" in out


def _assert_standalone(page: str):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I), \
        re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"' >]*""", page, re.I)
    assert not re.search(r"<script", page, re.I)
    assert not re.search(r"<iframe|<link|@import", page, re.I)


def test_show_writes_standalone_sanitized_html(make_run, lora, tmp_path):
    make_run("r1")
    out_html = tmp_path / "r1.html"
    code, out = lora("audit", "show", "r1", "--html", out_html)
    assert code == 0 and "user               alice" in out
    page = out_html.read_text()
    assert "print(&#39;train&#39;)" in page or "print('train')" in page or "train" in page
    assert "<style" in page  # CSS embedded
    _assert_standalone(page)


def test_hostile_notebook_is_neutralised(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell('hello <script src="https://evil.example/x.js"></script>'
                                      '<img src="https://evil.example/t.png" onerror="x()">'
                                      '[docs](https://example.org/doc)'),
        nbformat.v4.new_code_cell("show()", outputs=[nbformat.v4.new_output(
            "display_data", data={"text/html": '<iframe src="https://evil.example"></iframe>'
                                               '<link rel="stylesheet" href="//cdn.example/a.css">'
                                               '<div style="background:url(https://e.example/b)">'
                                               'kept text</div><script>alert(1)</script>'})])]
    path = tmp_path / "hostile.ipynb"
    nbformat.write(nb, str(path))
    page = render_notebook_html(path)
    _assert_standalone(page)
    assert "kept text" in page and "hello" in page and "alert(1)" not in page


def test_lineage_finds_exactly_the_runs_that_used_it(make_run, lora, state_tmp, policies):
    r1 = make_run("r1", dataset="ds-a", base_model="m1", seed=1, started=OLD)
    make_run("r2", dataset="ds-a", base_model="m2", seed=2)
    make_run("r3", dataset="ds-b", base_model="m1", seed=3)
    inputs = state_tmp.parent / "inputs"

    def ids(q):
        return [h["run_id"] for h in lineage(str(q))]
    assert ids(inputs / "ds-a" / "a.png") == ["r1", "r2"]
    assert ids(inputs / "ds-b") == ["r3"]
    assert ids("ds-b") == ["r3"]
    assert ids(inputs / "models" / "m1" / "model.safetensors") == ["r1", "r3"]
    assert ids(inputs / "models" / "m2") == ["r2"]
    assert ids(r1 / "adapter" / "lora.safetensors") == ["r1"]
    assert ids("f" * 64) == []
    code, out = lora("audit", "lineage", inputs / "ds-a" / "metadata.csv")
    assert code == 0 and "r1" in out and "r2" in out and "r3" not in out
    prune(["r1"])
    assert ids("ds-a") == ["r1", "r2"]  # a pruned run is still traced via the ledger


def test_prune_refuses_young_and_records_itself(make_run, lora, state_tmp, policies, actor):
    old = make_run("old", started=OLD, seed=1)
    young = make_run("young", seed=2)
    approved_old = make_run("kept", started=OLD, seed=3)
    with Ledger(state=state_tmp) as led:
        from lora_kernel.trusted.review import approve
        approve("kept", "ok", actor=actor("bob"), ledger=led)
    code, out = lora("audit", "prune", "young")
    assert code == 6 and "younger than the 180 days" in out and young.is_dir()
    with pytest.raises(PolicyRefusal, match="approved"):
        prune(["kept"])
    assert [d["run_id"] for d in prune(dry_run=True)] == ["old"] and old.is_dir()
    code, out = lora("audit", "prune")
    assert code == 0 and "pruned old" in out
    assert not old.exists() and young.is_dir() and approved_old.is_dir()
    with Ledger(state=state_tmp) as led:
        entry = led.latest("prune", "old")
        assert entry.payload["keep_days"] == 180 and entry.payload["manifest_sha256"]
    assert lora("audit", "verify", "--all")[0] == 0  # the pruned record is accounted for
    assert [r["run_id"] for r in list_runs() if r["pruned"]] == ["old"]


def test_verify_with_pinned_key_catches_replaced_ledger_key(make_run, lora, state_tmp,
                                                            tmp_path):
    make_run("r1")
    pinned = tmp_path / "pinned.pub"
    pinned.write_bytes((state_tmp / "ledger" / "signing_key.pub").read_bytes())
    with Ledger(state=state_tmp) as led:
        led.checkpoint()
    assert lora("audit", "verify", "--all", "--trusted-key", pinned)[0] == 0
    other = Ledger(state=tmp_path / "attacker")
    other.append("review", "x", {})
    code, out = lora("audit", "verify", "--all", "--trusted-key", other.pub_path)
    assert code == 5 and "unknown key" in out


def _as_the_runner_records(record, state, *, status="succeeded", error=None, **config):
    """Give a ``make_run(..., ledger=False)`` record the manifest fields the runner writes
    (kind, notebook, papermill parameters, identity, run_as, error, config keys), then attest it
    in the ledger. The manifest is not among its own subjects, so the files still verify."""
    from lora_kernel.trusted.sealing import write_manifest

    path = record / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["predicate"]["buildDefinition"]["externalParameters"]["config"].update(config)
    manifest["predicate"]["runDetails"]["metadata"].update(status=status, uid=1234, extra={
        "kind": "training", "notebook": "train_image_lora.ipynb", "error": error,
        "parameters": {"config_path": "/cfg/image.yaml", "overrides": {"learning_rate": 5e-4}},
        "identity": "peercred", "run_as": {"name": "alice", "uid": 1234}, "losses": [0.3, 0.2]})
    path.unlink()
    write_manifest(record, manifest)
    os.chmod(path, 0o444)
    with Ledger(state=state) as led:
        led.append_run(record)
    return record


ESSENTIALS = {"task": "image", "learning_rate": 5e-4, "lora_alpha": 8, "batch_size": 2,
              "max_train_steps": 20, "epochs": 1, "resolution": 32, "lora_dropout": 0.1}


def test_show_prints_how_the_run_ran_and_json_keeps_everything(make_run, lora, state_tmp):
    _as_the_runner_records(make_run("r1", ledger=False), state_tmp, **ESSENTIALS)
    code, out = lora("audit", "show", "r1")
    assert code == 0, out
    lines = {line[:18].strip(): line[19:] for line in out.splitlines() if line[:1] != " "}
    assert lines["kind"] == "training" and lines["status"] == "succeeded"
    assert lines["error"] == "-" and lines["user"] == "alice" and lines["uid"] == "1234"
    assert lines["identity"] == "peercred" and lines["run_as"] == "alice (uid 1234)"
    assert lines["notebook"] == "train_image_lora.ipynb sha256 " + "ab" * 32
    assert lines["parameters"] == ('{"config_path":"/cfg/image.yaml","overrides":'
                                   '{"learning_rate":0.0005}}')
    # max_train_steps is set, so epochs (ignored) is not shown; lora_dropout is no essential
    assert lines["config"] == ("task=image learning_rate=0.0005 lora_rank=4 lora_alpha=8 "
                               "batch_size=2 max_train_steps=20 resolution=32 seed=42")
    assert lines["dataset_version"] == "ds-a (2 files)"
    code, out = lora("audit", "show", "r1", "--json")
    info = json.loads(out)
    assert info["config"]["lora_dropout"] == 0.1 and info["extra"]["losses"] == [0.3, 0.2]
    assert info["notebook"] == {"name": "train_image_lora.ipynb", "sha256": "ab" * 32}
    assert info["config_essentials"]["max_train_steps"] == 20 and info["dataset_files"] == 2
    assert (info["kind"], info["identity"], info["run_as"]["uid"]) == ("training", "peercred",
                                                                       1234)


def test_show_failed_run_names_its_error_and_epochs_when_no_step_budget(make_run, lora,
                                                                         state_tmp):
    _as_the_runner_records(make_run("r1", ledger=False), state_tmp, status="failed",
                           error="RuntimeError in cell 3: boom", epochs=3,
                           max_train_steps=None)
    code, out = lora("audit", "show", "r1")
    assert code == 0 and "error              RuntimeError in cell 3: boom" in out
    assert "status             failed" in out and "review             -" in out
    assert "epochs=3" in out and "max_train_steps" not in out


def test_lineage_without_a_match_exits_3_a_match_exits_0(make_run, lora, state_tmp):
    make_run("r1", dataset="ds-a")
    code, out = lora("audit", "lineage", "ds-a")
    assert code == 0 and "r1" in out and "dataset version" in out
    code, out = lora("audit", "lineage", "ds-zzz")
    assert code == 3 and "no run used ds-zzz" in out
    code, out = lora("audit", "lineage", "f" * 64, "--json")
    assert code == 3 and out.startswith("[]")


def test_list_marks_tampered_runs_and_failed_runs_are_not_pending(make_run, lora, state_tmp):
    r1 = make_run("r1", seed=1)
    make_run("a-much-longer-run-id-than-24-chars", seed=2, user="someone-with-a-long-name")
    make_run("r3", seed=3, status="failed")
    code, out = lora("audit", "list")
    assert code == 0 and "TAMPERED" not in out
    rows = out.splitlines()
    # every column starts at the same offset in the header and in each row
    starts = [rows[0].index(h) for h in ("USER", "KIND", "STATUS", "STARTED", "REVIEW",
                                         "NOTES")]
    for row in rows[1:]:
        assert all(row[s - 1] == " " and row[s] != " " for s in starts[:-1]), (rows, starts)
    assert [r.split()[5] for r in rows[1:]] == ["pending", "pending", "-"]
    assert [r.split()[2] for r in rows[1:]] == ["training"] * 3  # pinned a config and model
    by_id = {r["run_id"]: r for r in json.loads(lora("audit", "list", "--json")[1])}
    assert by_id["r3"]["review"] is None and by_id["r1"]["review"] == "pending"
    os.chmod(r1 / "events.jsonl", 0o644)
    (r1 / "events.jsonl").write_text("{}\n")
    code, out = lora("audit", "list")
    assert code == 0 and [r.split()[0] for r in out.splitlines() if "TAMPERED" in r] == ["r1"]
    by_id = {r["run_id"]: r for r in json.loads(lora("audit", "list", "--json")[1])}
    assert by_id["r1"]["verified"] is False and "events.jsonl" in by_id["r1"]["problems"][0]
    assert by_id["r3"]["verified"] is True


def test_list_shows_chosen_config_columns_unknown_one_named(make_run, lora, state_tmp):
    _as_the_runner_records(make_run("r1", ledger=False, seed=1), state_tmp, **ESSENTIALS)
    make_run("r2", seed=2)  # has lora_rank, no learning_rate
    code, out = lora("audit", "list", "--columns", "learning_rate,lora_rank")
    assert code == 0, out
    header, *rows = out.splitlines()
    assert header.split() == ["RUN", "USER", "KIND", "STATUS", "STARTED", "REVIEW",
                              "LEARNING_RATE", "LORA_RANK", "NOTES"]
    assert [r.split()[6:8] for r in rows] == [["0.0005", "4"], ["-", "4"]]
    rows = json.loads(lora("audit", "list", "--columns", "lora_rank", "--json")[1])
    assert [r["columns"] for r in rows] == [{"lora_rank": 4}, {"lora_rank": 4}]
    code, out = lora("audit", "list", "--columns", "lora_rank,learning_rat")
    assert code == 2 and "'learning_rat'" in out and "did you mean 'learning_rate'?" in out
    assert "Traceback" not in out


def test_withdrawn_publication_lets_verify_pass_again(make_run, lora, policies, tmp_path,
                                                       state_tmp):
    make_run("r1", user="alice")
    assert lora("review", "approve", "r1", "--note", "ok")[0] == 0
    code, out = lora("publish", "r1", "--to", tmp_path / "pub", "--name", "style")
    assert code == 0, out
    assert lora("review", "reject", "r1", "--note", "found a problem")[0] == 0
    code, out = lora("audit", "verify", "--all")
    assert code == 5 and "now rejected" in out  # rejected but still published: a problem
    code, out = lora("publish", "--withdraw", "r1", "--note", "rejected after publication")
    assert code == 0 and f"withdrew r1 from {tmp_path / 'pub' / 'style'} by {ME}" in out
    assert not (tmp_path / "pub" / "style").exists()
    code, out = lora("audit", "verify", "--all")
    assert code == 0, out
    with Ledger(state=state_tmp) as led:
        w = led.latest("withdrawal", "r1").payload
        pub = led.latest("publication", "r1")
    assert (w["run_id"], w["by"], w["note"], w["publication_seq"], w["path"]) == (
        "r1", ME, "rejected after publication", pub.seq, str(tmp_path / "pub" / "style"))
    code, out = lora("audit", "list", "--json")
    assert json.loads(out)[0]["published"] == []
    code, out = lora("publish", "--withdraw", "r1")
    assert code == 2 and "no publication to withdraw" in out
    assert lora("publish", "--withdraw", "r1", "--to", tmp_path / "pub")[0] == 2


def test_show_of_a_pruned_run_prints_what_the_ledger_keeps(make_run, lora, state_tmp,
                                                           policies):
    make_run("old", started=OLD)
    prune(["old"])
    code, out = lora("audit", "show", "old")
    assert code == 0 and "config             -" in out and "dataset_version    ds-a" in out
    assert "notebook" not in out  # the manifest, which named it, is gone


def test_a_progress_bar_renders_as_its_last_state_and_prints_as_text(tmp_path):
    """tqdm redraws with carriage returns, one stream output per redraw: the rendered notebook
    shows one line in its final state, not one line per redraw; print output stays text."""
    import re

    import nbformat


    nb = nbformat.v4.new_notebook()
    redraws = [nbformat.v4.new_output("stream", name="stderr",
                                      text=f"\rsteps {i * 10:3d}%|{'#' * i:<10}|")
               for i in range(11)]
    nb.cells = [nbformat.v4.new_code_cell("train()", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="loss 0.84\n"), *redraws,
        nbformat.v4.new_output("stream", name="stderr", text="\n")])]
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, str(path))
    html = render_notebook_html(path)
    assert html.count("%|") == 1 and "steps 100%|##########|" in html
    assert re.search(r"<pre>loss 0\.84\n</pre>", html)
    assert "\r" in nbformat.read(str(path), as_version=4).cells[0].outputs[1].text  # kept
