"""The OS layer of the egress policy: nftables per uid (lora_kernel.trusted.firewall).

Pure tests check the text of :func:`plan`. Root tests build their own world and touch nothing
else: a "client" network namespace (the ruleset is applied *inside* it; a test user's
processes run there) joined by a veth pair to a "server" namespace holding an allowed
address (10.213.0.2, port 8080 only; 10.213.0.3 any protocol; fd00:213::2 port 8080) and an
"outside" one (10.213.1.2, fd00:213::99). No packet can leave these namespaces: they have no
route anywhere else, and every address used is one this module assigned. Every "refused"
case has an "allowed" partner (same tool, allowed destination) and root in the same
namespace is shown unaffected.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import osdeps
import pytest
import sysusers
from sysusers import user_name

from lora_kernel.cli.main import main as lora_main
from lora_kernel.common.egress import load_egress_policy, policy_from_mapping
from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.trusted import firewall

POLICY = {
    "loopback": True,
    "allow": [
        {"cidr": "10.213.0.2/32", "ports": [8080]},
        {"cidr": "10.213.0.3/32"},                       # any protocol (ICMP, DNS)
        {"cidr": "fd00:213::2/128", "ports": [8080]},
        {"host": "inside.test", "ports": [8080]},
    ],
}
POLICY_YAML = textwrap.dedent("""\
    loopback: true
    allow:
      - cidr: 10.213.0.2/32
        ports: [8080]
      - cidr: 10.213.0.3/32
      - cidr: fd00:213::2/128
        ports: [8080]
      - host: inside.test
        ports: [8080]
    firewall: required
""")


def _policy(data: dict | None = None):
    return policy_from_mapping(data if data is not None else POLICY, "test-egress.yaml")


# --------------------------------------------------------------------------- pure: plan()

def _chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"chain {name} {{")
    out = []
    for line in lines[start + 1:]:
        if line.strip() == "}":
            return out
        out.append(line.strip())
    raise AssertionError("unterminated chain")


def test_plan_table_sets_and_hook():
    text = firewall.plan(_policy(), [1001, 1002], [2000])
    assert "table inet lora_enclave {" in text
    assert "set lora_users {" in text and "type uid" in text
    assert "elements = { 1001, 1002 }" in text
    assert "set lora_groups {" in text and "elements = { 2000 }" in text
    hook = _chain(text, "output")
    assert hook[0] == "type filter hook output priority filter; policy accept;"
    assert "meta skuid @lora_users jump lora_user" in hook
    assert "meta skgid @lora_groups jump lora_user" in hook
    assert len(hook) == 3  # nothing else: root / services never reach the user chain


def test_plan_loopback_allowlist_and_final_drop():
    rules = _chain(firewall.plan(_policy(), [1001]), "lora_user")
    assert rules[0] == 'oif "lo" accept'
    assert "ip daddr 10.213.0.2 meta l4proto { tcp, udp } th dport { 8080 } accept" in rules
    assert "ip daddr 10.213.0.3 accept" in rules                      # no ports: any protocol
    assert "ip6 daddr fd00:213::2 meta l4proto { tcp, udp } th dport { 8080 } accept" in rules
    # the last rules: counted + logged drop of everything else (any family, any protocol)
    assert rules[-2] == f'limit rate {firewall.LOG_RATE} log prefix "lora-egress-drop: "'
    assert rules[-1] == "counter drop"
    assert not any("ip daddr" in r or "ip6 daddr" in r for r in rules[-4:])


def test_plan_networks_and_ipv6():
    rules = _chain(firewall.plan(_policy({"allow": [{"cidr": "10.20.0.0/16", "ports": [443, 80]},
                                                     {"cidr": "fd00::/8"}]})), "lora_user")
    assert "ip daddr 10.20.0.0/16 meta l4proto { tcp, udp } th dport { 80, 443 } accept" in rules
    assert "ip6 daddr fd00::/8 accept" in rules
    # table family inet: the final drop covers IPv4 and IPv6 alike (no ip/ip6 qualifier)
    assert rules[-1] == "counter drop"


def test_plan_dns_refused_unless_allowed():
    rules = _chain(firewall.plan(_policy({"allow": [{"cidr": "10.20.0.0/16", "ports": [8081]}]})),
                   "lora_user")
    dns = [i for i, r in enumerate(rules) if "th dport 53" in r]
    assert len(dns) == 2
    assert rules[dns[0]].endswith('log prefix "lora-egress-drop dns: "')
    assert rules[dns[1]] == "meta l4proto { tcp, udp } th dport 53 counter reject"
    # an entry that covers port 53 comes before the refusal, so it wins
    rules = _chain(firewall.plan(_policy({"allow": [{"cidr": "10.20.0.53/32", "ports": [53]}]})),
                   "lora_user")
    allow = rules.index("ip daddr 10.20.0.53 meta l4proto { tcp, udp } th dport { 53 } accept")
    assert allow < min(i for i, r in enumerate(rules) if r.endswith("counter reject"))


def test_plan_without_loopback_and_host_entries_are_comments():
    text = firewall.plan(_policy({"loopback": False, "allow": [{"host": "hub.internal",
                                                               "ports": [8081]}]}))
    assert 'oif "lo"' not in text
    assert "#   host hub.internal ports [8081]" in text
    assert "hub.internal" not in "".join(line for line in text.splitlines()
                                         if not line.startswith("#"))


def test_plan_never_matches_root():
    with pytest.raises(ConfigError, match="root"):
        firewall.plan(_policy(), [0, 1001])
    with pytest.raises(ConfigError, match="root"):
        firewall.plan(_policy(), [1001], [0])


def test_firewall_setting(monkeypatch, tmp_path):
    assert load_egress_policy().firewall == "auto"  # the repo default: closed where it can be
    assert _policy({"firewall": "required"}).firewall == "required"
    assert _policy({"firewall": False}).firewall == "off"
    with pytest.raises(ConfigError, match="firewall"):
        _policy({"firewall": "maybe"})
    (tmp_path / "egress.yaml").write_text("firewall: 'off'\n")
    monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    calls = []
    monkeypatch.setattr(firewall, "ensure_user", lambda *a, **k: calls.append(a))
    assert firewall.enforce(1001) is False and calls == []
    assert firewall.enforce(1001, _policy({"firewall": "required"})) is True
    assert calls and calls[0][0] == 1001


def test_auto_is_required_as_root_with_nft_and_off_otherwise(monkeypatch):
    auto = _policy({"firewall": "auto"})
    calls = []
    monkeypatch.setattr(firewall, "ensure_user", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(firewall.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    applied = []
    monkeypatch.setattr(firewall, "apply", lambda policy: applied.append(policy))
    monkeypatch.setattr(firewall, "check", lambda policy: ["table inet lora_enclave missing"])
    assert firewall.effective(auto)[0] == "required"
    assert firewall.enforce(1001, auto) is True and calls[-1][0] == 1001  # a server is filtered
    assert applied == [auto]  # auto put the missing ruleset in place first
    monkeypatch.setattr(firewall, "check", lambda policy: [])
    assert firewall.enforce(1001, auto) is True and applied == [auto]  # in place: left as is
    assert firewall.enforce(1001, _policy({"firewall": "required"})) and applied == [auto]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the demo without root: still runs
    mode, why = firewall.effective(auto)
    assert mode == "off" and "not running as root" in why
    assert firewall.enforce(1002, auto) is False and len(calls) == 3
    assert "only the kernel's audit hook" in firewall.prepare_host(auto)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(firewall.shutil, "which", lambda name: None)  # no nftables
    mode, why = firewall.effective(auto)
    assert mode == "off" and "nft is not installed" in why
    assert firewall.effective(_policy({"firewall": "required"}))[0] == "required"


def test_apply_and_check_need_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root"):
        firewall.apply(_policy())
    with pytest.raises(ConfigError, match="needs root"):
        firewall.check(_policy())
    assert lora_main(["firewall", "check"]) == 2


def test_cli_plan(capsys):
    assert lora_main(["firewall", "plan", "--users", pwd.getpwuid(os.getuid()).pw_name
                      if os.getuid() else "nobody"]) == 0
    out = capsys.readouterr().out
    assert "table inet lora_enclave" in out and "counter drop" in out


# --------------------------------------------------------------------- root: namespaces

TOOLS = ("nft", "ip", "runuser", "useradd", "curl", "ping", "unshare")
USER = user_name("fw-user")  # made fresh for the session (tests/sysusers.py)
PY = "/usr/bin/python3"

SERVER = textwrap.dedent("""\
    import socket, threading, sys
    def tcp():
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", 8080)); s.listen(16)
        while True:
            c, _ = s.accept()
            try:
                c.settimeout(2); c.recv(4096)
                c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            except OSError:
                pass
            c.close()
    def udp(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        while True:
            data, peer = s.recvfrom(4096)
            s.sendto(data, peer)
    for target, args in ((tcp, ()), (udp, (8080,)), (udp, (53,))):
        threading.Thread(target=target, args=args, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

# One probe for every client case; stdlib only (runs as the test user with the system
# Python). Exit 0: the exchange worked; 2: a network error (refused, timed out, not
# permitted, no answer); anything else is a broken test, never counted as "refused".
PROBE = textwrap.dedent("""\
    import ctypes, socket, struct, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def tcp():
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            return s.recv(100).startswith(b"HTTP/1.0 200")
    def udp(payload=b"ping"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(payload, (host, port))
            return s.recvfrom(4096)[0] == payload
    def dns():  # a DNS query for example.invalid (the server echoes it back)
        q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p for p in (b"example", b"invalid")) + b"\\0"
        return udp(q + struct.pack(">HH", 1, 1))
    def raw_connect():  # libc socket()/connect() through ctypes: no audit event at all
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        tv = struct.pack("ll", 2, 0)
        libc.setsockopt(fd, socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv, len(tv))
        addr = struct.pack("!HH4s8x", 0, port, socket.inet_aton(host))
        addr = struct.pack("=H", socket.AF_INET) + addr[2:]
        rc = libc.connect(fd, addr, len(addr))
        libc.close(fd)
        return rc == 0
    try:
        ok = {"tcp": tcp, "udp": udp, "dns": dns, "ctypes": raw_connect}[mode]()
    except OSError as exc:
        print(type(exc).__name__, exc); ok = False
    sys.exit(0 if ok else 2)
""")


def _run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, check=False, **kw)


def _sh(*cmd):
    proc = _run(list(cmd))
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc


class World:
    """The two namespaces, the test user and the probe."""

    def __init__(self, tmp: Path):
        tag = f"{os.getpid() % 100000}"
        self.client, self.server = f"lorafw-c{tag}", f"lorafw-s{tag}"
        self.veth = (f"lfc{tag}", f"lfs{tag}")
        self.tmp = tmp
        self.etc = Path("/etc/netns") / self.client
        self.server_proc: subprocess.Popen | None = None
        self.uid = -1

    # -- setup / teardown
    def up(self) -> None:
        self.uid = sysusers.ensure_user(USER, system=True).pw_uid
        c, s = self.client, self.server
        _sh("ip", "netns", "add", c)
        _sh("ip", "netns", "add", s)
        _sh("ip", "link", "add", self.veth[0], "netns", c, "type", "veth", "peer", "name",
            self.veth[1], "netns", s)
        for ns, dev, v4, v6 in ((c, self.veth[0], ["10.213.0.1/16"], ["fd00:213::1/64"]),
                                (s, self.veth[1], ["10.213.0.2/16", "10.213.0.3/16",
                                                   "10.213.1.2/16"],
                                 ["fd00:213::2/64", "fd00:213::99/64"])):
            for addr in v4:
                _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            for addr in v6:
                _sh("ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad")
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # unprivileged ICMP echo sockets for everyone in the client namespace (ping as user)
        _sh("ip", "netns", "exec", c, "sysctl", "-q", "-w",
            "net.ipv4.ping_group_range=0 2147483647")
        # names inside the client namespace only (ip netns exec bind-mounts these over /etc)
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n10.213.0.2 inside.test\n"
                                        "10.213.1.2 outside.test\n")
        (self.etc / "resolv.conf").write_text("nameserver 10.213.1.2\noptions timeout:1 "
                                              "attempts:1\n")
        self.server_proc = subprocess.Popen(
            ["ip", "netns", "exec", s, PY, "-c", SERVER], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert self.server_proc.stdout is not None
        assert self.server_proc.stdout.readline().strip() == "ready"
        for _ in range(50):  # the server answers root before any rule exists
            if self.root("tcp", "10.213.0.2", 8080).returncode == 0:
                break
            time.sleep(0.1)

    def down(self) -> None:
        if self.server_proc is not None:
            self.server_proc.kill()
            self.server_proc.wait(timeout=10)
        for ns in (self.client, self.server):
            _run(["ip", "netns", "del", ns])  # deletes the veth pair and the table with it
        shutil.rmtree(self.etc, ignore_errors=True)

    # -- running things in the client namespace
    def in_client(self, *cmd, user=None):
        prefix = ["ip", "netns", "exec", self.client]
        if user:
            prefix += ["runuser", "-u", user, "--"]
        return _run([*prefix, *cmd], timeout=30)

    def user(self, mode, host, port):
        return self.in_client(PY, "-c", PROBE, mode, host, str(port), user=USER)

    def root(self, mode, host, port):
        return self.in_client(PY, "-c", PROBE, mode, host, str(port))

    def apply(self, policy=None):
        firewall.apply(policy or _policy(), [self.uid], netns=self.client,
                       keep_members=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables, a system user)")
    missing = [t for t in TOOLS if shutil.which(t) is None] + \
        ([PY] if not os.access(PY, os.X_OK) else [])
    if missing:
        osdeps.missing(", ".join(missing))
    w = World(tmp_path_factory.mktemp("fw"))
    try:
        w.up()
        w.apply()
        yield w
    finally:
        w.down()


def _ok(proc):
    return proc.returncode == 0


def _refused(proc, codes=(2,)):
    """A network failure (not a broken probe): the probe's 2, curl's 7 (cannot connect) or
    28 (timeout), ping's 1 (no reply)."""
    assert proc.returncode in codes, (proc.returncode, proc.stdout, proc.stderr)
    return True


@pytest.mark.root
def test_ruleset_in_place(world):
    assert firewall.check(_policy(), [world.uid], netns=world.client) == []


@pytest.mark.root
@pytest.mark.parametrize("mode", ["tcp", "ctypes"])
def test_tcp_python_and_ctypes(world, mode):
    assert _ok(world.user(mode, "10.213.0.2", 8080))           # allowed: host and port
    assert _refused(world.user(mode, "10.213.1.2", 8080))       # outside
    assert _ok(world.root(mode, "10.213.1.2", 8080))           # root: not filtered


@pytest.mark.root
def test_child_process_curl(world):
    def curl(url, user=USER):
        return world.in_client("curl", "-sS", "--max-time", "3", "-o", "/dev/null", url,
                               user=user)
    assert _ok(curl("http://10.213.0.2:8080/"))
    assert _refused(curl("http://10.213.1.2:8080/"), (7, 28))
    assert _refused(curl("http://[fd00:213::99]:8080/"), (7, 28))
    assert _ok(curl("http://[fd00:213::2]:8080/"))
    assert _ok(curl("http://10.213.1.2:8080/", user=None))    # root: not filtered


@pytest.mark.root
def test_connect_by_name(world):
    assert _ok(world.user("tcp", "inside.test", 8080))
    assert _refused(world.user("tcp", "outside.test", 8080))
    assert _ok(world.root("tcp", "outside.test", 8080))


@pytest.mark.root
def test_dns_refused_unless_allowed(world):
    assert _refused(world.user("dns", "10.213.1.2", 53))       # the resolver is "outside"
    assert _ok(world.user("dns", "10.213.0.3", 53))           # covered by an allow entry
    assert _ok(world.root("dns", "10.213.1.2", 53))


@pytest.mark.root
def test_udp(world):
    assert _ok(world.user("udp", "10.213.0.2", 8080))
    assert _refused(world.user("udp", "10.213.1.2", 8080))
    assert _ok(world.root("udp", "10.213.1.2", 8080))


@pytest.mark.root
def test_icmp(world):
    def ping(addr, user=USER):
        return world.in_client("ping", "-c", "1", "-W", "2", addr, user=user)
    assert _ok(ping("10.213.0.3"))                    # an allow entry with no ports
    assert _refused(ping("10.213.1.2"), (1,))
    assert _refused(ping("10.213.0.2"), (1,))                # port-limited entry: TCP/UDP only
    assert _ok(ping("10.213.1.2", user=None))


@pytest.mark.root
def test_ipv6(world):
    assert _ok(world.user("tcp", "fd00:213::2", 8080))
    assert _refused(world.user("tcp", "fd00:213::99", 8080))
    assert _refused(world.user("udp", "fd00:213::99", 8080))
    assert _ok(world.root("tcp", "fd00:213::99", 8080))


@pytest.mark.root
def test_loopback_allowed(world):
    proc = world.in_client(PY, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', "
                           "0)); s.listen(); c = socket.create_connection(s.getsockname(), 2); "
                           "print('ok')", user=USER)
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.root
def test_drops_are_counted(world):
    world.user("udp", "10.213.1.2", 9)
    listing = json.loads(_sh("ip", "netns", "exec", world.client, "nft", "-j", "list", "chain",
                             "inet", "lora_enclave", "lora_user").stdout)
    counters = [e["counter"] for item in listing["nftables"] if "rule" in item
                for e in item["rule"]["expr"] if "counter" in e]
    assert len(counters) == 2 and counters[-1]["packets"] > 0   # dns refusals, drops


@pytest.mark.root
def test_check_reports_drift_and_apply_repairs(world):
    client = world.client
    try:
        listing = json.loads(_sh("ip", "netns", "exec", client, "nft", "-j", "-a", "list",
                                 "chain", "inet", "lora_enclave", "lora_user").stdout)
        handle = next(item["rule"]["handle"] for item in listing["nftables"]
                      if "rule" in item and any("counter" in e for e in item["rule"]["expr"])
                      and any("drop" in e for e in item["rule"]["expr"]))
        _sh("ip", "netns", "exec", client, "nft", "delete", "rule", "inet", "lora_enclave",
            "lora_user", "handle", str(handle))
        diffs = firewall.check(_policy(), [world.uid], netns=client)
        assert diffs and any("planned rule missing" in d for d in diffs)
        # the user escapes while it is missing: why the spawner refuses on drift
        assert _ok(world.user("tcp", "10.213.1.2", 8080))
        with pytest.raises(PolicyRefusal, match="lora firewall apply"):
            firewall.ensure_user(4242, _policy(), netns=client)
        # the CLI, in the same namespace: exit 5 on drift
        policies = world.tmp / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "egress.yaml").write_text(POLICY_YAML)
        env = {**os.environ, "LORA_POLICIES": str(policies)}
        cli = [sys.executable, "-m", "lora_kernel.cli", "firewall", "check", "--users", USER]
        proc = _run(["ip", "netns", "exec", client, *cli], env=env)
        assert proc.returncode == 5, proc.stderr
        assert "planned rule missing" in proc.stderr
        proc = _run(["ip", "netns", "exec", client, sys.executable, "-m", "lora_kernel.cli",
                     "firewall", "apply", "--users", USER], env=env)
        assert proc.returncode == 0, proc.stderr
        proc = _run(["ip", "netns", "exec", client, *cli], env=env)
        assert proc.returncode == 0, proc.stderr
        assert firewall.check(_policy(), [world.uid], netns=client) == []
        assert _refused(world.user("tcp", "10.213.1.2", 8080))
    finally:
        world.apply()


@pytest.mark.root
def test_ensure_user_adds_to_set_without_rewriting_rules(world):
    other = 4243
    try:
        before = _sh("ip", "netns", "exec", world.client, "nft", "-a", "list", "chain",
                     "inet", "lora_enclave", "lora_user").stdout
        firewall.ensure_user(other, _policy(), netns=world.client)
        after = _sh("ip", "netns", "exec", world.client, "nft", "-a", "list", "chain",
                    "inet", "lora_enclave", "lora_user").stdout
        assert before.replace(" ", "").split("counter")[0] == \
            after.replace(" ", "").split("counter")[0]   # same rules, same handles
        members = _sh("ip", "netns", "exec", world.client, "nft", "list", "set", "inet",
                      "lora_enclave", "lora_users").stdout
        assert str(other) in members and str(world.uid) in members
        assert firewall.check(_policy(), [world.uid, other], netns=world.client) == []
        # a re-apply keeps members added for running servers (default keep_members)
        firewall.apply(_policy(), [world.uid], netns=world.client)
        assert str(other) in _sh("ip", "netns", "exec", world.client, "nft", "list", "set",
                                 "inet", "lora_enclave", "lora_users").stdout
    finally:
        world.apply()
