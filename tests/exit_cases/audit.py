"""Audit cases: lineage without a match, listing columns, withdrawing publications."""
from __future__ import annotations

from collections.abc import Callable

from exit_cases import Case


def _lineage_no_match(c: Case) -> list:
    c.make_run("r1", dataset="ds-a")
    return ["audit", "lineage", "ds-never-used"]


def _unknown_column(c: Case) -> list:
    c.make_run("r1")
    return ["audit", "list", "--columns", "lora_rank,learning_rat"]


def _stranger_withdraws(c: Case) -> list:
    """bob (a reviewer) approves and publishes; the caller, neither, withdraws."""
    from lora_kernel.trusted.identity import Actor
    from lora_kernel.trusted.review import approve, publish

    c.policies("reviewers_group: no-such-group-xyz\nmembers: [bob]\n")
    c.make_run("r1", user="alice")
    bob = Actor("bob", 59999, 59999, (), "test")
    approve("r1", "ok", actor=bob)
    publish("r1", c.tmp / "pub", actor=bob)
    return ["publish", "--withdraw", "r1", "--note", "not mine to pull"]


def _approve_self_reported(c: Case) -> list:
    """The caller, a reviewer, approves a plain notebook's run (its adapter self-reported)."""
    import getpass

    c.policies(f"reviewers_group: no-such-group-xyz\nmembers: [{getpass.getuser()}]\n")
    c.make_run("nb", user="alice", kind="notebook")
    return ["review", "approve", "nb", "--note", "the samples look right"]


def _import_foreign_key(c: Case) -> list:
    """An archive exported here, imported with another ledger's key as the trusted one."""
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from lora_kernel.cli import main as cli

    c.make_run("r1")
    key = c.tmp / "archive.key"
    key.write_bytes(os.urandom(32))
    assert cli.main(["audit", "export", "--since", "2000-01-01", "--to", str(c.tmp / "a.lea"),
                     "--key-file", str(key)]) == 0
    stranger = c.tmp / "stranger.pem"
    stranger.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return ["audit", "import", c.tmp / "a.lea", "--key-file", key, "--state", c.tmp / "other",
            "--trusted-key", stranger]


def _approve_derived_unapproved_source(c: Case) -> list:
    """A reviewer approves a resize of a run nobody approved."""
    import getpass

    import torch
    from safetensors.torch import save_file

    from lora_kernel.trusted.derive import seal_derived, source_from_run

    c.policies(f"reviewers_group: no-such-group-xyz\nmembers: [{getpass.getuser()}]\n")
    c.make_run("src", user="alice", kind="training")
    out = c.tmp / "small.safetensors"
    save_file({"w": torch.zeros(2)}, str(out))
    rec = seal_derived(tool="resize", params={"rank": 1}, source=source_from_run("src"),
                       outputs={"small.safetensors": out})
    return ["review", "approve", rec.run_id, "--note", "the resize looks fine"]


CASES: dict[str, Callable[[Case], list]] = {
    "audit lineage finds no run": _lineage_no_match,
    "audit list --columns names an unknown key": _unknown_column,
    "withdrawing a publication by someone who is neither reviewer nor publisher":
        _stranger_withdraws,
    "approving a plain notebook's self-reported adapter": _approve_self_reported,
    "`audit import` of an archive whose ledger is signed by another key than the trusted one":
        _import_foreign_key,
    "approving a derived adapter (merge, resize, convert) whose source run is not approved":
        _approve_derived_unapproved_source,
}
