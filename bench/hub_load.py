"""Benchmark: the hub under load — spawn time, concurrent spawns, the audit service's event sink.

A REAL JupyterHub (``hub/jupyterhub_config.py``: configurable-http-proxy, the GPU spawner, the
runs and audit services) on free loopback ports, started by ``tests/hub/hubtools.py`` exactly as
the hub tests start it. As root, users are real system users and every server runs as its user
(the benchmark's users are created, and removed again at the end); otherwise hub-only demo users.
Three parts, each with a baseline measured in the same run:

1. ``spawn``: login-to-ready, ``--spawns`` times (default 10) for the SAME user: a fresh
   session logs in through the login form, spawns through the spawn form, waits until the
   server is ready and answers ``/user/<name>/lab`` (OAuth included); then the server is
   stopped (not timed). Baseline: median of ``GET /hub/api/`` through the proxy.
2. ``concurrent``: ``--users`` users (default 20) log in one after another, then all spawn at
   once (one thread each); errors (must be 0), wall time, p50/max per-user ready time, and the
   summed RSS of the single-user server processes (psutil) while all are up.
3. ``events``: ``--senders`` users (default 4), one kernel id each, post batches of ``--batch``
   events (default 10) to ``services/lora-audit/api/events`` so that the total is ``--rate``
   events/s (default 200: each sender posts every senders*batch/rate s = 200 ms), for
   ``--seconds`` (default 60); per-request latency p50/p99/max and achieved throughput. Then
   every event is accounted for: read back through the auditor API (paginated), count == sent,
   no duplicate seq, one ``kernel_events`` ledger entry per accepted batch whose count and
   sha256 match the events read back, and the ledger verifies. Baseline: p99 of an auditor's
   ``GET api/runs?verify=0`` (no ledger yet: answers at once) measured just before.

    .venv/bin/python bench/hub_load.py [--part spawn|concurrent|events|all] [--spawns 10]
        [--users 20] [--senders 4] [--rate 200] [--batch 10] [--seconds 60]
    .venv/bin/python bench/hub_load.py --quick      # smoke run: 3 spawns, 4 users, 10 s events
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "hub"))
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from hubtools import ROOT, Hub, make_hub_root, server_procs, user_name  # noqa: E402

AUDIT = "/services/lora-audit/api"
RESEARCHERS = ["lora-researchers"]


# -- helpers ---------------------------------------------------------------------------------
def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def timed_gets(url: str, n: int, headers: dict | None = None) -> list[float]:
    """Seconds of ``n`` sequential GETs of ``url`` (one keep-alive session; 5 warm-ups)."""
    s = requests.Session()
    out = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        r = s.get(url, headers=headers, timeout=30)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"baseline GET {url}: {r.status_code} {r.text[:300]}")
        if i >= 5:
            out.append(dt)
    return out


def hub_root() -> Path:
    """A folder for the hub (as tests/hub/conftest.py ``hub_root``): readable by the service
    account and the users; as root, the repo's parents get their traverse bit and the service
    account of this run is created (tests/sysusers.py)."""
    try:
        return make_hub_root("lora-hub-bench-")
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def singleuser_procs(hub: Hub) -> list:  # type: ignore[type-arg]
    """The hub's single-user server processes (hubtools.server_procs also finds the runs and
    audit services, which carry the same JupyterHub variables)."""
    out = []
    for p in server_procs(hub.env["LORA_HUB_API_PORT"]):
        try:
            if any("jupyterhub-singleuser" in a for a in p.cmdline()):
                out.append(p)
        except Exception:
            pass
    return out


class Bench:
    """The hub and the system users this run created (removed at the end)."""

    def __init__(self) -> None:
        self.root = hub_root()
        self.hub = Hub(self.root)
        self.hub.sessions = {}

    def add_users(self, users: dict[str, list[str]]) -> None:
        self.hub.add_users(users)

    def close(self) -> None:
        self.hub.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)
        if ROOT:  # the users and groups this run made (tests/sysusers.py)
            import sysusers

            sysusers.cleanup()


# -- 1. login-to-ready -----------------------------------------------------------------------
def part_spawn(b: Bench, n: int) -> None:
    hub = b.hub
    short = "bench-spawn"
    b.add_users({short: RESEARCHERS})
    base = timed_gets(f"{hub.url}/hub/api/", 50)
    base_med = statistics.median(base)
    times, logins = [], []
    for i in range(n):
        t0 = time.perf_counter()
        hub.login(short)  # a fresh requests session each time: form login, no cookies yet
        t1 = time.perf_counter()
        hub.spawn(short, timeout=300)
        t2 = time.perf_counter()
        hub.stop_server(user_name(short))
        times.append(t2 - t0)
        logins.append(t1 - t0)
        print(f"  spawn {i + 1}/{n}: login {t1 - t0:.2f} s, login-to-ready {t2 - t0:.2f} s",
              flush=True)
    med = statistics.median(times)
    first = "; the first is its first-ever spawn" if user_name(short) in b.created else ""
    print(f"1. login-to-ready, {n} times the same user ({user_name(short)}{first}):")
    print(f"   median {med:.2f} s (min {min(times):.2f} s, max {max(times):.2f} s; "
          f"login part median {statistics.median(logins):.2f} s)")
    print(f"   baseline GET /hub/api/ median of 50: {ms(base_med)}")
    print(f"   ratio spawn median / baseline: {med / base_med:.0f}x", flush=True)


# -- 2. concurrent spawns --------------------------------------------------------------------
def part_concurrent(b: Bench, n: int) -> None:
    hub = b.hub
    shorts = [f"bench-c{i:02d}" for i in range(1, n + 1)]
    b.add_users({s: RESEARCHERS for s in shorts})
    for s in shorts:
        hub.login(s)
    gate = threading.Barrier(n)
    ready: dict[str, float] = {}
    errors: dict[str, str] = {}

    def one(short: str) -> None:
        gate.wait()
        t0 = time.perf_counter()
        try:
            hub.spawn(short, timeout=600)
            ready[short] = time.perf_counter() - t0
        except Exception as exc:  # every failure counts as an error
            errors[short] = f"{type(exc).__name__}: {str(exc)[:300]}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, shorts))
    wall = time.perf_counter() - t0
    procs = singleuser_procs(hub)
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except Exception:
            pass
    t1 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda s: hub.stop_server(user_name(s)), shorts))
    stop_wall = time.perf_counter() - t1
    left = len(singleuser_procs(hub))
    print(f"2. {n} users spawning at once (logged in first; spawn form -> ready -> /lab):")
    print(f"   errors: {len(errors)}" + "".join(f"\n     {k}: {v}" for k, v in errors.items()))
    if ready:
        vals = list(ready.values())
        print(f"   wall {wall:.1f} s; per-user ready p50 {statistics.median(vals):.1f} s, "
              f"min {min(vals):.1f} s, max {max(vals):.1f} s ({len(vals)} ready)")
    print(f"   memory: {len(procs)} single-user server processes, sum RSS "
          f"{rss / 2**20:.0f} MiB ({rss / 2**20 / max(1, len(procs)):.0f} MiB each)")
    print(f"   stopping all {n} at once: {stop_wall:.1f} s, server processes left: {left}",
          flush=True)


# -- 3. the audit service's event sink -------------------------------------------------------
def part_events(b: Bench, senders: int, rate: float, batch: int, seconds: float) -> bool:
    from hub.events import batch_digest
    from lora_kernel.common.timeutil import iso_time
    from lora_kernel.provenance.ledger import LedgerReader

    hub = b.hub
    shorts = [f"bench-ev{i}" for i in range(1, senders + 1)]
    b.add_users({s: RESEARCHERS for s in shorts} | {"bench-auditor": ["lora-auditors"]})
    tokens = {s: hub.token(s) for s in shorts}
    auditor = {"Authorization": f"token {hub.token('bench-auditor')}"}
    base = timed_gets(f"{hub.url}{AUDIT}/runs?verify=0", 200, auditor)
    base_p99, base_p50 = pct(base, 99), statistics.median(base)

    interval = senders * batch / rate
    lat: list[float] = []
    failures: list[str] = []
    accepted: dict[str, list[tuple[int, int]]] = {}  # kernel -> [(ledger_seq, stored)]
    sent: dict[str, int] = {}
    owner: dict[str, str] = {}  # kernel -> hub user
    late = [0, 0.0]  # sends later than one interval behind schedule, worst lateness
    lock = threading.Lock()
    start = time.perf_counter() + 0.5
    end = start + seconds
    last_answer = [start]

    def sender(i: int, short: str) -> None:
        name = user_name(short)
        kernel = f"bench-{short}-{uuid.uuid4().hex[:12]}"
        s = requests.Session()
        s.headers["Authorization"] = f"token {tokens[short]}"
        seq, k, mine, ok = 0, 0, [], []
        while True:
            due = start + i * interval / senders + k * interval
            if due >= end:
                break
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            elif now - due > interval:
                with lock:
                    late[0] += 1
                    late[1] = max(late[1], now - due)
            k += 1
            events = []
            for _ in range(batch):
                seq += 1
                events.append({"v": 1, "seq": seq, "type": "execute", "time": iso_time(),
                               "user": name, "kernel_id": kernel, "run_id": None,
                               "code": f"x = {seq}\nprint(x * 2)", "status": "ok",
                               "execution_count": seq, "duration_ms": 1.5})
            t0 = time.perf_counter()
            try:
                r = s.post(f"{hub.url}{AUDIT}/events", timeout=60,
                           json={"kernel_id": kernel, "user": name, "events": events})
                dt = time.perf_counter() - t0
                body = r.json() if r.status_code == 200 else {}
            except Exception as exc:
                dt, r, body = time.perf_counter() - t0, None, {"error": repr(exc)}
            mine.append(dt)
            if r is not None and r.status_code == 200 and body.get("stored") == batch \
                    and not body.get("duplicates") and body.get("ledger_seq"):
                ok.append((int(body["ledger_seq"]), int(body["stored"])))
            else:
                with lock:
                    failures.append(f"{kernel} seq {seq - batch + 1}..{seq}: "
                                    f"{getattr(r, 'status_code', None)} {str(body)[:200]}")
        with lock:
            lat.extend(mine)
            accepted[kernel] = ok
            sent[kernel] = seq
            owner[kernel] = name
            last_answer[0] = max(last_answer[0], time.perf_counter())

    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(lambda a: sender(*a), enumerate(shorts)))
    duration = last_answer[0] - start
    total_sent = sum(sent.values())
    total_stored = sum(n for ok in accepted.values() for _, n in ok)
    n_batches = sum(len(ok) for ok in accepted.values())

    # account for every event: the auditor API, then the ledger
    problems: list[str] = []
    by_ledger: dict[int, list[dict]] = {}
    read_back = 0
    for kernel, name in owner.items():
        after, seqs = 0, []
        while True:
            r = requests.get(f"{hub.url}{AUDIT}/events", headers=auditor, timeout=120,
                             params={"user": name, "kernel_id": kernel, "after": after,
                                     "limit": 5000})
            r.raise_for_status()
            page = r.json()
            for ev in page["events"]:
                seqs.append(ev["seq"])
                by_ledger.setdefault(ev["ledger_seq"], []).append(ev["event"])
            if page["next_after"] is None:
                break
            after = page["next_after"]
        read_back += len(seqs)
        if len(seqs) != sent[kernel]:
            problems.append(f"{kernel}: {len(seqs)} read back, {sent[kernel]} sent")
        if len(set(seqs)) != len(seqs):
            problems.append(f"{kernel}: {len(seqs) - len(set(seqs))} duplicate seq")
        if set(seqs) != set(range(1, sent[kernel] + 1)):
            problems.append(f"{kernel}: seqs read back are not 1..{sent[kernel]}")
    with LedgerReader(state=hub.state) as led:
        entries = [e for e in led.entries("kernel_events") if e.subject in sent]
        ledger_problems = led.verify()
    answered = {seq for ok in accepted.values() for seq, _ in ok}
    if len(entries) != n_batches:
        problems.append(f"{len(entries)} kernel_events entries, {n_batches} accepted batches")
    if {e.seq for e in entries} != answered:
        problems.append("ledger entry seqs differ from the ledger_seq the service answered")
    if sum(e.payload["count"] for e in entries) != total_sent:
        problems.append("the ledger entries' counts do not add up to the events sent")
    bad_hash = sum(1 for e in entries if batch_digest(sorted(
        by_ledger.get(e.seq, []), key=lambda ev: ev["seq"])) != e.payload["sha256"])
    if bad_hash:
        problems.append(f"{bad_hash} ledger entries whose sha256 does not match the events")
    if ledger_problems:
        problems.append(f"ledger verify: {ledger_problems[:3]}")
    if failures:
        problems.append(f"{len(failures)} failed batches, e.g. {failures[:3]}")
    all_ok = not problems and total_stored == total_sent == read_back

    p50, p99 = statistics.median(lat), pct(lat, 99)
    print(f"3. audit service events: {senders} senders x 1 kernel, batches of {batch} every "
          f"{interval * 1e3:.0f} ms each = {rate:.0f} events/s target, {seconds:.0f} s")
    print(f"   requests {len(lat)}, failed {len(failures)}; latency p50 {ms(p50)}, p99 "
          f"{ms(p99)}, max {ms(max(lat))}")
    print(f"   achieved {total_stored / duration:.1f} events/s stored ({total_stored} in "
          f"{duration:.1f} s; {len(lat) / duration:.1f} batches/s); sends more than one "
          f"interval late: {late[0]} (worst {ms(late[1])})")
    print(f"   read back {read_back} of {total_sent} sent; {len(entries)} kernel_events ledger "
          f"entries for {n_batches} accepted batches; ledger verify: "
          f"{'ok' if not ledger_problems else 'PROBLEMS'}")
    for p in problems:
        print(f"   PROBLEM: {p}")
    print(f"   every event accounted for: {'yes' if all_ok else 'no'}")
    print(f"   baseline auditor GET api/runs?verify=0 (200 sequential): p50 {ms(base_p50)}, "
          f"p99 {ms(base_p99)}")
    print(f"   ratio events p99 / baseline p99: {p99 / base_p99:.1f}x; p50 / p50: "
          f"{p50 / base_p50:.1f}x", flush=True)
    return all_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["spawn", "concurrent", "events", "all"], default="all")
    ap.add_argument("--spawns", type=int, default=10, help="part 1: login-to-ready repeats")
    ap.add_argument("--users", type=int, default=20, help="part 2: users spawning at once")
    ap.add_argument("--senders", type=int, default=4, help="part 3: users posting events")
    ap.add_argument("--rate", type=float, default=200, help="part 3: total events/s")
    ap.add_argument("--batch", type=int, default=10, help="part 3: events per batch")
    ap.add_argument("--seconds", type=float, default=60, help="part 3: duration")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 spawns, 4 concurrent users, 10 s of events")
    args = ap.parse_args()
    if args.quick:
        args.spawns, args.users, args.seconds = 3, 4, 10
    parts = ["spawn", "concurrent", "events"] if args.part == "all" else [args.part]
    import psutil

    print(f"machine: {lscpu_model()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()} "
          f"{platform.release()}, Python {platform.python_version()}; "
          f"{'root: servers run as system users' if ROOT else 'not root: hub-only demo users'}")
    b = Bench()
    ok = True
    try:
        t0 = time.perf_counter()
        b.hub.start()
        print(f"hub + proxy + runs/audit services up in {time.perf_counter() - t0:.1f} s",
              flush=True)
        if "spawn" in parts:
            part_spawn(b, args.spawns)
        if "concurrent" in parts:
            part_concurrent(b, args.users)
        if "events" in parts:
            ok = part_events(b, args.senders, args.rate, args.batch, args.seconds)
    except BaseException:
        print(f"hub log tail:\n{b.hub.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        b.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
