"""lora_kernel.kernel.execlog: events, the daily file, read_events, the spool and the HTTP sink.

The sink is a real HTTP server on 127.0.0.1 started by the test (loopback only).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from lora_kernel.kernel import execlog
from lora_kernel.kernel.execlog import ExecLog, HttpSink, SinkError, Spool, read_events


class SinkServer:
    """A loopback audit sink: records every POSTed batch and its Authorization header."""

    def __init__(self, port: int = 0, status: int = 200):
        self.batches, self.headers, self.status = [], [], status
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.status == 200:
                    outer.batches.append(json.loads(body))
                    outer.headers.append(self.headers.get("Authorization"))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args):
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hub/audit/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self):
        return [e for batch in self.batches for e in batch["events"]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_emit_writes_daily_jsonl_with_common_fields(tmp_path):
    log = ExecLog(home=tmp_path, user="alice", kernel_id="k1", environ={"LORA_RUN_ID": "r1"})
    first = log.emit("kernel_start", version="x")
    second = log.record_execution("print(1)", {"header": {"session": "s", "msg_id": "m",
                                                          "username": "alice"}},
                                  {"status": "ok", "execution_count": 1}, 0.0123)
    log.close()
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    path = tmp_path / "logs" / "alice" / f"kernel-{day}.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3]
    assert lines[0] == first and lines[1] == second and lines[2]["type"] == "kernel_stop"
    for key in ("time", "user", "host", "pid", "kernel_id", "run_id", "v"):
        assert key in second
    assert second["run_id"] == "r1" and second["duration_ms"] == 12.3
    assert second["sha256"] == hashlib.sha256(b"print(1)").hexdigest()
    assert (second["status"], second["ename"], second["session"]) == ("ok", None, "s")


def test_execution_without_reply_is_aborted(tmp_path):
    log = ExecLog(home=tmp_path, user="u", environ={})
    event = log.record_execution("while True: pass", None, None, 1.0)
    assert (event["status"], event["ename"]) == ("aborted", "KernelInterrupted")


def test_read_events_filters_by_run_since_and_user(tmp_path):
    a = ExecLog(home=tmp_path, user="alice", environ={"LORA_RUN_ID": "run-a"})
    b = ExecLog(home=tmp_path, user="bob", environ={})
    a.emit("execute", code="1")
    cut = datetime.now(UTC)
    time.sleep(0.01)
    b.emit("execute", code="2")
    a.emit("execute", code="3")
    assert [e["code"] for e in read_events(tmp_path)] == ["1", "2", "3"]
    assert [e["code"] for e in read_events(tmp_path, run_id="run-a")] == ["1", "3"]
    assert [e["code"] for e in read_events(tmp_path, since=cut)] == ["2", "3"]
    assert [e["code"] for e in read_events(tmp_path, since=cut.isoformat())] == ["2", "3"]
    assert [e["code"] for e in read_events(tmp_path, since=cut.timestamp(), user="bob")] == ["2"]
    assert read_events(tmp_path, since=cut + timedelta(days=2)) == []


def test_read_events_skips_a_torn_last_line_but_rejects_garbage(tmp_path):
    log = ExecLog(home=tmp_path, user="u", environ={})
    log.emit("execute", code="ok")
    path = next((tmp_path / "logs" / "u").glob("kernel-*.jsonl"))
    with open(path, "ab") as fh:
        fh.write(b'{"torn": ')
    assert len(read_events(tmp_path)) == 1
    with open(path, "ab") as fh:
        fh.write(b"\nnot json\n")
    with pytest.raises(ValueError, match="not a JSON event"):
        read_events(tmp_path)
    with open(path, "ab") as fh:
        fh.write(b"garbage naming run-b\n")
    # a run's collection parses only the lines that name it: other lines' garbage is not its
    assert read_events(tmp_path, run_id="run-a") == []
    with pytest.raises(ValueError, match="not a JSON event"):
        read_events(tmp_path, run_id="run-b")


def test_read_events_since_skips_the_daily_files_before_its_day(tmp_path):
    """Collecting a run reads from the day before its start (evidence.events_since), not the
    user's whole history: an older daily file is not even parsed."""
    from lora_kernel.trusted.evidence import events_since

    log = ExecLog(home=tmp_path, user="u", environ={"LORA_RUN_ID": "run-a"})
    log.emit("execute", code="today")
    folder = tmp_path / "logs" / "u"
    (folder / "kernel-2020-01-01.jsonl").write_text("not json, and naming run-a\n")
    now = datetime.now(UTC)
    since = events_since({"started": now.isoformat()})
    assert since is not None and datetime.fromisoformat(since.replace("Z", "+00:00")) < now
    assert [e["code"] for e in read_events(tmp_path, run_id="run-a", since=since)] == ["today"]
    with pytest.raises(ValueError, match="2020-01-01.jsonl:1"):
        read_events(tmp_path, run_id="run-a")  # without since: the whole history
    assert events_since({}) is None


def test_http_sink_posts_with_token_and_refuses_bad_answers():
    server = SinkServer()
    try:
        HttpSink(server.url, token="tok").send("k", "alice", [{"seq": 1}])
        assert server.batches == [{"kernel_id": "k", "user": "alice", "events": [{"seq": 1}]}]
        assert server.headers == ["token tok"]
        server.status = 500
        with pytest.raises(SinkError, match="HTTP 500"):
            HttpSink(server.url).send("k", "alice", [{"seq": 2}])
    finally:
        server.close()
    with pytest.raises(SinkError, match="unreachable"):
        HttpSink(f"http://127.0.0.1:{_free_port()}/x", timeout=1).send("k", "a", [{"seq": 3}])


def test_sink_from_env_needs_the_audit_url():
    assert execlog.sink_from_env({"JUPYTERHUB_API_TOKEN": "t"}) is None
    sink = execlog.sink_from_env({"LORA_AUDIT_URL": "http://127.0.0.1:9/a",
                                  "JUPYTERHUB_API_TOKEN": "t"})
    assert sink.token == "t"
    with pytest.raises(ValueError):
        HttpSink("ftp://x/")


def test_spool_keeps_events_until_the_sink_returns_in_order(tmp_path):
    port = _free_port()
    sink = HttpSink(f"http://127.0.0.1:{port}/a", token="t", timeout=1)
    log = ExecLog(home=tmp_path, user="u", kernel_id="k", sink=sink, environ={})
    for i in range(5):
        log.emit("execute", code=str(i))
    assert log.flush(timeout=0.3) is False and "unreachable" in log.sink_error
    spool = tmp_path / "logs" / "u" / "spool" / "k.jsonl"
    assert len(spool.read_text().splitlines()) == 5
    server = SinkServer(port)
    try:
        assert log.flush(timeout=5)
        log.emit("execute", code="5")
        log.close()
        assert [e["seq"] for e in server.events] == list(range(1, 8))  # + kernel_stop
        assert not spool.exists()  # drained spools are removed
    finally:
        server.close()


def test_orphaned_spool_is_delivered_by_the_next_kernel(tmp_path):
    port = _free_port()
    sink = HttpSink(f"http://127.0.0.1:{port}/a", timeout=1)
    dead = ExecLog(home=tmp_path, user="u", kernel_id="dead", sink=sink, environ={})
    dead.emit("execute", code="lost?")
    dead.spool.close(remove_if_drained=False)  # the kernel died: lock released, not sent
    server = SinkServer(port)
    try:
        live = ExecLog(home=tmp_path, user="u", kernel_id="live", sink=sink, environ={})
        live.start()
        deadline = time.monotonic() + 10
        while not server.batches and time.monotonic() < deadline:
            time.sleep(0.05)
        live.close()
        kernels = [b["kernel_id"] for b in server.batches]
        assert kernels[0] == "dead" and server.batches[0]["events"][0]["code"] == "lost?"
        assert "live" in kernels
    finally:
        server.close()


def test_a_live_spool_is_not_taken_over(tmp_path):
    sink = HttpSink("http://127.0.0.1:9/a")
    owner = ExecLog(home=tmp_path, user="u", kernel_id="k", sink=sink, environ={})
    with pytest.raises(BlockingIOError):
        Spool(tmp_path / "logs" / "u" / "spool" / "k.jsonl")
    owner.spool.close(remove_if_drained=False)
    Spool(tmp_path / "logs" / "u" / "spool" / "k.jsonl").close()  # free again


# ------------------------------------------------------------------------ real kernels

@pytest.mark.slow
def test_one_event_per_cell_with_the_right_fields(lora_kernel):
    k = lora_kernel(env={"LORA_RUN_ID": "run-42", "JPY_SESSION_NAME": "work/train.ipynb"})
    assert k.run("x = 21 * 2\nprint(x)")["status"] == "ok"
    assert k.run("1 / 0")["ename"] == "ZeroDivisionError"
    assert k.run("import socket\nsocket.getaddrinfo('example.com', 443)")["status"] == "error"
    k.kc.execute("y = 1", silent=True)
    assert k.run("y")["status"] == "ok"
    events = k.events(run_id="run-42")
    executes = [e for e in events if e["type"] == "execute"]
    assert [e["code"] for e in executes] == [
        "x = 21 * 2\nprint(x)", "1 / 0", "import socket\nsocket.getaddrinfo('example.com', 443)",
        "y = 1", "y"]
    first = executes[0]
    assert first["status"] == "ok" and first["ename"] is None and first["duration_ms"] >= 0
    assert first["notebook"] == "work/train.ipynb" and first["session"] == k.kc.session.session
    assert first["kernel_id"] == k.km.kernel_id and first["user"] and first["host"]
    assert executes[1]["status"] == "error" and executes[1]["ename"] == "ZeroDivisionError"
    assert executes[2]["ename"] == "EgressBlocked" and executes[3]["silent"] is True
    refusal = [e for e in events if e["type"] == "refusal"]
    assert len(refusal) == 1 and refusal[0]["destination"] == "example.com:443"
    assert refusal[0]["event"] == "socket.getaddrinfo" and "ipykernel_" in refusal[0]["location"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and events[0]["type"] == "kernel_start"


@pytest.mark.slow
def test_shell_commands_run_and_each_launch_is_logged(lora_kernel):
    """``!cmd`` forks through a pty and closes every inherited descriptor before it execs:
    the child's own log event must not fail it (it did: EBADF). Each launch is logged, the
    fork by the kernel and the exec, with its command line, by the child under its own id."""
    k = lora_kernel(env={"LORA_RUN_ID": "run-sh"})
    res = k.run("!echo shell-says-hi\nimport subprocess\n"
                "print(subprocess.run(['echo', 'popen-ok'], capture_output=True, text=True)"
                ".stdout)")
    assert res["status"] == "ok", res
    assert "shell-says-hi" in res["stdout"] and "popen-ok" in res["stdout"]
    events = [e for e in k.events(run_id="run-sh") if e["type"] == "process"]
    kernel_id = k.km.kernel_id
    fork = [e for e in events if e["event"] == "os.forkpty"]
    assert fork and fork[0]["kernel_id"] == kernel_id
    (child,) = [e for e in events if e["event"] == "os.exec"]
    assert "echo shell-says-hi" in child["destination"]
    assert child["kernel_id"] == f"{kernel_id}/fork-{child['pid']}"
    assert child["parent_kernel_id"] == kernel_id and child["seq"] == 1
    assert any(e["event"] == "subprocess.Popen" and "popen-ok" in e["destination"]
               for e in events)
    ours = [e["seq"] for e in k.events(run_id="run-sh") if e["kernel_id"] == kernel_id]
    assert ours == sorted(set(ours))  # the kernel's own counter never reused


@pytest.mark.slow
def test_a_refused_shell_command_does_not_run(lora_kernel, tmp_path):
    k = lora_kernel(policy="loopback: true\nprocesses: refuse\n")
    marker = tmp_path / "ran"
    res = k.run(f"!touch {marker}")
    assert res["ename"] == "EgressBlocked" and "processes: refuse" in res["evalue"], res
    assert not marker.exists()


@pytest.mark.slow
def test_kernel_spools_while_the_hub_sink_is_down_then_delivers(lora_kernel):
    port = _free_port()
    k = lora_kernel(netns=False, env={  # loopback only: the sink lives in this process
        "LORA_AUDIT_URL": f"http://127.0.0.1:{port}/hub/api/audit/events",
        "JUPYTERHUB_API_TOKEN": "secret-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:1/"})
    for i in range(3):
        assert k.run(f"v{i} = {i}")["status"] == "ok"
    server = SinkServer(port)
    try:
        k.run("import socket; socket.gethostbyname('exfil.example.net')")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            types = [e["type"] for e in server.events]
            if types.count("execute") >= 4:
                break
            time.sleep(0.1)
        seqs = [e["seq"] for e in server.events]
        assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, order kept
        assert [e["code"] for e in server.events if e["type"] == "execute"][:3] == \
            ["v0 = 0", "v1 = 1", "v2 = 2"]
        assert any(e["type"] == "refusal" for e in server.events)
        assert set(server.headers) == {"token secret-token"}
        assert {b["kernel_id"] for b in server.batches} == {k.km.kernel_id}
    finally:
        server.close()
