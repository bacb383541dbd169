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


CASES: dict[str, Callable[[Case], list]] = {
    "audit lineage finds no run": _lineage_no_match,
    "audit list --columns names an unknown key": _unknown_column,
    "withdrawing a publication by someone who is neither reviewer nor publisher":
        _stranger_withdraws,
    "approving a plain notebook's self-reported adapter": _approve_self_reported,
}
