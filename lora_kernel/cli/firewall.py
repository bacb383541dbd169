"""``lora firewall plan|apply|check``: the OS layer of the egress policy (nftables per uid),
generated from ``policies/egress.yaml``.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
import grp
import pwd
import sys

from lora_kernel.common.errors import ConfigError, VerificationError


def _targets(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """uids and gids named by ``--users`` / ``--group`` (a group also adds its members)."""
    uids: list[int] = []
    gids: list[int] = []
    for name in [n.strip() for n in (args.users or "").split(",") if n.strip()]:
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f"no such user {name!r}; fix: create it or correct --users") \
                from None
    if args.group:
        try:
            group = grp.getgrnam(args.group)
        except KeyError:
            raise ConfigError(f"no such group {args.group!r}; fix: create it or correct "
                              "--group") from None
        gids.append(group.gr_gid)
        uids += [pwd.getpwnam(m).pw_uid for m in group.gr_mem]
        uids += [p.pw_uid for p in pwd.getpwall() if p.pw_gid == group.gr_gid]
    return sorted(set(uids)), sorted(set(gids))


def cmd_firewall(args: argparse.Namespace) -> int:
    """Print, apply or check the nftables ruleset of the egress policy."""
    from lora_kernel.common.egress import load_egress_policy
    from lora_kernel.trusted import firewall

    policy = load_egress_policy()
    uids, gids = _targets(args)
    if args.firewall_command == "plan":
        sys.stdout.write(firewall.plan(policy, uids, gids))
        return 0
    if args.firewall_command == "apply":
        firewall.apply(policy, uids, gids, keep_members=not args.replace_members)
        diffs = firewall.check(policy, uids, gids)
        if diffs:
            raise VerificationError("applied, but the live table still differs: "
                                    + "; ".join(diffs))
        print(f"nftables table {firewall.FAMILY} {firewall.TABLE} applied from {policy.path} "
              f"(uids {uids or '-'}, gids {gids or '-'})")
        return 0
    diffs = firewall.check(policy, uids if args.users or args.group else None,
                           gids if args.group else None)
    if diffs:
        raise VerificationError(f"the egress firewall differs from {policy.path}:\n  "
                                + "\n  ".join(diffs)
                                + ("" if "missing" in diffs[0] else f"\n{firewall.FIX_APPLY}"))
    print(f"nftables table {firewall.FAMILY} {firewall.TABLE} is in place ({policy.path})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``firewall`` to the ``lora`` CLI."""
    fw = sub.add_parser("firewall", help="nftables egress rules per uid, from "
                                         "policies/egress.yaml (the OS layer)")
    fsub = fw.add_subparsers(dest="firewall_command", metavar="ACTION")
    fsub.required = True
    helps = {"plan": "print the ruleset (text for nft -f); needs nothing",
             "apply": "replace the table inet lora_enclave in one transaction (root, nft)",
             "check": "compare the live table with the plan; exit 5 on any difference "
                      "(root, nft)"}
    for action, text in helps.items():
        p = fsub.add_parser(action, help=text, description=text)
        p.add_argument("--users", default="", metavar="NAMES",
                       help="comma-separated platform users whose sockets are filtered")
        p.add_argument("--group", default=None, metavar="GROUP",
                       help="a platform group: its gid and its members' uids are filtered")
        if action == "apply":
            p.add_argument("--replace-members", action="store_true",
                           help="drop the users / groups already in the live sets (default: "
                                "keep them, so running servers stay filtered)")
        p.set_defaults(func=cmd_firewall)
