"""The egress policy (``policies/egress.yaml``): parsing and address normalisation only.

One parser for every reader of the policy: the kernel's audit hook
(:mod:`lora_kernel.kernel.guard`) and the OS layer (:mod:`lora_kernel.trusted.firewall`,
nftables per uid). Neutral zone: stdlib only, no side effect on import.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.policy import load_policy, policy_path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Ports = frozenset[int] | None

#: Defaults when ``policies/egress.yaml`` is missing: loopback only, everything logged,
#: the OS-level firewall where it can be (``auto``).
DEFAULT_POLICY: dict[str, Any] = {
    "loopback": True,
    "allow": [],
    "allow_bind_any": False,
    "allow_families": [],
    "processes": "log",
    "ctypes": "log",
    "firewall": "auto",
}

#: ``firewall:`` values: ``required`` (servers / runs refuse to start unless the nftables
#: ruleset is in place), ``auto`` (required, the hub applying the ruleset itself, when it runs
#: as root and ``nft`` exists; off otherwise) or ``off``.
FIREWALL_SETTINGS = ("auto", "required", "off")

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                            ipaddress.ip_network("::1/128"))
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                         "ip6-loopback"})


# ----------------------------------------------------------------- address normalisation

def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """Parse ``text`` the way ``inet_aton`` (and glibc's numeric getaddrinfo) does.

    Accepts 1 to 4 dot-separated parts in decimal, octal (leading ``0``) or hex (``0x``):
    ``"2130706433"``, ``"0x7f.1"``, ``"127.1"``, ``"0177.0.0.01"``. Returns ``None`` when
    ``text`` is not such a number (i.e. it is a host name).
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        p = part.lower()
        try:
            if p.startswith("0x"):
                values.append(int(p[2:] or "0", 16))
            elif len(p) > 1 and p.startswith("0"):
                values.append(int(p, 8))
            elif p.isdigit():
                values.append(int(p, 10))
            else:
                return None
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = (number << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(number)


def normalise_host(host: Any) -> IPAddress | str:
    """Return an IP address object for a numeric host, else the lower-cased name.

    v4-mapped IPv6 (``::ffff:a.b.c.d``) becomes the IPv4 address; scope ids are dropped;
    ``""`` means INADDR_ANY and ``"<broadcast>"`` 255.255.255.255, as CPython reads them.
    """
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    if isinstance(host, int):
        return ipaddress.IPv4Address(host & 0xFFFFFFFF)
    name: str = str(host).strip()
    if name == "":
        return ipaddress.IPv4Address(0)
    if name == "<broadcast>":
        return ipaddress.IPv4Address("255.255.255.255")
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" in text:
        try:
            addr = ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return text.lower()
        return addr.ipv4_mapped or addr
    v4 = parse_ipv4_loose(text)
    if v4 is not None:
        return v4
    return text.lower().rstrip(".")


# ------------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class EgressPolicy:
    """The egress allowlist, read from ``policies/egress.yaml``."""

    path: str
    loopback: bool = True
    networks: tuple[tuple[IPNetwork, Ports], ...] = ()   # ((ip_network, ports | None), ...)
    hosts: tuple[tuple[str, Ports], ...] = ()            # ((name or "*.suffix", ports), ...)
    allow_bind_any: bool = False
    allow_families: frozenset[int] = field(default_factory=frozenset)
    processes: str = "log"
    ctypes: str = "log"
    firewall: str = "auto"

    def allows_address(self, addr: IPAddress, port: Any = None) -> bool:
        """Whether a connection to ``addr`` (an ``ip_address``) on ``port`` is allowed."""
        if self.loopback and any(addr in net for net in LOOPBACK_NETWORKS
                                 if net.version == addr.version):
            return True
        for net, ports in self.networks:
            if net.version == addr.version and addr in net and _port_ok(ports, port):
                return True
        return False

    def allows_name(self, name: str, port: Any = None) -> bool:
        """Whether the host name ``name`` may be resolved / connected to on ``port``."""
        if self.loopback and name in LOCAL_NAMES:
            return True
        for pattern, ports in self.hosts:
            if pattern.startswith("*."):
                hit = name.endswith(pattern[1:])
            else:
                hit = name == pattern
            if hit and _port_ok(ports, port):
                return True
        return False

    def allows(self, host: Any, port: Any = None) -> bool:
        """Whether ``host`` (numeric in any form, or a name) on ``port`` is allowed."""
        norm = normalise_host(host)
        if isinstance(norm, str):
            return self.allows_name(norm, port)
        return self.allows_address(norm, port)


def _port_ok(ports: Ports, port: Any) -> bool:
    return ports is None or port is None or int(port) in ports


def _ports(entry: dict[str, Any], path: str, key: str) -> Ports:
    ports = entry.get("ports")
    if ports is None:
        return None
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
        raise ConfigError("ports must be a list of integers 1..65535", file=path, key=key)
    return frozenset(ports)


def policy_from_mapping(data: dict[str, Any], path: str = "<memory>") -> EgressPolicy:
    """Validate an egress policy mapping (as read from YAML) into an :class:`EgressPolicy`."""
    networks: list[tuple[IPNetwork, Ports]] = []
    hosts: list[tuple[str, Ports]] = []
    for i, entry in enumerate(data.get("allow") or []):
        key = f"allow[{i}]"
        if not isinstance(entry, dict) or not ({"cidr", "host"} & set(entry)):
            raise ConfigError("each entry needs 'cidr' or 'host'", file=path, key=key)
        if "cidr" in entry:
            try:
                net = ipaddress.ip_network(str(entry["cidr"]), strict=False)
            except ValueError as exc:
                raise ConfigError(f"bad cidr: {exc}", file=path, key=key) from None
            networks.append((net, _ports(entry, path, key)))
        if "host" in entry:
            hosts.append((str(entry["host"]).lower().rstrip("."), _ports(entry, path, key)))
    families: frozenset[int] = frozenset()
    for name in data.get("allow_families") or []:
        if not hasattr(socket, str(name)):
            raise ConfigError(f"unknown socket family {name!r}", file=path, key="allow_families")
        families |= {int(getattr(socket, str(name)))}
    for key in ("processes", "ctypes"):
        if data.get(key, "log") not in ("log", "refuse"):
            raise ConfigError("must be 'log' or 'refuse'", file=path, key=key)
    firewall = data.get("firewall", "auto")
    if firewall is False:  # a YAML 1.1 habit: `off` unquoted read elsewhere as false
        firewall = "off"
    if firewall not in FIREWALL_SETTINGS:
        raise ConfigError("must be 'auto', 'required' or 'off'", file=path, key="firewall")
    return EgressPolicy(path=str(path), loopback=bool(data.get("loopback", True)),
                        networks=tuple(networks), hosts=tuple(hosts),
                        allow_bind_any=bool(data.get("allow_bind_any", False)),
                        allow_families=families, processes=str(data.get("processes", "log")),
                        ctypes=str(data.get("ctypes", "log")), firewall=str(firewall))


def load_egress_policy() -> EgressPolicy:
    """Load ``policies/egress.yaml`` (``$LORA_POLICIES`` overrides the folder)."""
    return policy_from_mapping(load_policy("egress", DEFAULT_POLICY), str(policy_path("egress")))
