"""The audit service (hub/services/audit.py) over HTTP, without a hub.

The app runs in a thread on a loopback port. Authentication is simulated: the test patches
``ServiceHandler.get_current_user`` to read the hub user model (name, groups, scopes) from an
``X-Test-User`` header; a request that also sends ``Authorization`` counts as token-authenticated
(API clients, the kernel's sink), one without it as a browser session (xsrf applies).
Real-hub tests are elsewhere.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import stat
import struct
import threading
import zlib

import nbformat
import pytest
import requests
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from hub.services import base
from hub.services.audit import loss_svg, make_audit_app
from hub.settings import AUDIT_READ, REVIEW_WRITE
from lora_kernel.provenance import audit
from lora_kernel.provenance.ledger import LedgerReader

PREFIX = "/services/lora-audit/"
AUDITOR = {"name": "zz-audrey", "groups": [], "scopes": [AUDIT_READ]}
REVIEWER = {"name": "zz-rita", "groups": ["lora-reviewers"], "scopes": [AUDIT_READ, REVIEW_WRITE]}
RESEARCHER = {"name": "zz-alice", "groups": [], "scopes": []}
# holds the scope, but is not in the reviewers group of policies/review.yaml
NOT_IN_GROUP = {"name": "zz-nora", "groups": [], "scopes": [AUDIT_READ, REVIEW_WRITE]}


def _fake_current_user(self):
    raw = self.request.headers.get("X-Test-User")
    if not raw:
        return None
    model = {"kind": "user", "groups": [], "scopes": [], **json.loads(raw)}
    if self.request.headers.get("Authorization"):
        self._token_authenticated = True
    return model


class Client:
    def __init__(self, url: str):
        self.url = url

    def __call__(self, method, path, user=None, token=True, session=None, **kw):
        headers = kw.pop("headers", {})
        if user is not None:
            headers["X-Test-User"] = json.dumps(user)
            if token:
                headers["Authorization"] = "token test-token"
        return (session or requests).request(method, self.url + path.lstrip("/"),
                                             headers=headers, allow_redirects=False,
                                             timeout=60, **kw)


@pytest.fixture
def service(state_tmp, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "test-service-token")
    monkeypatch.setattr(base.ServiceHandler, "get_current_user", _fake_current_user)
    config = base.ServiceConfig(name="lora-audit", state=state_tmp, demo=True)
    sock, port = bind_unused_port()
    started = threading.Event()
    holder = {}

    def serve():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            app = make_audit_app(config)
            server = HTTPServer(app)
            server.add_sockets([sock])
        except BaseException as exc:
            holder["error"] = exc
            started.set()
            raise
        holder.update(loop=loop, server=server, app=app)
        started.set()
        loop.run_forever()
        server.stop()
        store = app.settings.get("lora_events")
        if store is not None:
            store.close()  # sqlite: in the thread that opened it
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    if "error" in holder:
        raise holder["error"]
    yield Client(f"http://127.0.0.1:{port}{PREFIX}")
    holder["loop"].call_soon_threadsafe(holder["loop"].stop)
    thread.join(10)


def _png(width=2, height=2) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def seal_run(state, run_id, user, extras):
    """A sealed run record (and ledger entry) with extra files (``{rel: bytes}``)."""
    from lora_kernel.trusted.ledger import Ledger
    from lora_kernel.trusted.sealing import (
        build_manifest,
        make_staging_dir,
        seal_record,
        write_manifest,
    )
    staging = make_staging_dir(state / "runs", run_id)
    (staging / "adapter").mkdir()
    (staging / "adapter" / "lora.safetensors").write_bytes(b"adapter-bytes")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("lr = 1e-4", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(staging / "executed.ipynb"))
    for rel, data in extras.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    manifest = build_manifest(
        staging, run_id=run_id, user=user, host="testhost", started=t0,
        ended=t0 + dt.timedelta(minutes=1), status="succeeded", config={"lora_rank": 4},
        base_model_sha256="cd" * 32, dataset_version="ds-x", dataset_digests={},
        notebook_source_sha256="ab" * 32, seed=1, egress_refusals=0)
    write_manifest(staging, manifest)
    record = seal_record(staging, state / "runs", run_id)
    with Ledger(state=state) as led:
        led.append_run(record)
    return record


def ledger_entries(state, kind):
    with LedgerReader(state=state) as led:
        return led.entries(kind)


# -- reading: scopes ------------------------------------------------------------------------
def test_runs_list_needs_audit_scope(service, make_run):
    make_run("r1", user="zz-alice")
    assert service("GET", "api/runs", RESEARCHER).status_code == 403
    assert service("GET", "runs", RESEARCHER, token=False).status_code == 403
    resp = service("GET", "api/runs", AUDITOR)
    assert resp.status_code == 200
    runs = resp.json()["runs"]
    assert [r["run_id"] for r in runs] == ["r1"] and runs[0]["verified"] is True
    assert service("GET", "api/runs", REVIEWER).status_code == 200


def test_runs_unauthenticated_api_is_401(service):
    assert service("GET", "api/runs").status_code == 401


def test_runs_filters(service, make_run):
    make_run("r1", user="zz-alice")
    make_run("r2", user="zz-bob", status="failed")
    ids = lambda **q: [r["run_id"] for r in service("GET", "api/runs", AUDITOR,  # noqa: E731
                                                   params=q).json()["runs"]]
    assert ids() == ["r1", "r2"]
    assert ids(user="zz-bob") == ["r2"] and ids(status="succeeded") == ["r1"]
    assert ids(q="BOB") == ["r2"] and ids(since="2999-01-01") == []
    assert service("GET", "api/runs", AUDITOR, params={"since": "yesterday"}).status_code == 400


def test_runs_page_html_escaped_with_csp(service, make_run):
    make_run("r1", user="zz-<b>x</b>")
    resp = service("GET", "runs", AUDITOR, token=False, params={"q": "<script>"})
    assert resp.status_code == 200 and "text/html" in resp.headers["Content-Type"]
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert "<script" not in resp.text.lower() and "&lt;script&gt;" in resp.text
    resp = service("GET", "runs", AUDITOR, token=False)
    assert "zz-&lt;b&gt;x&lt;/b&gt;" in resp.text and "<b>x</b>" not in resp.text


def test_empty_state_lists_nothing(service):
    assert service("GET", "api/runs", AUDITOR).json() == {"runs": [], "count": 0}
    assert service("GET", "api/runs/nope", AUDITOR).status_code == 404


# -- the run page ---------------------------------------------------------------------------
def test_run_page_renders_notebook_without_scripts(service, make_run):
    make_run("r1", user="zz-alice")
    resp = service("GET", "runs/r1", AUDITOR, token=False)
    assert resp.status_code == 200
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert "Executed notebook" in resp.text and "1e-4" in resp.text  # the parameters cell
    assert "print" in resp.text and "# done" not in resp.text and ">done<" in resp.text
    assert "Verified" in resp.text
    assert "<script" not in resp.text.lower()
    assert 'name="_xsrf"' not in resp.text  # no review form for an auditor
    api = service("GET", "api/runs/r1", AUDITOR).json()
    assert api["verified"] is True and api["problems"] == [] and api["user"] == "zz-alice"
    standalone = service("GET", "runs/r1/notebook", AUDITOR, token=False)
    assert standalone.status_code == 200 and "<script" not in standalone.text.lower()
    assert service("GET", "runs/r1", RESEARCHER, token=False).status_code == 403


def test_tampered_notebook_shown_unverified_and_still_script_free(service, make_run):
    record = make_run("r1", user="zz-alice")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("<script>alert(1)</script><img src=x "
                                              "onerror=alert(2)>"),
                nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
                    "display_data", data={"text/html": "<script>steal()</script><a "
                                          "href=\"https://evil.example/\">x</a>"})])]
    os.chmod(record, stat.S_IRWXU)
    path = record / "executed.ipynb"
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    nbformat.write(nb, str(path))
    resp = service("GET", "runs/r1", AUDITOR, token=False)
    assert resp.status_code == 200 and "Does NOT verify" in resp.text
    low = resp.text.lower()
    assert "<script" not in low and "onerror=" not in low and 'href="https://evil' not in low
    assert service("GET", "api/runs/r1", AUDITOR).json()["verified"] is False


def test_run_page_embeds_png_images_and_svg_loss(service, state_tmp):
    png = _png()
    seal_run(state_tmp, "img1", "zz-alice", {
        "samples/grid.png": png, "samples/fake.png": b"<svg onload=alert(1)>",
        "training_summary.json": json.dumps({"losses": [1.0, 0.5, float("nan"), 0.25]})
        .encode().replace(b"NaN", b"\"x\"")})
    seal_run(state_tmp, "img2", "zz-alice", {"loss_curve.png": png})
    page = service("GET", "runs/img1", AUDITOR, token=False).text
    assert "data:image/png;base64," + base64.b64encode(png).decode() in page
    assert "samples/fake.png" not in page and "onload" not in page  # not a PNG: left out
    assert "<svg" in page and "<polyline" in page
    page2 = service("GET", "runs/img2", AUDITOR, token=False).text
    assert 'alt="loss curve" src="data:image/png;base64,' in page2 and "<polyline" not in page2
    api = service("GET", "api/runs/img1", AUDITOR).json()
    assert api["images"] == ["samples/grid.png"] and api["losses"] == [1.0, 0.5, 0.25]


def test_loss_svg_small_inputs():
    assert loss_svg([]) == "" and loss_svg([1.0]) == ""
    svg = loss_svg([float(i % 7) for i in range(5000)])
    assert svg.startswith("<svg") and svg.count(",") <= 520


# -- review ---------------------------------------------------------------------------------
def test_reviewer_approves_anothers_run(service, make_run, state_tmp):
    make_run("r1", user="zz-alice")
    resp = service("POST", "api/runs/r1/review", REVIEWER,
                   json={"decision": "approve", "note": "looks fine",
                         "reviewer": "zz-someone-else", "actor": "zz-alice"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["decision"] == "approved" and resp.json()["reviewer"] == "zz-rita"
    [entry] = ledger_entries(state_tmp, "review")
    assert entry.subject == "r1" and entry.payload["reviewer"] == "zz-rita"
    assert entry.payload["identity"] == "hub-token (demo)" and entry.payload["note"] == \
        "looks fine"
    assert audit.verify(state=state_tmp) == []
    assert service("GET", "api/runs/r1", AUDITOR).json()["review"] == "approved"


def test_reviewer_may_not_approve_own_run(service, make_run, state_tmp):
    make_run("r1", user="zz-rita")
    resp = service("POST", "api/runs/r1/review", REVIEWER, json={"decision": "approve"})
    assert resp.status_code == 403 and "self-approval" in resp.json()["message"]
    assert ledger_entries(state_tmp, "review") == []
    # rejecting one's own run is allowed (it only withholds)
    assert service("POST", "api/runs/r1/review", REVIEWER,
                   json={"decision": "reject"}).status_code == 200


def test_researcher_cannot_review(service, make_run, state_tmp):
    make_run("r1", user="zz-bob")
    for who in (RESEARCHER, AUDITOR, NOT_IN_GROUP):
        resp = service("POST", "api/runs/r1/review", who, json={"decision": "approve"})
        assert resp.status_code == 403, who
    assert ledger_entries(state_tmp, "review") == []


def test_review_bad_requests(service, make_run):
    make_run("r1", user="zz-alice")
    assert service("POST", "api/runs/r1/review", REVIEWER,
                   json={"decision": "maybe"}).status_code == 400
    assert service("POST", "api/runs/r1/review", REVIEWER,
                   json={"decision": "approve", "note": 5}).status_code == 400
    assert service("POST", "api/runs/r1/review", REVIEWER, data=b"{nope").status_code == 400
    assert service("POST", "api/runs/missing/review", REVIEWER,
                   json={"decision": "approve"}).status_code == 404


def test_review_form_needs_xsrf_and_redirects(service, make_run, state_tmp):
    make_run("r1", user="zz-alice")
    browser = requests.Session()
    page = service("GET", "runs/r1", REVIEWER, token=False, session=browser)
    assert page.status_code == 200 and "Approve" in page.text
    token = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    # without the xsrf token a browser post is refused
    bad = service("POST", "runs/r1/review", REVIEWER, token=False, session=browser,
                  data={"decision": "approve"})
    assert bad.status_code == 403 and ledger_entries(state_tmp, "review") == []
    ok = service("POST", "runs/r1/review", REVIEWER, token=False, session=browser,
                 data={"decision": "approve", "note": "ok", "_xsrf": token})
    assert ok.status_code == 302 and ok.headers["Location"].endswith(PREFIX + "runs/r1")
    assert ledger_entries(state_tmp, "review")[0].payload["reviewer"] == "zz-rita"


def test_after_a_review_the_page_confirms_it_with_the_note(service, make_run, state_tmp):
    make_run("r1", user="zz-alice")
    before = service("GET", "runs/r1", REVIEWER)
    assert "You approved" not in before.text
    assert service("POST", "api/runs/r1/review", REVIEWER,
                   json={"decision": "approve", "note": "crisp <b>stripes</b>"}).status_code == 200
    seq = ledger_entries(state_tmp, "review")[0].seq
    page = service("GET", "runs/r1", REVIEWER).text
    assert f"You approved this run; the decision is ledger entry seq {seq}" in page
    assert "crisp &lt;b&gt;stripes&lt;/b&gt;" in page and "<b>stripes" not in page
    other = service("GET", "runs/r1", AUDITOR).text  # the auditor sees the note, no "You"
    assert "You approved" not in other and "crisp &lt;b&gt;stripes" in other


def test_ones_own_run_offers_no_approve_form(service, make_run):
    make_run("r1", user="zz-rita")
    make_run("r2", user="zz-alice")
    own = service("GET", "runs/r1", REVIEWER).text
    assert "your own run" in own and "value=approve" not in own
    assert "value=approve" in service("GET", "runs/r2", REVIEWER).text  # another's: offered


def test_error_pages_are_styled_with_a_way_back_and_the_api_stays_json(service, make_run):
    page = service("GET", "runs/no-such-run", AUDITOR)
    assert page.status_code == 404 and page.headers["Content-Type"].startswith("text/html")
    assert "Back to this service" in page.text and 'href="/hub/home"' in page.text
    assert "<style>" in page.text and "no-such-run" in page.text
    denied = service("GET", "runs", RESEARCHER)
    assert denied.status_code == 403 and "Hub home" in denied.text
    api = service("GET", "api/runs/no-such-run", AUDITOR)
    assert api.status_code == 404 and api.json()["status"] == 404


def test_the_services_menu_entry_leads_each_role_somewhere_useful(service):
    auditor = service("GET", "", AUDITOR, token=False)
    assert auditor.status_code == 302 and auditor.headers["Location"].endswith(PREFIX + "runs")
    researcher = service("GET", "", RESEARCHER, token=False)
    assert researcher.status_code == 200 and "/services/lora-runs/runs" in researcher.text
    assert "My runs" in researcher.text


# -- lineage --------------------------------------------------------------------------------
def test_lineage(service, make_run, tmp_path):
    make_run("r1", user="zz-alice", dataset="ds-a")
    make_run("r2", user="zz-alice", dataset="ds-b")
    resp = service("GET", "api/lineage", AUDITOR, params={"q": "ds-b"})
    assert resp.status_code == 200 and [h["run_id"] for h in resp.json()["runs"]] == ["r2"]
    page = service("GET", "lineage", AUDITOR, token=False, params={"q": "ds-a"})
    assert page.status_code == 200 and "r1" in page.text and "r2" not in page.text
    assert service("GET", "api/lineage", RESEARCHER, params={"q": "ds-a"}).status_code == 403
    # a path on the hub's host is not hashed over the web
    probe = tmp_path / "secret.txt"
    probe.write_text("x")
    assert service("GET", "api/lineage", AUDITOR, params={"q": str(probe)}).status_code == 400


# -- kernel events --------------------------------------------------------------------------
def _batch(user="zz-alice", seqs=(1, 2, 3)):
    return {"kernel_id": "kern-1", "user": user, "events": [
        {"v": 1, "seq": s, "type": "execute", "time": "2025-01-01T00:00:00Z", "user": user,
         "kernel_id": "kern-1", "run_id": "r1", "code": f"x = {s}"} for s in seqs]}


def test_events_batch_stored_and_ledgered(service, state_tmp):
    resp = service("POST", "api/events", RESEARCHER, json=_batch())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["stored"], body["duplicates"], body["first_seq"], body["last_seq"]) == \
        (3, 0, 1, 3)
    [entry] = ledger_entries(state_tmp, "kernel_events")
    assert entry.seq == body["ledger_seq"] and entry.subject == "kern-1"
    assert entry.payload["count"] == 3 and entry.payload["user"] == "zz-alice"
    with LedgerReader(state=state_tmp) as led:
        assert led.verify() == []
    assert audit.verify(state=state_tmp) == []
    listed = service("GET", "api/events", AUDITOR, params={"kernel_id": "kern-1"}).json()
    assert [e["seq"] for e in listed["events"]] == [1, 2, 3]
    assert service("GET", "api/events", RESEARCHER).status_code == 403


def test_events_retry_counts_duplicates_without_second_entry(service, state_tmp):
    assert service("POST", "api/events", RESEARCHER, json=_batch()).status_code == 200
    again = service("POST", "api/events", RESEARCHER, json=_batch())
    assert again.status_code == 200
    assert (again.json()["stored"], again.json()["duplicates"], again.json()["ledger_seq"]) == \
        (0, 3, None)
    assert len(ledger_entries(state_tmp, "kernel_events")) == 1
    more = service("POST", "api/events", RESEARCHER, json=_batch(seqs=(3, 4)))
    assert (more.json()["stored"], more.json()["duplicates"]) == (1, 1)
    assert len(ledger_entries(state_tmp, "kernel_events")) == 2


def test_events_user_mismatch_refused(service, state_tmp):
    resp = service("POST", "api/events", RESEARCHER, json=_batch(user="zz-bob"))
    assert resp.status_code == 403
    assert service("POST", "api/events", {"name": "zz-bob"},
                   json=_batch(user="zz-bob")).status_code == 200
    assert [e.payload["user"] for e in ledger_entries(state_tmp, "kernel_events")] == ["zz-bob"]


def test_events_malformed_or_unauthenticated(service, state_tmp):
    assert service("POST", "api/events", RESEARCHER, data=b"not json").status_code == 400
    assert service("POST", "api/events", RESEARCHER, json=[1, 2]).status_code == 400
    bad = _batch()
    bad["events"][0]["seq"] = "one"
    resp = service("POST", "api/events", RESEARCHER, json=bad)
    assert resp.status_code == 400 and "seq" in resp.json()["message"]
    no_list = _batch()
    no_list["events"] = "x"
    assert service("POST", "api/events", RESEARCHER, json=no_list).status_code == 400
    assert service("POST", "api/events", json=_batch()).status_code in (401, 403)
    assert not (state_tmp / "ledger" / "ledger.sqlite").exists() or \
        ledger_entries(state_tmp, "kernel_events") == []


def test_page_styles_never_restyle_the_embedded_notebooks_code():
    """The embedded notebook's code is highlighted by Pygments, whose token classes are short
    (``nb``: a builtin such as ``print``, ``k``: a keyword...). The page's own class ``nb``
    drew every ``print`` and ``range`` as a bordered box over the code; none of the page's
    class selectors may be a Pygments token class."""
    from pygments.token import STANDARD_TYPES

    from hub.services import audit

    page_classes = set(re.findall(r"\.([A-Za-z][\w-]*)\s*\{", audit.STYLE + base.ERROR_STYLE))
    assert "record-notebook" in page_classes  # what wraps the notebook now
    assert not page_classes & set(STANDARD_TYPES.values()), page_classes & set(
        STANDARD_TYPES.values())
