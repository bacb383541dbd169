"""The auditor's side: verify records, ledger and publications; list, show, trace lineage, prune.

Every function takes ``home`` (default :func:`lora_kernel.home.lora_home`) and an optional open
:class:`~lora_kernel.ledger.Ledger`. Encrypted export/import lives in
:mod:`lora_kernel.archive`.
"""
from __future__ import annotations

import datetime as dt
import html
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

from lora_kernel.data import sha256_file
from lora_kernel.errors import ConfigError, PolicyRefusal, VerificationError
from lora_kernel.home import lora_home
from lora_kernel.ledger import Ledger
from lora_kernel.policy import load_policy
from lora_kernel.records import (NOTEBOOK, Problem, check_run_id, load_manifest,
                                 manifest_sha256, parse_time, summary, verify_record)
from lora_kernel.review import (current_user, open_ledger, publications, review_state,
                                verify_publications)

RETENTION_DEFAULTS = {"keep_days": 180, "keep_approved": True}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def runs_dir(home=None) -> Path:
    """``<home>/runs``."""
    return lora_home(home) / "runs"


def run_ids(ledger: Ledger, home=None) -> list[str]:
    """Every run id known from record folders (hidden ones skipped) or ledger entries."""
    ids = {e.subject for e in ledger.entries("run")}
    for imp in ledger.entries("import"):
        ids.update(imp.payload.get("runs", {}))
    base = runs_dir(home)
    if base.is_dir():
        ids.update(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(ids)


# -- verify ---------------------------------------------------------------------------------
def verify_run(run_id: str, ledger: Ledger, home=None) -> list[Problem]:
    """Problems of one run: files vs manifest, manifest vs ledger, presence vs prune entries."""
    record = runs_dir(home) / check_run_id(run_id)
    expected = ledger.expected_manifest_sha256(run_id)
    pruned = ledger.latest("prune", run_id)
    if not record.exists():
        if pruned is not None:
            return []
        if expected is not None:
            return [Problem("missing", str(record), f"record attested by ledger seq "
                                                    f"{expected[1]} is gone (no prune entry)")]
        raise ConfigError(f"no such run {run_id!r} in {record.parent} or the ledger; fix: pick "
                          f"a run id from `lora audit list`", key="RUN")
    if expected is None:
        return [Problem("ledger", str(record), "record has no ledger entry (not attested)")] \
            + verify_record(record)
    return verify_record(record, expected_manifest_sha256=expected[0])


def verify(run_id: str | None = None, *, home=None, ledger: Ledger | None = None
           ) -> list[Problem]:
    """Verify the ledger (chain, signatures, head) and one run, or every run when ``run_id``
    is None, plus published copies. Returns all problems (empty: everything verifies)."""
    with open_ledger(ledger, home) as led:
        problems = led.verify()
        ids = [run_id] if run_id else run_ids(led, home)
        for rid in ids:
            problems += verify_run(rid, led, home)
        problems += verify_publications(led, run_id)
    return problems


def verify_or_raise(run_id: str | None = None, *, home=None, ledger: Ledger | None = None
                    ) -> None:
    """:func:`verify`, raising :class:`VerificationError` listing the problems if any."""
    problems = verify(run_id, home=home, ledger=ledger)
    if problems:
        raise VerificationError(f"{len(problems)} problem(s):\n"
                                + "\n".join(f"  {p}" for p in problems))


# -- list / show ----------------------------------------------------------------------------
def run_info(run_id: str, ledger: Ledger, home=None, now: dt.datetime | None = None) -> dict:
    """One run's summary for listings: from its manifest if present, else from the ledger."""
    record = runs_dir(home) / run_id
    entry = ledger.run_entry(run_id)
    if (record / "manifest.json").exists():
        s = summary(load_manifest(record))
    else:
        p = entry.payload if entry else {}
        s = {"run_id": run_id, "user": p.get("user"), "status": p.get("status"),
             "started": p.get("started"), "ended": p.get("ended"),
             "adapter_digest": p.get("adapter_digest"), "dataset_version":
                 p.get("dataset_version"), "base_model_sha256": p.get("base_model_sha256")}
    state, review = review_state(ledger, run_id, s.get("adapter_digest"))
    pubs = [p for p in publications(ledger, now) if p.get("run_id") == run_id]
    return {"run_id": run_id, "user": s.get("user"), "status": s.get("status"),
            "started": s.get("started"), "ended": s.get("ended"), "review": state,
            "reviewer": review.payload.get("reviewer") if review else None,
            "adapter_digest": s.get("adapter_digest"),
            "dataset_version": s.get("dataset_version"), "present": record.is_dir(),
            "pruned": ledger.latest("prune", run_id) is not None,
            "published": [p["path"] for p in pubs],
            "expired": any(p["expired"] for p in pubs)}


def list_runs(*, home=None, ledger: Ledger | None = None, user: str | None = None,
              since: dt.datetime | None = None, until: dt.datetime | None = None,
              status: str | None = None, review: str | None = None, expired: bool = False,
              now: dt.datetime | None = None) -> list[dict]:
    """Runs matching every filter given: trainer, start time in ``[since, until)``, status,
    review state (pending/approved/rejected/void), with an expired publication."""
    out = []
    with open_ledger(ledger, home) as led:
        for rid in run_ids(led, home):
            info = run_info(rid, led, home, now)
            started = parse_time(info["started"]) if info["started"] else None
            if user and info["user"] != user or status and info["status"] != status:
                continue
            if review and info["review"] != review or expired and not info["expired"]:
                continue
            if since and (started is None or started < since):
                continue
            if until and (started is None or started >= until):
                continue
            out.append(info)
    return out


class _Sanitizer(HTMLParser):
    """Re-serialises HTML keeping only what a standalone, offline page needs.

    Drops script/iframe/object/embed/base/form/link elements (with content), event-handler
    attributes, and any src/href/action that points off the page (http:, https:, //,
    javascript:, file:); remote ``url(...)`` and ``@import`` in styles are removed.
    """

    DROP = {"script", "iframe", "object", "embed", "base", "form", "link", "frame", "frameset",
            "applet", "meta"}
    URL_ATTRS = {"src", "href", "action", "srcset", "xlink:href", "poster", "data", "formaction",
                 "background"}
    _REMOTE_CSS = re.compile(r"@import[^;]*;|url\(\s*['\"]?\s*(?:https?:|//|javascript:|file:)"
                             r"[^)]*\)", re.I)

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.skip: list[str] = []

    @staticmethod
    def _safe_url(value: str) -> bool:
        v = re.sub(r"[\s\x00-\x1f]", "", html.unescape(value or "")).lower()
        return not v.startswith(("http:", "https:", "//", "javascript:", "file:", "vbscript:",
                                 "ftp:")) and "://" not in v

    def _attrs(self, attrs) -> str:
        parts = []
        for name, value in attrs:
            name = name.lower()
            if name.startswith("on"):
                continue
            if name in self.URL_ATTRS and value is not None and not self._safe_url(value):
                parts.append(f' title="{html.escape("external link removed: " + value)}"')
                continue
            if name == "style" and value and self._REMOTE_CSS.search(value):
                value = self._REMOTE_CSS.sub("", value)
            parts.append(f" {name}" if value is None else f' {name}="{html.escape(value)}"')
        return "".join(parts)

    def handle_starttag(self, tag, attrs):
        if self.skip or tag in self.DROP:
            if tag in self.DROP and tag not in ("base", "link", "meta"):
                self.skip.append(tag)
            return
        self.out.append(f"<{tag}{self._attrs(attrs)}>")

    def handle_startendtag(self, tag, attrs):
        if not self.skip and tag not in self.DROP:
            self.out.append(f"<{tag}{self._attrs(attrs)}/>")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if tag not in self.DROP:
            self.out.append(f"</{tag}>")

    def handle_data(self, data):
        if not self.skip:
            last = self.out[-1] if self.out else ""
            if last.startswith("<style"):
                data = self._REMOTE_CSS.sub("", data)
            self.out.append(data)

    def handle_entityref(self, name):
        if not self.skip:
            self.out.append(f"&{name};")

    def handle_charref(self, name):
        if not self.skip:
            self.out.append(f"&#{name};")

    def handle_decl(self, decl):
        self.out.append(f"<!{decl}>")

    def handle_comment(self, data):
        pass  # conditional comments can load resources; nothing of value is lost


def sanitize_html(text: str) -> str:
    """Standalone, script-free HTML: see :class:`_Sanitizer`."""
    parser = _Sanitizer()
    parser.feed(text)
    parser.close()
    return "".join(parser.out)


def render_notebook_html(path: str | os.PathLike) -> str:
    """The executed notebook as one standalone HTML page: CSS inlined (nbconvert's ``lab``
    template), images embedded, no scripts, no external assets."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(path), as_version=4)
    exporter = HTMLExporter(template_name="lab", embed_images=True, sanitize_html=False,
                            exclude_anchor_links=True, mathjax_url="", require_js_url="",
                            jquery_url="", widget_renderer_url="", mermaid_js_url="")
    body, _resources = exporter.from_notebook_node(nb)
    return sanitize_html(body)


def show(run_id: str, *, home=None, ledger: Ledger | None = None) -> dict:
    """A run's audit summary: listing fields, inputs, files, verification problems."""
    with open_ledger(ledger, home) as led:
        record = runs_dir(home) / check_run_id(run_id)
        if not record.is_dir() and not led.entries(subject=run_id):
            raise VerificationError(f"no run {run_id} in {record.parent} or the ledger")
        info = run_info(run_id, led, home)
        if (record / "manifest.json").exists():
            s = summary(load_manifest(record))
            info.update({k: s[k] for k in ("host", "seed", "base_model", "base_model_sha256",
                                           "notebook_source_sha256", "egress_refusals",
                                           "config", "files")})
            info["dataset_files"] = len(s["dataset_digests"])
        info["problems"] = [str(p) for p in verify_run(run_id, led, home)]
        info["ledger"] = [{"seq": e.seq, "time": e.time, "kind": e.kind}
                          for e in led.entries(subject=run_id)]
    return info


# -- lineage --------------------------------------------------------------------------------
def _query_digests(query: str) -> tuple[set[str], set[str]]:
    """``(digests, names)`` a lineage query stands for."""
    path = Path(query)
    if path.is_file():
        return {sha256_file(path)}, {str(path.resolve())}
    if path.is_dir():
        return {sha256_file(p) for p in path.rglob("*") if p.is_file()}, {str(path.resolve())}
    if _HEX64.match(query):
        return {query.lower()}, set()
    return set(), {query}


def lineage(query: str, *, home=None, ledger: Ledger | None = None) -> list[dict]:
    """Every run that used (or produced) ``query``: a file or folder path (its digests), a
    sha256, a dataset version id, or a base model path/name. Each hit says what matched.
    Pruned runs are matched on what their ledger entry keeps (dataset version, base model,
    notebook and adapter digests)."""
    digests, names = _query_digests(query)
    hits = []
    with open_ledger(ledger, home) as led:
        for rid in run_ids(led, home):
            record = runs_dir(home) / rid
            matched = []
            if (record / "manifest.json").exists():
                m = load_manifest(record)
                s = summary(m)
                for dep in m["predicate"]["buildDefinition"]["resolvedDependencies"]:
                    if dep.get("digest", {}).get("sha256") in digests:
                        matched.append(f"input {dep['name']}")
                for rel, d in s["files"].items():
                    if d in digests:
                        matched.append(f"output {rel}")
                base = s.get("base_model") or ""
                if names & {base, str(Path(base).resolve()) if base else "", Path(base).name}:
                    matched.append("base_model path")
            else:
                p = (led.run_entry(rid).payload if led.run_entry(rid) else {})
                s = {"user": p.get("user"), "status": p.get("status"), **p}
                for key in ("base_model_sha256", "notebook_source_sha256", "adapter_digest"):
                    if p.get(key) in digests:
                        matched.append(f"{key} (ledger)")
            if s.get("dataset_version") in names:
                matched.append("dataset version")
            if s.get("adapter_digest") in digests and not any("adapter" in x for x in matched):
                matched.append("adapter digest")
            if matched:
                hits.append({"run_id": rid, "user": s.get("user"), "status": s.get("status"),
                             "matched": sorted(set(matched))})
    return hits


# -- prune ----------------------------------------------------------------------------------
def retention_policy() -> dict:
    """``policies/retention.yaml`` over :data:`RETENTION_DEFAULTS`."""
    return load_policy("retention", RETENTION_DEFAULTS)


def prune(run_ids_: list[str] | None = None, *, home=None, ledger: Ledger | None = None,
          now: dt.datetime | None = None, dry_run: bool = False,
          user: str | None = None) -> list[dict]:
    """Remove records older than the retention policy's ``keep_days``; each removal is a
    ``prune`` ledger entry written before the files go.

    With explicit ``run_ids_``, a record that is too young, approved (``keep_approved``) or
    does not verify raises :class:`PolicyRefusal` / :class:`VerificationError` before anything
    is removed. Without, such records are skipped. Returns what was (or would be) pruned.
    """
    policy = retention_policy()
    keep_days = int(policy["keep_days"])
    now = now or dt.datetime.now(dt.timezone.utc)
    cutoff = now - dt.timedelta(days=keep_days)
    explicit = run_ids_ is not None
    done = []
    with open_ledger(ledger, home) as led:
        base = runs_dir(home)
        candidates = run_ids_ if explicit else [
            r for r in run_ids(led, home) if (base / r).is_dir()]
        plan = []
        for rid in candidates:
            record = base / check_run_id(rid)
            if not record.is_dir():
                if explicit:
                    raise VerificationError(f"{record}: no such record")
                continue
            problems = verify_run(rid, led, home)
            if problems:
                if explicit:
                    raise VerificationError(f"refusing to prune {rid}, it does not verify "
                                            "(evidence is kept): " + "; ".join(map(str, problems)))
                continue
            s = summary(load_manifest(record))
            ended = parse_time(s["ended"])
            if ended > cutoff:
                if explicit:
                    raise PolicyRefusal(f"run {rid} ended {s['ended']}, younger than the "
                                        f"{keep_days} days policies/retention.yaml keeps")
                continue
            if policy.get("keep_approved") and review_state(led, rid, s["adapter_digest"]
                                                            )[0] == "approved":
                if explicit:
                    raise PolicyRefusal(f"run {rid} is approved; retention keeps approved runs")
                continue
            plan.append((rid, record, s))
        for rid, record, s in plan:
            item = {"run_id": rid, "ended": s["ended"], "manifest_sha256":
                    manifest_sha256(record)}
            if not dry_run:
                trash = base / ".pruning" / rid
                trash.parent.mkdir(exist_ok=True)
                os.rename(record, trash)
                try:
                    entry = led.append("prune", rid, {**item, "keep_days": keep_days,
                                                      "by": user or current_user()})
                except BaseException:
                    os.rename(trash, record)
                    raise
                shutil.rmtree(trash)
                item["seq"] = entry.seq
            done.append(item)
    return done


def notebook_path(run_id: str, home=None) -> Path:
    """The executed notebook of a run."""
    return runs_dir(home) / check_run_id(run_id) / NOTEBOOK
