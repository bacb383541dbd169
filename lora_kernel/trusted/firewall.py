"""The OS layer of the egress policy: nftables rules per uid, generated from
``policies/egress.yaml`` (parsed by :mod:`lora_kernel.common.egress`, the same parser as the
kernel's audit hook).

The kernel's hook cannot see child processes, C-level sockets, ``ctypes`` or the DNS lookup
inside ``connect(("name", port))``; these rules can, because the kernel applies them to every
packet a *socket owned by a platform user* sends. One table, ``inet lora_enclave`` (IPv4 and
IPv6), holds:

* two named sets, ``lora_users`` (``type uid``) and ``lora_groups`` (``type gid``): the users
  the spawner / runs service start processes as. Adding a user (:func:`ensure_user`) adds an
  element and rewrites no rule. Root and the service account are never in them;
* chain ``output`` (hook output): packets whose socket owner (``meta skuid`` / ``meta
  skgid``) is in a set jump to ``lora_user``; every other packet (root, services, packets the
  kernel sends with no user socket) is untouched;
* chain ``lora_user``: loopback (``oif "lo"``) if the policy allows it, then every ``cidr:``
  entry (with its ``ports:`` for TCP and UDP, else any protocol), then DNS (TCP/UDP 53) is
  rejected, counted and logged, then everything else (any protocol, raw and ICMP included) is
  counted, logged (``lora-egress-drop``, rate-limited) and dropped.

``host:`` entries cannot be enforced by address (they appear as comments): their addresses
need a ``cidr:`` entry, as for the hook.

:func:`plan` is pure; :func:`apply`, :func:`check` and :func:`ensure_user` run ``nft`` and need
root (``CAP_NET_ADMIN``). :func:`check` compares the live table with the plan as ``nft``
itself renders it (the plan is loaded into a throw-away network namespace, ``unshare -n``),
so formatting never counts as drift.

Runs as: root (it writes nftables rules); the checks, as any account.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from lora_kernel.common.egress import EgressPolicy, load_egress_policy
from lora_kernel.common.errors import ConfigError, PolicyRefusal

FAMILY = "inet"
TABLE = "lora_enclave"
USER_SET = "lora_users"
GROUP_SET = "lora_groups"
HOOK_CHAIN = "output"
USER_CHAIN = "lora_user"
LOG_PREFIX = "lora-egress-drop"
DNS_PORT = 53
#: Log lines per second (per rule) at most, so a user cannot flood the kernel log.
LOG_RATE = "10/second"

FIX_APPLY = "fix: run `lora firewall apply` as root (see docs/security.md, 'OS layer')"


# ------------------------------------------------------------------------------- plan

def _ids(values: Iterable[int], what: str) -> list[int]:
    ids = sorted({int(v) for v in values})
    if any(v < 0 for v in ids):
        raise ConfigError(f"a {what} must be a non-negative integer, got {ids}")
    if 0 in ids:
        raise ConfigError(f"{what} 0 (root) must never be a platform user: the service side "
                          f"runs as root and must stay unfiltered; fix: name the users the "
                          f"spawner / runs service start, not root")
    return ids


def _elements(ids: Sequence[int]) -> str:
    return f"\t\telements = {{ {', '.join(str(i) for i in ids)} }}\n" if ids else ""


def _network_rule(net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                  ports: frozenset[int] | None) -> str:
    match = "ip" if net.version == 4 else "ip6"
    dest = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    rule = f"{match} daddr {dest}"
    if ports is not None:
        rule += f" meta l4proto {{ tcp, udp }} th dport {{ {', '.join(map(str, sorted(ports)))} }}"
    return rule + " accept"


def plan(policy: EgressPolicy, uids: Iterable[int] = (), gids: Iterable[int] = ()) -> str:
    """The nftables ruleset (text for ``nft -f``) enforcing ``policy`` for the sockets of
    ``uids`` and of processes whose effective gid is in ``gids``."""
    users, groups = _ids(uids, "uid"), _ids(gids, "gid")
    allow = ["\t\toif \"lo\" accept\n"] if policy.loopback else []
    for net, ports in policy.networks:
        allow.append(f"\t\t{_network_rule(net, ports)}\n")
    names = [f"#   host {name}" + (f" ports {sorted(ports)}" if ports else "")
             for name, ports in policy.hosts]
    header = [f"# LoRA Enclave egress rules, generated from {policy.path} by",
              "# `lora firewall plan`. Do not edit: `lora firewall check` reports any",
              "# difference. Applies to sockets owned by the uids / gids in the sets below;",
              "# root and the service account are never in them."]
    if names:
        header += ["# host: entries are names, not enforced here (their addresses need a",
                   "# cidr: entry):"] + names
    return "".join([
        "\n".join(header) + "\n",
        f"table {FAMILY} {TABLE} {{\n",
        f"\tset {USER_SET} {{\n\t\ttype uid\n{_elements(users)}\t}}\n",
        f"\tset {GROUP_SET} {{\n\t\ttype gid\n{_elements(groups)}\t}}\n",
        f"\tchain {HOOK_CHAIN} {{\n",
        "\t\ttype filter hook output priority filter; policy accept;\n",
        f"\t\tmeta skuid @{USER_SET} jump {USER_CHAIN}\n",
        f"\t\tmeta skgid @{GROUP_SET} jump {USER_CHAIN}\n",
        "\t}\n",
        f"\tchain {USER_CHAIN} {{\n",
        *allow,
        f"\t\tmeta l4proto {{ tcp, udp }} th dport {DNS_PORT} limit rate {LOG_RATE} "
        f"log prefix \"{LOG_PREFIX} dns: \"\n",
        f"\t\tmeta l4proto {{ tcp, udp }} th dport {DNS_PORT} counter reject\n",
        f"\t\tlimit rate {LOG_RATE} log prefix \"{LOG_PREFIX}: \"\n",
        "\t\tcounter drop\n",
        "\t}\n",
        "}\n",
    ])


# ------------------------------------------------------------------------------ nft calls

def _require(what: str, *, unshare: bool = False) -> None:
    if os.geteuid() != 0:
        raise ConfigError(f"lora firewall {what} needs root (it changes / reads the kernel's "
                          f"nftables); fix: run it as root")
    if shutil.which("nft") is None:
        raise ConfigError("nft (nftables) is not installed; fix: apt-get install nftables "
                          "(.ci/os-packages.sh installs it)")
    if unshare and shutil.which("unshare") is None:
        raise ConfigError("unshare (util-linux) is not installed; fix: apt-get install "
                          "util-linux")


def _nft(args: Sequence[str], *, netns: str | None = None, stdin: str | None = None,
         ) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, "nft", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def _live(netns: str | None) -> dict[str, Any] | None:
    """The live table as ``nft -j`` lists it, or None when it does not exist."""
    proc = _nft(["-j", "list", "table", FAMILY, TABLE], netns=netns)
    if proc.returncode != 0:
        if "No such file" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise ConfigError(f"nft list table {FAMILY} {TABLE} failed: {proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _rendered(text: str) -> dict[str, Any]:
    """``text`` as ``nft -j`` lists it once loaded, in a throw-away network namespace."""
    script = f"nft -f - && nft -j list table {FAMILY} {TABLE}"
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], input=text,
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"nft refused the planned ruleset: {proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _strip_state(value: Any) -> Any:
    """A rule expression without handles and counter values (they change as packets flow)."""
    if isinstance(value, dict):
        return {k: (None if k == "counter" else _strip_state(v)) for k, v in value.items()
                if k not in ("handle", "index")}
    if isinstance(value, list):
        return [_strip_state(v) for v in value]
    return value


def _canonical(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, set[str]],
                                             dict[str, list[str]]]:
    """(objects, set members, rules per chain) of one ``nft -j`` listing, comparable."""
    objects: dict[str, str] = {}
    members: dict[str, set[str]] = {}
    rules: dict[str, list[str]] = {}
    for item in doc.get("nftables", []):
        for kind, body in item.items():
            if kind == "metainfo" or not isinstance(body, dict):
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if kind == "rule":
                rules.setdefault(str(body.get("chain")), []).append(
                    json.dumps(_strip_state(body.get("expr")), sort_keys=True))
                continue
            if kind == "set":
                elems = body.pop("elem", [])
                members[str(body.get("name"))] = {json.dumps(e, sort_keys=True) for e in elems}
            objects[f"{kind} {body.get('name', '')}".strip()] = json.dumps(
                _strip_state(body), sort_keys=True)
    return objects, members, rules


def _members(doc: dict[str, Any] | None, name: str) -> list[int]:
    if doc is None:
        return []
    out = []
    for m in _canonical(doc)[1].get(name, set()):
        value = json.loads(m)
        if isinstance(value, int):
            out.append(value)
    return sorted(out)


def _differences(expected: dict[str, Any], live: dict[str, Any], *,
                 membership: bool) -> list[str]:
    exp_obj, exp_mem, exp_rules = _canonical(expected)
    live_obj, live_mem, live_rules = _canonical(live)
    diffs: list[str] = []
    for key in sorted(set(exp_obj) | set(live_obj)):
        if key not in live_obj:
            diffs.append(f"missing {key}")
        elif key not in exp_obj:
            diffs.append(f"unexpected {key} (not in the plan)")
        elif exp_obj[key] != live_obj[key]:
            diffs.append(f"{key} differs: planned {exp_obj[key]}, live {live_obj[key]}")
    for chain in sorted(set(exp_rules) | set(live_rules)):
        want, have = exp_rules.get(chain, []), live_rules.get(chain, [])
        if want == have:
            continue
        for line in difflib.ndiff(want, have):
            if line.startswith("- "):
                diffs.append(f"chain {chain}: planned rule missing: {line[2:]}")
            elif line.startswith("+ "):
                diffs.append(f"chain {chain}: rule not in the plan: {line[2:]}")
        if not any(d.startswith(f"chain {chain}:") for d in diffs):
            diffs.append(f"chain {chain}: rules are in a different order than planned")
    if membership:
        for name in sorted(exp_mem):
            missing = exp_mem[name] - live_mem.get(name, set())
            if missing:
                diffs.append(f"set {name}: planned members missing: "
                             f"{', '.join(sorted(missing))}")
    return diffs


# ------------------------------------------------------------------------ apply / check

def apply(policy: EgressPolicy, uids: Iterable[int] = (), gids: Iterable[int] = (), *,
          keep_members: bool = True, netns: str | None = None) -> str:
    """Replace the table with :func:`plan` in one ``nft -f`` transaction (delete and create
    together: there is no moment without rules). With ``keep_members`` the users and groups
    already in the live sets (added by :func:`ensure_user` for running servers) stay.
    Returns the ruleset applied. ``netns``: run ``nft`` in that network namespace."""
    _require("apply")
    uids, gids = list(uids), list(gids)
    if keep_members:
        live = _live(netns)
        uids += _members(live, USER_SET)
        gids += _members(live, GROUP_SET)
    text = plan(policy, uids, gids)
    transaction = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + text
    proc = _nft(["-f", "-"], netns=netns, stdin=transaction)
    if proc.returncode != 0:
        raise ConfigError(f"nft -f refused the ruleset (nothing changed): {proc.stderr.strip()}")
    return text


def check(policy: EgressPolicy, uids: Iterable[int] | None = None,
          gids: Iterable[int] | None = None, *, netns: str | None = None) -> list[str]:
    """Differences between the live table and :func:`plan` (empty: in place).

    Counter values, handles and set members added later are not differences; with ``uids`` /
    ``gids`` given, those members missing from the live sets are."""
    _require("check", unshare=True)
    membership = uids is not None or gids is not None
    expected = _rendered(plan(policy, uids or (), gids or ()))
    live = _live(netns)
    if live is None:
        return [f"table {FAMILY} {TABLE} is missing (no egress rules in force); {FIX_APPLY}"]
    return _differences(expected, live, membership=membership)


def ensure_user(uid: int, policy: EgressPolicy | None = None, *,
                netns: str | None = None) -> None:
    """Put ``uid`` under the egress rules before the spawner / runs service starts a process
    as it. Refuses (:class:`PolicyRefusal`) when the table is missing or differs from the
    policy: better no server than an unfiltered one."""
    policy = policy if policy is not None else load_egress_policy()
    _ids([uid], "uid")
    diffs = check(policy, netns=netns)
    if diffs:
        raise PolicyRefusal(f"refusing to start a process as uid {uid}: the egress firewall "
                            f"(nftables table {FAMILY} {TABLE}) is not as "
                            f"{policy.path} says: {'; '.join(diffs[:5])}"
                            f"{' ...' if len(diffs) > 5 else ''}; {FIX_APPLY}")
    proc = _nft(["add", "element", FAMILY, TABLE, USER_SET, f"{{ {int(uid)} }}"], netns=netns)
    if proc.returncode != 0:
        raise PolicyRefusal(f"refusing to start a process as uid {uid}: cannot add it to "
                            f"{FAMILY} {TABLE} {USER_SET}: {proc.stderr.strip()}; {FIX_APPLY}")


def effective(policy: EgressPolicy) -> tuple[str, str]:
    """What the policy's ``firewall:`` means on this machine, and why: ``("required", ...)`` or
    ``("off", ...)``. ``auto`` is required when this process runs as root and ``nft`` exists
    (the hub then applies the ruleset itself, :func:`prepare_host`), off otherwise."""
    if policy.firewall != "auto":
        return policy.firewall, f"firewall: {policy.firewall} in {policy.path}"
    if os.geteuid() != 0:
        return "off", "firewall: auto, and not running as root (no per-uid rules possible)"
    if shutil.which("nft") is None:
        return "off", "firewall: auto, and nft is not installed (apt-get install nftables)"
    return "required", "firewall: auto, running as root with nft"


def prepare_host(policy: EgressPolicy | None = None) -> str:
    """At the hub's start: with ``firewall: auto`` in force (:func:`effective`), apply the
    ruleset (keeping the users already in it) so that every server the spawner starts is
    filtered; with ``required``, only check that an administrator applied it (a missing or
    different table then refuses each spawn). Returns one line for the hub's log."""
    policy = policy if policy is not None else load_egress_policy()
    mode, why = effective(policy)
    if mode == "off":
        return f"egress firewall: off ({why}); only the kernel's audit hook guards egress"
    if policy.firewall == "auto":
        apply(policy)
        return (f"egress firewall: required ({why}); nftables table {FAMILY} {TABLE} applied "
                f"from {policy.path}")
    diffs = check(policy)
    state = "in place" if not diffs else f"NOT in place ({diffs[0]}): spawns are refused"
    return f"egress firewall: required ({why}); nftables table {FAMILY} {TABLE} {state}"


def enforce(uid: int, policy: EgressPolicy | None = None) -> bool:
    """For the spawner and the runs service: when the firewall is in force here
    (:func:`effective`: ``required``, or ``auto`` as root with ``nft``), :func:`ensure_user`
    (raises when the rules are not in place) and True; otherwise nothing and False. Under
    ``auto`` a missing or drifted ruleset is applied first (whichever trusted component
    starts a user's process first, the hub or a standalone runs service)."""
    policy = policy if policy is not None else load_egress_policy()
    if effective(policy)[0] != "required":
        return False
    if policy.firewall == "auto" and check(policy):
        apply(policy)  # `auto`: the platform puts the ruleset in place itself (keeps members)
    ensure_user(uid, policy)
    return True
