"""The egress guard: a ``sys.addaudithook`` hook that refuses non-allowed network traffic.

Installed by the kernel launcher (``python -m lora_kernel``) before ipykernel or any user
code runs; importing this module has no side effect. What the hook sees and refuses:

* ``socket.connect`` (also raised by ``connect_ex``), ``socket.sendto``, ``socket.sendmsg``
  and ``socket.bind`` to an address the policy does not allow;
* name resolution (``socket.getaddrinfo``, ``gethostbyname[_ex]``, ``gethostbyaddr``,
  ``getnameinfo``) of names / addresses the policy does not allow;
* process launches and ``ctypes.dlopen`` are reported (and refused if the policy says so);
* code executed from the ``transformers_modules`` / ``diffusers_modules`` caches, i.e.
  ``trust_remote_code`` models (see also :func:`install_remote_code_refusal`).

What it cannot see (the OS layer enforces; see docs/security.md): C-level networking
(libzmq, libcurl, calls through ctypes), child processes, and the DNS lookup CPython does
inside ``connect(("name", port))`` (the name itself is checked before that lookup).

Addresses are normalised before the check: IPv4 in any ``inet_aton`` form ("2130706433",
"0x7f.1", "127.1", octal parts), IPv6 with scope ids, v4-mapped IPv6, "" and "<broadcast>".

Runs as: the user (their kernel; a recorded run's kernel as the run's user).
"""
from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The policy and address parsing live in the neutral zone (the firewall reads them too);
# re-exported here so ``guard.policy_from_mapping`` etc. keep working.
from lora_kernel.common.egress import (  # noqa: F401
    DEFAULT_POLICY,
    EgressPolicy,
    load_egress_policy,
    normalise_host,
    parse_ipv4_loose,
    policy_from_mapping,
)
from lora_kernel.common.errors import EgressBlocked, UnsafeModelError
from lora_kernel.common.policy import policy_path

NET_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"})
DNS_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                        "socket.getnameinfo"})
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                            "os.spawn", "pty.spawn", "os.fork", "os.forkpty"})
CTYPES_EVENTS = frozenset({"ctypes.dlopen"})
REMOTE_CODE_MARKERS = ("transformers_modules", "diffusers_modules")
WATCHED = NET_EVENTS | DNS_EVENTS | PROCESS_EVENTS | CTYPES_EVENTS | {"exec", "sys.addaudithook"}


# -------------------------------------------------------------------------------- hook

@dataclass(frozen=True)
class GuardEvent:
    """What the hook reports: a refusal, or a logged process launch / library load."""

    kind: str            # "refusal" | "process" | "ctypes" | "audithook"
    event: str           # the audit event name
    destination: str     # address, name, command or library
    location: str        # innermost user-code frame, "file:line (function)"
    message: str = ""


def _as_port(port):
    if isinstance(port, (bytes, bytearray)):
        port = bytes(port).decode("ascii", "replace")
    if isinstance(port, str):
        return int(port) if port.isdigit() else None  # a service name: no port rule applies
    return port


def _destination(host, port) -> str:
    norm = normalise_host(host)
    shown = f"[{norm}]" if getattr(norm, "version", 4) == 6 else str(norm)
    if str(host) != str(norm):
        shown += f" (given as {host!r})"
    return f"{shown}:{port}" if port is not None else shown


def _code_location() -> str:
    """The innermost frame outside this module and the stdlib's socket plumbing."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and not name.startswith("<frozen"):
            if fallback is None:
                fallback = frame
            if "ipykernel_" in name or name.startswith(("<ipython-input", "<string>")):
                return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    if fallback is None:
        return "?"
    return f"{fallback.f_code.co_filename}:{fallback.f_lineno} ({fallback.f_code.co_name})"


def refusal_message(event: str, destination: str, policy_file: str) -> str:
    """The text of an :class:`EgressBlocked`: destination, event, policy file, and why."""
    return (f"Egress refused: {event} to {destination} is not allowed by the egress policy "
            f"{policy_file}. Data, models and logs must stay inside the organisation's "
            f"network; if this is an internal service, ask an administrator to add it "
            f"to the policy.")


def make_hook(policy: EgressPolicy, report: Callable[[GuardEvent], None] | None = None):
    """Build the audit hook for ``policy``; ``report`` receives every :class:`GuardEvent`.

    ``report`` is called inside the hook: it must be quick and must not raise.
    """
    return _Guard(policy, report).hook


class _Guard:
    """The audit hook of one policy: :meth:`hook` sends each watched event to its check."""

    def __init__(self, policy: EgressPolicy, report: Callable[[GuardEvent], None] | None):
        self.policy, self.report = policy, report
        self.state = threading.local()
        self.allowed_families = frozenset({int(socket.AF_INET), int(socket.AF_INET6)})
        self.unix = int(getattr(socket, "AF_UNIX", -1))

    def hook(self, event, args):
        if event not in WATCHED:
            return
        if event == "exec":
            self.check_exec(args[0])
        elif event in NET_EVENTS:
            self.check_socket(event, args[0], args[1] if len(args) > 1 else None)
        elif event in DNS_EVENTS:
            self.check_dns(event, args)
        elif event in PROCESS_EVENTS:
            self.check_process(event, args)
        elif event in CTYPES_EVENTS:
            self.check_ctypes(event, args)
        elif event == "sys.addaudithook":
            self._report(GuardEvent("audithook", event, "another audit hook was added",
                                    _code_location()))

    # -- reporting ----------------------------------------------------------------------
    def _report(self, ev: GuardEvent) -> None:
        if self.report is None or getattr(self.state, "busy", False):
            return
        self.state.busy = True
        try:
            self.report(ev)
        finally:
            self.state.busy = False

    def refuse(self, event: str, destination: str) -> None:
        msg = refusal_message(event, destination, self.policy.path)
        self._report(GuardEvent("refusal", event, destination, _code_location(), msg))
        raise EgressBlocked(msg)

    # -- the checks ---------------------------------------------------------------------
    def check_exec(self, code) -> None:
        """Code compiled from a file of a model's remote code is refused."""
        filename = getattr(code, "co_filename", "")
        if any(m in filename for m in REMOTE_CODE_MARKERS):
            msg = remote_code_message(filename, self.policy.path)
            self._report(GuardEvent("refusal", "exec", filename, _code_location(), msg))
            raise UnsafeModelError(msg)

    def check_socket(self, event: str, sock, address) -> None:
        """A connect / send / bind to an address the policy does not allow is refused."""
        policy = self.policy
        family = int(getattr(sock, "family", socket.AF_INET))
        if family == self.unix or family in policy.allow_families:
            return
        if family not in self.allowed_families:
            self.refuse(event, f"socket family {family} address {address!r}")
        if address is None and event == "socket.sendmsg":
            return  # sendmsg on a connected socket: the connect was checked
        if not isinstance(address, tuple) or not address:
            self.refuse(event, repr(address))
        host, port = address[0], (address[1] if len(address) > 1 else None)
        norm = normalise_host(host)
        if event == "socket.bind":
            self.check_bind(event, host, port, norm)
            return
        ok = policy.allows_name(norm, port) if isinstance(norm, str) \
            else policy.allows_address(norm, port)
        if not ok:
            self.refuse(event, _destination(host, port))

    def check_bind(self, event: str, host, port, norm) -> None:
        """Binding all interfaces needs ``allow_bind_any``; an address, the allow-list."""
        policy = self.policy
        if not isinstance(norm, str) and norm.is_unspecified:
            if policy.allow_bind_any:
                return
            self.refuse(event, _destination(host, port) + " (all interfaces)")
        if isinstance(norm, str) and policy.allows_name(norm):
            return
        if not isinstance(norm, str) and policy.allows_address(norm):
            return
        self.refuse(event, _destination(host, port))

    def check_dns(self, event: str, args) -> None:
        """A lookup of a name the policy does not allow is refused."""
        if event == "socket.getaddrinfo":
            host, port = args[0], args[1]
            if host is None:
                return  # loopback / wildcard, no lookup
        elif event == "socket.getnameinfo":
            sockaddr = args[0]
            host, port = sockaddr[0], (sockaddr[1] if len(sockaddr) > 1 else None)
        else:
            host, port = args[0], None
        port = _as_port(port)
        if not self.policy.allows(host, port):
            self.refuse(event, _destination(host, port))

    def check_process(self, event: str, args) -> None:
        """A process launch: refused (``processes: refuse``) or reported."""
        what = " ".join(str(a) for a in args[:2] if a is not None)[:500] or event
        if self.policy.processes == "refuse":
            msg = (f"Process launch refused: {event} {what} is not allowed by the egress "
                   f"policy {self.policy.path} (processes: refuse).")
            self._report(GuardEvent("refusal", event, what, _code_location(), msg))
            raise EgressBlocked(msg)
        self._report(GuardEvent("process", event, what, _code_location()))

    def check_ctypes(self, event: str, args) -> None:
        """A library load through ctypes: refused (``ctypes: refuse``) or reported."""
        what = str(args[0])
        if self.policy.ctypes == "refuse":
            msg = (f"Library load refused: ctypes.dlopen {what} is not allowed by the "
                   f"egress policy {self.policy.path} (ctypes: refuse).")
            self._report(GuardEvent("refusal", event, what, _code_location(), msg))
            raise EgressBlocked(msg)
        self._report(GuardEvent("ctypes", event, what, _code_location()))


_INSTALLED: list = []


def install(policy: EgressPolicy | None = None,
            report: Callable[[GuardEvent], None] | None = None) -> EgressPolicy:
    """Install the egress hook in this process (once; audit hooks cannot be removed).

    A second call raises :class:`~lora_kernel.common.errors.PolicyRefusal`-like ``RuntimeError``
    rather than stacking a weaker policy. Returns the policy in force.
    """
    if _INSTALLED:
        raise RuntimeError("the egress guard is already installed in this process")
    policy = policy if policy is not None else load_egress_policy()
    sys.addaudithook(make_hook(policy, report))
    _INSTALLED.append(policy)
    return policy


def installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return bool(_INSTALLED)


# ------------------------------------------------------------------ trust_remote_code

def remote_code_message(what: str, policy_file: str) -> str:
    """The text of the :class:`UnsafeModelError` raised for remote model code."""
    return (f"trust_remote_code refused ({what}): running code shipped with a model is not "
            f"allowed on this platform (policy {policy_file}). Use a model whose "
            f"architecture is built into transformers/diffusers, from a local path.")


_PATCH_TARGETS = {
    "transformers.dynamic_module_utils": ("resolve_trust_remote_code",
                                          "get_class_from_dynamic_module",
                                          "get_cached_module_file"),
    "diffusers.utils.dynamic_modules_utils": ("resolve_trust_remote_code",
                                              "get_class_from_dynamic_module",
                                              "get_cached_module_file"),
}


def _refusing(module_name: str, func_name: str, original, policy_file: str):
    def refuse_remote_code(*args, **kwargs):
        trust = kwargs.get("trust_remote_code", args[0] if args else None)
        if func_name == "resolve_trust_remote_code" and not trust:
            return original(*args, **kwargs)  # transformers' own "needs remote code" error
        raise UnsafeModelError(remote_code_message(f"{module_name}.{func_name}", policy_file))
    refuse_remote_code._lora_refusal = True
    refuse_remote_code.__name__ = func_name
    refuse_remote_code.__qualname__ = func_name
    return refuse_remote_code


class _RemoteCodeFinder:
    """A ``sys.meta_path`` finder that patches the remote-code loaders right after their
    module executes, before any other module binds the names with ``from ... import``."""

    def __init__(self, policy_file: str):
        self.policy_file = policy_file

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PATCH_TARGETS:
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, finder = spec.loader, self

        class PatchingLoader:
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                finder.patch(module)

        spec.loader = PatchingLoader()
        return spec

    def patch(self, module):
        """Replace the remote-code entry points of an already imported ``module``."""
        for func in _PATCH_TARGETS[module.__name__]:
            original = getattr(module, func, None)
            if original is not None and not getattr(original, "_lora_refusal", False):
                setattr(module, func, _refusing(module.__name__, func, original,
                                                self.policy_file))


def install_remote_code_refusal(policy_file: str | Path | None = None) -> None:
    """Make ``trust_remote_code=True`` (transformers, diffusers) raise
    :class:`~lora_kernel.common.errors.UnsafeModelError` with a message naming the policy.

    A meta-path finder patches the loaders when their module is first imported (or now, if
    it already is). The audit hook's ``exec`` check is the backstop if user code restores
    the originals.
    """
    policy_file = str(policy_file or policy_path("egress"))
    finder = _RemoteCodeFinder(policy_file)
    sys.meta_path.insert(0, finder)
    for name in _PATCH_TARGETS:
        if name in sys.modules:
            finder.patch(sys.modules[name])
