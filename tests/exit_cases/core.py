"""Core cases: configs, models, records, the ledger, review and runs."""
from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from exit_cases import Case

REPO = Path(__file__).resolve().parents[2]


def _me() -> str:
    from lora_kernel.trusted.identity import current_actor
    return current_actor().name


def _bad_yaml(c: Case) -> list:
    (c.tmp / "bad.yaml").write_text("lora_rank: 4\n  oops: [\n")
    return ["config", c.tmp / "bad.yaml"]


def _pickle_model(c: Case) -> list:
    (c.tmp / "model.ckpt").write_bytes(b"never unpickled")
    return ["config", c.config(base_model=str(c.tmp / "model.ckpt"))]


def _remote_code(c: Case) -> list:
    model = c.tmp / "model"
    shutil.copytree(c.demo / "models" / "tiny-sd", model)
    cfg = model / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1))
    return ["config", c.config(base_model=str(model))]


def _outside_row(c: Case) -> list:
    data = c.tmp / "data"
    shutil.copytree(c.demo / "datasets" / "image", data)
    shutil.copy(data / "metadata.csv", c.tmp / "meta.csv")
    first = (data / "metadata.csv").read_text().splitlines()[1].split(",")[0]
    shutil.copy(data / first, c.tmp / "outside.png")
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text().replace(first, "../outside.png", 1))
    return ["config", c.config(train_data_dir=str(data), metadata_path=str(meta))]


def _unpinned_notebook(c: Case) -> list:
    return ["run", REPO / "notebooks" / "train_image_lora.ipynb", "-p", "max_train_steps", "2",
            "--home", c.tmp / "home"]


def _params_not_mapping(c: Case) -> list:
    (c.tmp / "params.yaml").write_text("- a\n- b\n")
    return ["run", REPO / "notebooks" / "train_image_lora.ipynb", "-f", c.tmp / "params.yaml",
            "--home", c.tmp / "home"]


def _tampered_file(c: Case) -> list:
    record = c.make_run("r1")
    os.chmod(record / "events.jsonl", 0o644)
    (record / "events.jsonl").write_text("{}\n")
    return ["audit", "verify", "r1"]


def _edited_ledger(c: Case) -> list:
    record = c.make_run("r1")
    db = sqlite3.connect(record.parent.parent / "ledger" / "ledger.sqlite", isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("UPDATE entries SET payload = replace(payload, 'alice', 'bob') WHERE seq = 1")
    db.close()
    return ["audit", "verify", "--all"]


def _repinned(c: Case) -> list:
    c.make_run("r1")
    pdir = c.tmp / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "ledger.yaml").write_text("key_fingerprint: " + "ab" * 32 + "\n")
    c.monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return ["audit", "verify", "--all"]


def _self_approval(c: Case) -> list:
    c.policies(f"reviewers_group: none-xyz\nmembers: [{_me()}]\n")
    c.make_run("r1", user=_me())
    return ["review", "approve", "r1", "--note", "mine"]


def _failed_approved(c: Case) -> list:
    c.policies(f"reviewers_group: none-xyz\nmembers: [{_me()}]\n")
    c.make_run("r1", user="alice", status="failed")
    return ["review", "approve", "r1", "--note", "looks fine"]


def _unapproved_publish(c: Case) -> list:
    c.make_run("r1")
    return ["publish", "r1", "--to", c.tmp / "pub"]


def _failing_cell(c: Case) -> list:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "lora", "display_name": "LoRA (guarded)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise RuntimeError('boom')")]
    nbformat.write(nb, str(c.tmp / "boom.ipynb"))
    return ["run", c.tmp / "boom.ipynb", "--home", c.tmp / "home"]


CASES: dict[str, Callable[[Case], list]] = {
    "config file missing": lambda c: ["config", c.tmp / "nope.yaml"],
    "config has an unknown key": lambda c: ["config", c.config(lora_rnak=4)],
    "config value out of range": lambda c: ["config", c.config(lora_dropout=1.5)],
    "config is not valid YAML": _bad_yaml,
    "base model is a pickle file (`.ckpt`)": _pickle_model,
    "base model config asks for remote code (`auto_map`)": _remote_code,
    "dataset row names a file outside `train_data_dir`": _outside_row,
    "training notebook run without a config (`lora run NOTEBOOK -p k v`)": _unpinned_notebook,
    "`lora run` parameters file is not a YAML mapping": _params_not_mapping,
    "unknown run id (`audit show`, `audit verify`, `review`, `publish`)":
        lambda c: (c.make_run("r1"), ["audit", "show", "no-such-run"])[1],
    "`audit verify --trusted-key` names no file":
        lambda c: (c.make_run("r1"), ["audit", "verify", "--all", "--trusted-key",
                                      c.tmp / "typo.pem"])[1],
    "`audit verify --trusted-key` is not a public key":
        lambda c: (c.make_run("r1"), (c.tmp / "k.pem").write_text("garbage"),
                   ["audit", "verify", "--all", "--trusted-key", c.tmp / "k.pem"])[2],
    "a sealed record's file was changed": _tampered_file,
    "the ledger was edited": _edited_ledger,
    "the ledger key differs from the pinned fingerprint": _repinned,
    "the trainer approves their own run": _self_approval,
    "a failed run is approved": _failed_approved,
    "publishing a run that is not approved": _unapproved_publish,
    "a notebook cell raises during `lora run`": _failing_cell,
}
SLOW = {"a notebook cell raises during `lora run`"}
