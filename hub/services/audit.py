"""The hub's audit service ``lora-audit``: auditors' pages, verification, review, lineage, and
the sink of the kernels' execution logs.

Routes (relative to ``/services/lora-audit/``; HTML pages and their JSON twins under ``api/``):

=================================  ======  ===========================================
``runs``, ``api/runs``             GET     run list; filters ``status``, ``user``, ``since``,
                                           ``review``, ``q`` (text), ``verify=0`` (skip)
``runs/<id>``, ``api/runs/<id>``   GET     summary, verification, loss curve, samples,
                                           the executed notebook (read-only)
``runs/<id>/notebook``             GET     the executed notebook as a standalone page
``runs/<id>/review``               POST    form: ``decision`` approve|reject, ``note``
``api/runs/<id>/review``           POST    JSON ``{"decision", "note"}``
``lineage``, ``api/lineage``       GET     ``?q=`` sha256, dataset version, base model name
``api/events``                     POST    a kernel's batch of events (any user, own events)
``api/events``                     GET     stored events; ``user``, ``kernel_id``, ``run_id``,
                                           ``after``, ``limit``
=================================  ======  ===========================================

Reading needs the hub scope :data:`~hub.settings.AUDIT_READ` or
:data:`~hub.settings.REVIEW_WRITE`; reviewing needs ``REVIEW_WRITE``, and who reviews is the
hub token's user only (:meth:`ServiceHandler.actor`), never anything in the request body:
:mod:`lora_kernel.trusted.review` then refuses non-reviewers and self-approval. Posting events
needs only a valid token, and the batch must name the token's user (:mod:`hub.events`).

Every page is server-rendered: every value is escaped, the notebook is nbconvert's output
through :func:`lora_kernel.provenance.audit.sanitize_html`, images are inline ``data:`` PNGs,
the loss curve without a PNG is an inline SVG, and the CSP of :mod:`hub.services.base`
forbids scripts and anything external anyway.

Run: ``python -m hub.services.audit --state DIR [--demo]`` (the hub starts it as a service).

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from tornado import web
from tornado.ioloop import IOLoop

from lora_kernel.common.errors import ConfigError, LoraError, NoMatch
from lora_kernel.common.paths import check_run_id, ledger_path, runs_dir, state_dir
from lora_kernel.common.timeutil import parse_time
from lora_kernel.provenance import audit
from lora_kernel.trusted import review

from ..events import EventStore, check_batch
from ..settings import AUDIT_READ, AUDIT_SERVICE, REVIEW_WRITE, RUNS_SERVICE
from .base import ServiceConfig, ServiceHandler, listen, log, make_app, run_forever

RUN = r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 8 << 20
MAX_SUMMARY_BYTES = 16 << 20
MAX_EVENTS_BODY = 32 << 20
MAX_NOTE = 4000
DECISIONS = {"approve": review.approve, "reject": review.reject}
_T = TypeVar("_T")

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em}header a{color:#cfe0ff;margin-right:1em}
main{padding:1em 1.2em;max-width:1200px}table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #d6d9de;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef0f3}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
.ok{color:#0a6b2d;font-weight:600}.bad{color:#a4161a;font-weight:600}
.box{background:#fff;border:1px solid #d6d9de;padding:.8em;margin:.8em 0}
form.filters input{margin-right:.6em}img.art{max-width:100%;border:1px solid #d6d9de}
textarea{width:100%;max-width:40em}
.record-notebook{background:#fff;border:1px solid #d6d9de;padding:.5em}
"""


# -- helpers (no tornado) -------------------------------------------------------------------
def e(value: Any) -> str:
    """``value`` as escaped HTML text (None: an em dash)."""
    return "\u2014" if value is None else escape(str(value), quote=True)


def finite_losses(values: Any) -> list[float]:
    """The finite numbers of ``values`` (a list from a run's training summary), else []."""
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)]


def loss_svg(losses: list[float], width: int = 560, height: int = 220) -> str:
    """A small inline SVG line chart of ``losses`` (step on x); "" for fewer than 2 points."""
    if len(losses) < 2:
        return ""
    n = len(losses)
    stride = max(1, math.ceil(n / 500))
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    left, right, top, bottom = 56, 12, 12, 30
    w, h = width - left - right, height - top - bottom
    pts = " ".join(f"{left + i * w / (n - 1):.1f},{top + (hi - losses[i]) * h / span:.1f}"
                   for i in idx)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="loss curve">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#888"/>'
            f'<polyline fill="none" stroke="#2458c6" stroke-width="1.5" points="{pts}"/>'
            f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">'
            f'{hi:.4g}</text>'
            f'<text x="{left - 4}" y="{top + h}" font-size="11" text-anchor="end">{lo:.4g}</text>'
            f'<text x="{left}" y="{height - 8}" font-size="11">step 1</text>'
            f'<text x="{left + w}" y="{height - 8}" font-size="11" text-anchor="end">'
            f'step {n}</text></svg>')


def _inside(record: Path, rel: str) -> Path | None:
    """``record/rel`` if it is a regular file (no link) inside ``record``, else None."""
    path = record / rel
    try:
        if path.is_symlink() or not path.is_file():
            return None
        if not path.resolve().is_relative_to(record.resolve()):
            return None
    except OSError:
        return None
    return path


def record_images(record: Path, files: dict[str, str]) -> dict[str, str]:
    """``{rel: data URI}`` of the loss curve and sample PNGs the manifest lists (``files``)
    that really are PNGs of at most :data:`MAX_IMAGE_BYTES`."""
    out = {}
    wanted = sorted(r for r in files if r == "loss_curve.png"
                    or (r.startswith("samples/") and r.lower().endswith(".png")))
    for rel in wanted:
        path = _inside(record, rel)
        if path is None or path.stat().st_size > MAX_IMAGE_BYTES:
            continue
        data = path.read_bytes()
        if data.startswith(PNG_MAGIC):
            out[rel] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return out


def record_losses(record: Path) -> list[float]:
    """The per-step losses of ``training_summary.json`` in the record, if any."""
    path = _inside(record, "training_summary.json")
    if path is None or path.stat().st_size > MAX_SUMMARY_BYTES:
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    return finite_losses(data.get("losses")) if isinstance(data, dict) else []


_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S | re.I)
_STYLES = re.compile(r"<style[^>]*>.*?</style>", re.S | re.I)


def notebook_fragment(page: str) -> str:
    """The styles and body of a rendered (already sanitized) notebook page, to embed."""
    body = _BODY.search(page)
    return "".join(_STYLES.findall(page)) + (body.group(1) if body else page)


class _RenderCache:
    """Rendered notebooks by (path, size, mtime): records are sealed, rendering is slow."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.items = size, OrderedDict[tuple[str, int, int], str]()

    def get(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        html = audit.render_notebook_html(path)
        self.items[key] = html
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return html


def _has_ledger(state: Path) -> bool:
    return ledger_path(state).is_file()


def run_list(state: Path, args: dict[str, str]) -> list[dict[str, Any]]:
    """:func:`lora_kernel.provenance.audit.list_runs` with the page's filters; ``q`` matches
    (case-insensitively) run id, user, status, dataset version or adapter digest."""
    since = None
    if args.get("since"):
        try:
            since = parse_time(args["since"])
        except (ValueError, TypeError):
            raise ConfigError(f"not a time: {args['since']!r}; fix: an ISO date such as "
                              "2025-01-31 or 2025-01-31T12:00Z", key="since") from None
    if not _has_ledger(state):
        return []
    runs = audit.list_runs(state=state, user=args.get("user") or None,
                           status=args.get("status") or None, since=since,
                           review=args.get("review") or None,
                           verify=args.get("verify", "1") not in ("0", "false", "no"))
    q = (args.get("q") or "").strip().casefold()
    if q:
        runs = [r for r in runs if any(q in str(r.get(k) or "").casefold() for k in
                                       ("run_id", "user", "status", "dataset_version",
                                        "adapter_digest"))]
    return runs


def run_view(state: Path, run_id: str) -> dict[str, Any]:
    """What a run page shows: :func:`audit.show`, ``verified``, ``losses``, ``images``
    (``{rel: data URI}``) and whether the executed notebook is there."""
    check_run_id(run_id)
    record = runs_dir(state) / run_id
    if not _has_ledger(state) and not record.is_dir():
        raise NoMatch(f"no such run {run_id!r}")
    try:
        info = audit.show(run_id, state=state)
    except ConfigError as exc:
        if str(exc.detail).startswith("no such run") or not _has_ledger(state):
            raise NoMatch(f"no such run {run_id!r}") from None
        raise
    info["verified"] = not info["problems"]
    info["losses"] = record_losses(record) if record.is_dir() else []
    info["images"] = record_images(record, info.get("files") or {}) if record.is_dir() else {}
    info["notebook"] = (record / "executed.ipynb").is_file()
    return info


def lineage_of(state: Path, q: str) -> list[dict[str, Any]]:
    """:func:`audit.lineage` for a web query: a sha256, a dataset version or a base model
    name. A query naming a file or folder on the hub's host is refused: the service would
    hash whatever it can read there (a probe, and slow)."""
    q = q.strip()
    if not q:
        raise ConfigError("empty query; fix: ?q=<sha256, dataset version or base model>",
                          key="q")
    if len(q) > 4096 or os.path.lexists(q):
        raise ConfigError("paths are not looked up over the web; fix: query the file's sha256 "
                          "(sha256sum FILE), the dataset version or the base model's name, or "
                          "use `lora audit lineage PATH` on the machine", key="q")
    if not _has_ledger(state):
        return []
    return audit.lineage(q, state=state)


# -- handlers -------------------------------------------------------------------------------
class AuditHandler(ServiceHandler):
    """Common to the audit service's handlers: scopes, errors, page layout, URLs."""

    @property
    def state(self) -> Path:
        return Path(self.lora.state)

    def need_any(self, *scopes: str) -> None:
        """401 without a user; 403 unless the token has one of ``scopes``."""
        if not self.current_user:
            raise web.HTTPError(401, "not authenticated: send a hub token")
        if not set(scopes) & self.scopes():
            raise web.HTTPError(403, "this needs the hub scope " + " or ".join(scopes)
                                + "; ask an admin for the role that grants it")

    def need_read(self) -> None:
        self.need_any(AUDIT_READ, REVIEW_WRITE)

    def is_reviewer(self) -> bool:
        return REVIEW_WRITE in self.scopes()

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking library call off the IOLoop; platform errors become HTTP errors."""
        try:
            return await IOLoop.current().run_in_executor(None, lambda: fn(*args, **kwargs))
        except LoraError as exc:
            self.fail(exc)
            raise  # not reached: fail() raises

    def url(self, *parts: str, **query: str) -> str:
        path = self.settings["service_prefix"].rstrip("/") + "/" + "/".join(
            quote(p, safe="") for p in parts)
        query = {k: v for k, v in query.items() if v}
        return path + ("?" + urlencode(query) if query else "")

    def page(self, title: str, body: str) -> None:
        name = (self.current_user or {}).get("name")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)} — "
            f"LoRA Enclave audit</title><style>{STYLE}</style></head><body><header>"
            f"<a href=\"{e(self.url('runs'))}\">Runs</a>"
            f"<a href=\"{e(self.url('lineage'))}\">Lineage</a>"
            f"<span>signed in as {e(name)}</span></header><main><h1>{e(title)}</h1>"
            f"{body}</main></body></html>")

    def arg(self, name: str) -> str:
        return self.get_argument(name, "") or ""


class RootHandler(AuditHandler):
    """The service's root (the hub's Services menu): the runs list for auditors and
    reviewers; for anyone else a page that says so and leads to their own runs."""

    @web.authenticated
    def get(self) -> None:
        if {AUDIT_READ, REVIEW_WRITE} & self.scopes():
            self.redirect(self.url("runs"))
            return
        self.page("Audit", "<div class=box><p>The audit service is for auditors and reviewers "
                           "(their hub roles grant it). Your own runs, with their status, "
                           f"samples and loss, are in <a href=\"/services/{e(RUNS_SERVICE)}"
                           "/runs\">My runs</a>.</p></div>")


def _verified_cell(run: dict[str, Any]) -> str:
    if "verified" not in run:
        return "<td>not checked</td>"
    if run["verified"]:
        return "<td class=ok>verified</td>"
    return f"<td class=bad title=\"{e('; '.join(run.get('problems') or []))}\">" \
           f"{len(run.get('problems') or [])} problem(s)</td>"


class RunsAPI(AuditHandler):
    async def get(self) -> None:
        self.need_read()
        args = {k: self.arg(k) for k in ("status", "user", "since", "review", "q", "verify")}
        runs = await self.call(run_list, self.state, args)
        self.write_json({"runs": runs, "count": len(runs)})


class RunsPage(AuditHandler):
    @web.authenticated
    async def get(self) -> None:
        self.need_read()
        args = {k: self.arg(k) for k in ("status", "user", "since", "review", "q", "verify")}
        runs = await self.call(run_list, self.state, args)
        fields = "".join(
            f"<label>{label} <input name={k} value=\"{e(args[k])}\" size=12></label>"
            for k, label in (("q", "text"), ("user", "user"), ("status", "status"),
                             ("review", "review"), ("since", "since")))
        rows = "".join(
            f"<tr><td><a href=\"{e(self.url('runs', r['run_id']))}\" class=mono>"
            f"{e(r['run_id'])}</a></td><td>{e(r.get('user'))}</td><td>{e(r.get('status'))}"
            f"</td><td>{e(r.get('started'))}</td><td>{e(r.get('review'))}</td>"
            f"<td>{e(r.get('dataset_version'))}</td>{_verified_cell(r)}</tr>" for r in runs)
        table = ("<table><tr><th>run</th><th>user</th><th>status</th><th>started</th>"
                 f"<th>review</th><th>dataset</th><th>verification</th></tr>{rows}</table>"
                 if runs else "<p>No run matches.</p>")
        self.page("Runs", f"<form class=filters method=get action=\"{e(self.url('runs'))}\">"
                          f"{fields}<button>Filter</button></form><p>{len(runs)} run(s)</p>"
                          f"{table}")


class RunAPI(AuditHandler):
    async def get(self, run_id: str) -> None:
        self.need_read()
        info = await self.call(run_view, self.state, run_id)
        info["images"] = sorted(info["images"])  # names; the page embeds them
        self.write_json(info)


_SUMMARY_KEYS = ("user", "uid", "status", "started", "ended", "review", "reviewer",
                 "review_note", "review_seq", "adapter_digest", "dataset_version", "base_model",
                 "base_model_sha256", "seed",
                 "host", "identity", "run_as", "kind", "error", "egress_refusals",
                 "notebook_source_sha256", "present", "pruned", "published")


class RunPage(AuditHandler):
    @web.authenticated
    async def get(self, run_id: str) -> None:
        self.need_read()
        info = await self.call(run_view, self.state, run_id)
        parts = []
        if info["verified"]:
            parts.append("<p class=ok>Verified: files match the manifest, the manifest "
                         "matches the ledger.</p>")
        else:
            items = "".join(f"<li>{e(p)}</li>" for p in info["problems"])
            parts.append(f"<p class=bad>Does NOT verify: {len(info['problems'])} "
                         f"problem(s)</p><ul>{items}</ul>")
        rows = "".join(f"<tr><th>{e(k)}</th><td class=mono>{e(info.get(k))}</td></tr>"
                       for k in _SUMMARY_KEYS if k in info)
        parts.append(f"<h2>Summary</h2><table>{rows}</table>")
        essentials = info.get("config_essentials") or {}
        if essentials:
            rows = "".join(f"<tr><th>{e(k)}</th><td class=mono>{e(v)}</td></tr>"
                           for k, v in essentials.items())
            parts.append(f"<h2>Config</h2><table>{rows}</table>")
        parts.append(self._loss(info))
        samples = {k: v for k, v in info["images"].items() if k.startswith("samples/")}
        if samples:
            parts.append("<h2>Samples</h2>" + "".join(
                f"<figure><img class=art alt=\"{e(k)}\" src=\"{e(v)}\"><figcaption>{e(k)}"
                "</figcaption></figure>" for k, v in samples.items()))
        parts.insert(0, self._confirmation(info))
        if self.is_reviewer():
            parts.append(self._review_form(run_id, info))
        entries = "".join(f"<tr><td>{e(x['seq'])}</td><td>{e(x['time'])}</td>"
                          f"<td>{e(x['kind'])}</td></tr>" for x in info.get("ledger") or [])
        if entries:
            parts.append("<h2>Ledger</h2><table><tr><th>seq</th><th>time</th><th>kind</th>"
                         f"</tr>{entries}</table>")
        parts.append(await self._notebook(run_id, info))
        self.page(f"Run {run_id}", "".join(parts))

    def _loss(self, info: dict[str, Any]) -> str:
        png = info["images"].get("loss_curve.png")
        if png:
            return f"<h2>Loss</h2><img class=art alt=\"loss curve\" src=\"{e(png)}\">"
        svg = loss_svg(info["losses"])
        return f"<h2>Loss</h2><div class=box>{svg}</div>" if svg else ""

    def _confirmation(self, info: dict[str, Any]) -> str:
        """The signed-in reviewer's own decision on this run, when theirs is the one in force
        (what they see right after the review form sends them back here)."""
        me = (self.current_user or {}).get("name")
        if not me or info.get("reviewer") != me or info.get("review") not in ("approved",
                                                                            "rejected"):
            return ""
        note = f" Your note: “{e(info.get('review_note'))}”." if info.get("review_note") else ""
        return (f"<div class=box><p class=ok>You {e(info['review'])} this run; the decision is "
                f"ledger entry seq {e(info.get('review_seq'))}, bound to the adapter's digest."
                f"{note}</p></div>")

    def _review_form(self, run_id: str, info: dict[str, Any]) -> str:
        state = (f"<p>Current review state: <b>{e(info.get('review'))}</b> (by "
                 f"{e(info.get('reviewer'))})</p>")
        if info.get("review_note"):
            state += f"<p>Reviewer's note: <q>{e(info.get('review_note'))}</q></p>"
        me = (self.current_user or {}).get("name")
        if me and me == info.get("user"):  # policies/review.yaml: nobody approves their own
            return (f"<h2>Review</h2><div class=box>{state}<p>This is your own run: another "
                    f"reviewer decides on it (no self-approval).</p></div>")
        return (f"<h2>Review</h2><div class=box>{state}"
                f"<form method=post action=\"{e(self.url('runs', run_id, 'review'))}\">"
                f"{self.xsrf_form_html()}<label>Note<br><textarea name=note rows=3 "
                f"maxlength={MAX_NOTE}></textarea></label><br>"
                "<button name=decision value=approve>Approve</button> "
                "<button name=decision value=reject>Reject</button></form></div>")

    async def _notebook(self, run_id: str, info: dict[str, Any]) -> str:
        if not info["notebook"]:
            return "<h2>Executed notebook</h2><p>No executed notebook in the record.</p>"
        cache: _RenderCache = self.settings["lora_render_cache"]
        path = audit.notebook_path(run_id, self.state)
        try:
            html = await IOLoop.current().run_in_executor(None, cache.get, path)
        except Exception as exc:  # a corrupt notebook must not hide the rest of the page
            log.warning("cannot render %s: %s", path, exc)
            return (f"<h2>Executed notebook</h2><p class=bad>Cannot render the notebook: "
                    f"{e(exc)}</p>")
        link = self.url("runs", run_id, "notebook")
        return (f"<h2>Executed notebook</h2><p><a href=\"{e(link)}\">open on its own page</a>"
                f"</p><div class=record-notebook>{notebook_fragment(html)}</div>")


class NotebookPage(AuditHandler):
    @web.authenticated
    async def get(self, run_id: str) -> None:
        self.need_read()
        check = await self.call(run_view, self.state, run_id)
        if not check["notebook"]:
            raise web.HTTPError(404, "no executed notebook in the record of %s", run_id)
        cache: _RenderCache = self.settings["lora_render_cache"]
        html = await IOLoop.current().run_in_executor(
            None, cache.get, audit.notebook_path(run_id, self.state))
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(html)


class _Review(AuditHandler):
    async def review(self, run_id: str, decision: Any, note: Any) -> dict[str, Any]:
        """Approve or reject as the token's user; the ledger entry's essentials."""
        self.need_any(REVIEW_WRITE)
        if decision not in DECISIONS:
            raise web.HTTPError(400, "decision must be \"approve\" or \"reject\"")
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            raise web.HTTPError(400, f"note must be text of at most {MAX_NOTE} characters")
        actor = self.actor()  # the hub token's user: never the body
        entry = await self.call(_review_run, DECISIONS[decision], run_id, note, actor,
                                self.state)
        log.info("review: %s %s run %s (ledger seq %d)", actor.name, entry.payload["decision"],
                 run_id, entry.seq)
        return {"run_id": run_id, "decision": entry.payload["decision"],
                "reviewer": entry.payload["reviewer"], "ledger_seq": entry.seq,
                "adapter_digest": entry.payload.get("adapter_digest")}


def _review_run(fn: Callable[..., Any], run_id: str, note: str, actor: Any, state: Path) -> Any:
    check_run_id(run_id)
    try:
        return fn(run_id, note, actor=actor, state=state)
    except ConfigError as exc:
        if str(exc.detail).startswith("no such run"):
            raise NoMatch(str(exc)) from None
        raise


class ReviewAPI(_Review):
    async def post(self, run_id: str) -> None:
        body = self.json_body()
        self.write_json(await self.review(run_id, body.get("decision"), body.get("note", "")))


class ReviewForm(_Review):
    async def post(self, run_id: str) -> None:
        await self.review(run_id, self.get_body_argument("decision", ""),
                          self.get_body_argument("note", ""))
        self.redirect(self.url("runs", run_id))  # the page confirms the decision


class LineageAPI(AuditHandler):
    async def get(self) -> None:
        self.need_read()
        q = self.arg("q")
        hits = await self.call(lineage_of, self.state, q)
        self.write_json({"query": q, "runs": hits, "count": len(hits)})


class LineagePage(AuditHandler):
    @web.authenticated
    async def get(self) -> None:
        self.need_read()
        q = self.arg("q").strip()
        form = (f"<form class=filters method=get action=\"{e(self.url('lineage'))}\"><label>"
                f"sha256, dataset version or base model <input name=q size=70 value=\"{e(q)}\">"
                "</label><button>Trace</button></form>")
        if not q:
            self.page("Lineage", form)
            return
        hits = await self.call(lineage_of, self.state, q)
        rows = "".join(
            f"<tr><td><a class=mono href=\"{e(self.url('runs', h['run_id']))}\">"
            f"{e(h['run_id'])}</a></td><td>{e(h.get('user'))}</td><td>{e(h.get('status'))}"
            f"</td><td>{e(', '.join(h.get('matched') or []))}</td></tr>" for h in hits)
        table = ("<table><tr><th>run</th><th>user</th><th>status</th><th>matched</th></tr>"
                 f"{rows}</table>" if hits else f"<p>No run used {e(q)}.</p>")
        self.page("Lineage", form + table)


class EventsAPI(AuditHandler):
    """``POST``: a kernel's batch (its user's own token); ``GET``: auditors list events."""

    def store(self) -> EventStore:
        store: EventStore | None = self.settings.get("lora_events")
        if store is None:
            store = self.settings["lora_events"] = EventStore(self.state)
        return store

    def post(self) -> None:
        model = self.current_user
        if not model:
            raise web.HTTPError(401, "not authenticated: send the kernel's hub token")
        if model.get("kind", "user") != "user":
            raise web.HTTPError(403, "only users' kernels post events")
        if len(self.request.body or b"") > MAX_EVENTS_BODY:
            raise web.HTTPError(413, f"batch larger than {MAX_EVENTS_BODY} bytes")
        body = self.json_body()
        user = str(model["name"])
        try:
            kernel_id, events = check_batch(body, user)
        except LoraError as exc:
            log.warning("events from %s refused: %s", user, exc)
            self.fail(exc)
            raise  # not reached: fail() raises
        result = self.store().add_batch(user, kernel_id, events)
        if result.conflicts:
            log.warning("events: %d event(s) of %s kernel %s resent with different content; "
                        "the first stored copy is kept", result.conflicts, user, kernel_id)
        log.debug("events: %s kernel %s stored %d, duplicates %d, ledger seq %s", user,
                  kernel_id, result.stored, result.duplicates, result.ledger_seq)
        self.write_json(result.to_dict())

    def get(self) -> None:
        self.need_read()
        try:
            limit = min(max(int(self.arg("limit") or 1000), 1), 10000)
            after = max(int(self.arg("after") or 0), 0)
        except ValueError:
            raise web.HTTPError(400, "limit and after must be whole numbers") from None
        events = self.store().list_events(user=self.arg("user") or None,
                                          kernel_id=self.arg("kernel_id") or None,
                                          run_id=self.arg("run_id") or None,
                                          after_id=after, limit=limit)
        self.write_json({"events": events, "count": len(events),
                         "next_after": events[-1]["id"] if len(events) == limit else None})


HANDLERS: list[tuple[str, type]] = [
    ("", RootHandler),
    ("runs", RunsPage),
    (f"runs/{RUN}", RunPage),
    (f"runs/{RUN}/notebook", NotebookPage),
    (f"runs/{RUN}/review", ReviewForm),
    ("lineage", LineagePage),
    ("api/runs", RunsAPI),
    (f"api/runs/{RUN}", RunAPI),
    (f"api/runs/{RUN}/review", ReviewAPI),
    ("api/lineage", LineageAPI),
    ("api/events", EventsAPI),
]


def make_audit_app(config: ServiceConfig, handlers: list[tuple[str, type]] | None = None
                   ) -> web.Application:
    """The audit service's tornado app (``handlers``: :data:`HANDLERS` or test subclasses of
    them, same paths)."""
    app = make_app(config, handlers or HANDLERS)
    app.settings["lora_render_cache"] = _RenderCache()
    app.settings["lora_events"] = None  # opened on first use (<state>/hub/events.sqlite)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hub.services.audit",
                                     description="The hub's audit service (lora-audit).")
    parser.add_argument("--state", default=None,
                        help="the trusted state directory (runs/, ledger/; default: "
                             "$LORA_STATE or the platform default)")
    parser.add_argument("--demo", action="store_true",
                        help="allow hub-only users (demo hub without root)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServiceConfig(name=AUDIT_SERVICE, state=state_dir(args.state).resolve(),
                           demo=args.demo)
    app = make_audit_app(config)
    listen(app)
    log.info("lora-audit: state %s%s", config.state, " (demo users allowed)" if config.demo
             else "")
    run_forever()


if __name__ == "__main__":
    main()
