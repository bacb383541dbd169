"""The auditor's side, read-only: verify records, ledger and publications; list, show, trace
lineage. Every function takes ``state`` (the state directory, default
:func:`lora_kernel.common.paths.state_dir`) and an optional open
:class:`~lora_kernel.provenance.ledger.LedgerReader`. Pruning is
:mod:`lora_kernel.trusted.retention`; encrypted export/import :mod:`lora_kernel.trusted.archive`.

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
from __future__ import annotations

import datetime as dt
import difflib
import html
import os
import pwd
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lora_kernel.common.digests import path_sha256, sha256_file
from lora_kernel.common.errors import ConfigError, VerificationError
from lora_kernel.common.paths import check_run_id, runs_dir, state_dir
from lora_kernel.common.timeutil import parse_time
from lora_kernel.provenance.inputs import verify_inputs
from lora_kernel.provenance.ledger import LedgerReader, open_ledger, trust_root
from lora_kernel.provenance.publications import (
    publications,
    review_state,
    step_reviews,
    verify_publications,
)
from lora_kernel.provenance.records import NOTEBOOK, Problem, load_manifest, summary, verify_record

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# The config keys `lora audit show` prints first (max_train_steps when set, else epochs).
CONFIG_ESSENTIALS = ("task", "learning_rate", "lora_rank", "lora_alpha", "batch_size",
                     "max_train_steps", "epochs", "resolution", "seed")

_State = str | os.PathLike[str] | None  # the state directory (default: state_dir())


def run_ids(ledger: LedgerReader, state: _State = None) -> list[str]:
    """Every run id known from record folders (hidden ones skipped) or ledger entries."""
    ids = {e.subject for e in ledger.entries("run")}
    for imp in ledger.entries("import"):
        ids.update(imp.payload.get("runs", {}))
    base = runs_dir(state)
    if base.is_dir():
        ids.update(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(ids)


# -- verify ---------------------------------------------------------------------------------
def verify_run(run_id: str, ledger: LedgerReader, state: _State = None) -> list[Problem]:
    """Problems of one run: files vs manifest, manifest vs ledger, presence vs prune entries."""
    record = runs_dir(state) / check_run_id(run_id)
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


def verify(run_id: str | None = None, *, state: _State = None, ledger: LedgerReader | None = None,
           trusted_key: str | os.PathLike[str] | None = None, inputs: bool = False
           ) -> list[Problem]:
    """Verify the ledger (chain, signatures, head) against its trust root
    (:func:`~lora_kernel.provenance.ledger.trust_root`: ``trusted_key`` or the pin) and one run,
    or every run when ``run_id`` is None, plus published copies; with ``inputs``, also re-hash
    each run's dataset files and base model (:func:`~lora_kernel.provenance.inputs.verify_inputs`).
    Returns all problems (empty: everything verifies)."""
    with open_ledger(ledger, state) as led:
        problems = led.verify(trusted_key)
        ids = [run_id] if run_id else run_ids(led, state)
        for rid in ids:
            problems += verify_run(rid, led, state)
            record = runs_dir(state) / rid
            if inputs and (record / "manifest.json").is_file():
                try:
                    manifest = load_manifest(record)
                except VerificationError:
                    continue  # verify_run reported the manifest; its inputs are unknown
                problems += verify_inputs(manifest, rid)
        problems += verify_publications(led, run_id)
    return problems


def trust_statement(state: _State = None, trusted_key: str | os.PathLike[str] | None = None) -> str:
    """One line for the auditor: what the ledger was verified against, and how far records
    can be trusted given who owns the state directory."""
    root = state_dir(state)
    try:
        how = trust_root(root / "ledger", trusted_key).source
    except (ConfigError, VerificationError):
        how = "no usable key"
    try:
        owner = root.stat().st_uid
    except OSError:
        return f"trust: ledger key from {how}"
    if owner == os.getuid() and owner != 0:
        return (f"trust: ledger key from {how}; local mode: {root} belongs to you, so these "
                "records are only as trustworthy as your account")
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return f"trust: ledger key from {how}; state directory {root} owned by {name}"


# -- list / show ----------------------------------------------------------------------------
def run_info(run_id: str, ledger: LedgerReader, state: _State = None,
             now: dt.datetime | None = None) -> dict[str, Any]:
    """One run's summary for listings: from its manifest if present, else from the ledger.

    ``review`` is None for a run that did not succeed and has no review (it cannot be
    approved, so nothing is pending); ``config`` is the resolved config ({} when only the
    ledger entry is left); ``published`` lists the paths of publications not withdrawn."""
    record = runs_dir(state) / run_id
    entry = ledger.run_entry(run_id)
    s = None
    if (record / "manifest.json").exists():
        try:
            s = summary(load_manifest(record))
        except VerificationError:
            pass  # a corrupt manifest (verify reports it): list the run from its ledger entry
    if s is None:
        p = entry.payload if entry else {}
        s = {"run_id": run_id, "user": p.get("user"), "status": p.get("status"),
             "started": p.get("started"), "ended": p.get("ended"),
             "adapter_digest": p.get("adapter_digest"), "dataset_version":
                 p.get("dataset_version"), "base_model_sha256": p.get("base_model_sha256")}
    review_st, review = review_state(ledger, run_id, s.get("adapter_digest"))
    pubs = [p for p in publications(ledger, now)
            if p.get("run_id") == run_id and p["withdrawn"] is None]
    config = s.get("config")
    return {"run_id": run_id, "user": s.get("user"), "status": s.get("status"),
            "kind": s.get("kind") or "-",
            "started": s.get("started"), "ended": s.get("ended"),
            "review": None if review is None and s.get("status") != "succeeded" else review_st,
            "reviewer": review.payload.get("reviewer") if review else None,
            "review_note": review.payload.get("note") if review else None,
            "review_seq": review.seq if review else None,
            # the adapters saved mid-run that a reviewer decided on (--step): their own state
            "review_steps": {str(n): f"{e.payload.get('decision')} by "
                                     f"{e.payload.get('reviewer')} (seq {e.seq})"
                             for n, e in step_reviews(ledger, run_id).items()},
            "adapter_digest": s.get("adapter_digest"),
            "dataset_version": s.get("dataset_version"), "present": record.is_dir(),
            "pruned": ledger.latest("prune", run_id) is not None,
            "published": [p["path"] for p in pubs],
            "expired": any(p["expired"] for p in pubs),
            "config": config if isinstance(config, dict) else {}}


def check_columns(columns: list[str], configs: list[dict[str, Any]]) -> None:
    """:class:`ConfigError` naming the first of ``columns`` that no config in ``configs`` has,
    with the closest key that one has (did you mean) and the keys there are."""
    known = sorted({k for c in configs for k in c})
    for col in columns:
        if col in known:
            continue
        close = difflib.get_close_matches(col, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown column {col!r}: no run's config has that key{hint}; fix: "
                          "name config keys the runs recorded: " + (", ".join(known) or "none"),
                          key="--columns")


def list_runs(*, state: _State = None, ledger: LedgerReader | None = None, user: str | None = None,
              since: dt.datetime | None = None, until: dt.datetime | None = None,
              status: str | None = None, review: str | None = None, expired: bool = False,
              now: dt.datetime | None = None, columns: list[str] | None = None,
              verify: bool = True) -> list[dict[str, Any]]:
    """Runs matching every filter given: trainer, start time in ``[since, until)``, status,
    review state (pending/approved/rejected/void), with an expired publication.

    With ``verify`` each listed run is verified (:func:`verify_run`): ``verified`` and its
    ``problems``. ``columns`` (config keys; unknown ones: :func:`check_columns`) adds
    ``columns``: ``{key: value or None}`` to each run."""
    out, configs = [], []
    with open_ledger(ledger, state) as led:
        for rid in run_ids(led, state):
            info = run_info(rid, led, state, now)
            configs.append(info["config"])
            started = parse_time(info["started"]) if info["started"] else None
            if user and info["user"] != user or status and info["status"] != status:
                continue
            if review and info["review"] != review or expired and not info["expired"]:
                continue
            if since and (started is None or started < since):
                continue
            if until and (started is None or started >= until):
                continue
            if verify:
                problems = verify_run(rid, led, state)
                info.update(verified=not problems, problems=[str(p) for p in problems])
            out.append(info)
    if columns:
        check_columns(columns, configs)
        for info in out:
            info["columns"] = {c: info["config"].get(c) for c in columns}
    return out


def config_essentials(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of :data:`CONFIG_ESSENTIALS` that ``config`` has, in that order; the step
    budget is ``max_train_steps`` when set, else ``epochs``."""
    out = {k: config[k] for k in CONFIG_ESSENTIALS if k in config}
    if out.get("max_train_steps") is not None:
        out.pop("epochs", None)
    else:
        out.pop("max_train_steps", None)
    return out


def run_details(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a manifest says about how a run ran: its kind, error, the notebook (name, sha256)
    and its papermill parameters, the config essentials, the dataset's file count, who ran it
    (uid) and how they were identified (``identity``: os, peercred...), the account it ran as
    (``run_as``), and the whole free-form ``extra`` (losses, steps, notes...)."""
    s = summary(manifest)
    extra = manifest.get("predicate", {}).get("runDetails", {}).get("metadata", {}).get("extra")
    extra = extra if isinstance(extra, dict) else {}
    return {"kind": extra.get("kind"), "error": extra.get("error"), "uid": s.get("uid"),
            "identity": extra.get("identity"), "run_as": extra.get("run_as"),
            "isolation": _isolation(extra), "inputs_read_from": (extra.get("snapshot") or {}).get(
                "read_from") if isinstance(extra.get("snapshot"), dict) else None,
            "notebook": {"name": extra.get("notebook"), "sha256": s["notebook_source_sha256"]},
            "parameters": extra.get("parameters"),
            "config_essentials": config_essentials(s["config"]),
            "dataset_files": len(s["dataset_digests"]), "extra": extra}


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

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.skip: list[str] = []

    @staticmethod
    def _safe_url(value: str) -> bool:
        v = re.sub(r"[\s\x00-\x1f]", "", html.unescape(value or "")).lower()
        return not v.startswith(("http:", "https:", "//", "javascript:", "file:", "vbscript:",
                                 "ftp:")) and "://" not in v

    def _attrs(self, attrs: list[tuple[str, str | None]]) -> str:
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

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip or tag in self.DROP:
            if tag in self.DROP and tag not in ("base", "link", "meta"):
                self.skip.append(tag)
            return
        self.out.append(f"<{tag}{self._attrs(attrs)}>")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.skip and tag not in self.DROP:
            self.out.append(f"<{tag}{self._attrs(attrs)}/>")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if tag not in self.DROP:
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            last = self.out[-1] if self.out else ""
            if last.startswith("<style"):
                data = self._REMOTE_CSS.sub("", data)
            self.out.append(data)

    def handle_entityref(self, name: str) -> None:
        if not self.skip:
            self.out.append(f"&{name};")

    def handle_charref(self, name: str) -> None:
        if not self.skip:
            self.out.append(f"&#{name};")

    def handle_decl(self, decl: str) -> None:
        self.out.append(f"<!{decl}>")

    def handle_comment(self, data: str) -> None:
        pass  # conditional comments can load resources; nothing of value is lost


def sanitize_html(text: str) -> str:
    """Standalone, script-free HTML: see :class:`_Sanitizer`."""
    parser = _Sanitizer()
    parser.feed(text)
    parser.close()
    return "".join(parser.out)


def terminal_text(text: str) -> str:
    """A stream's text as a terminal shows it: each line is what follows its last carriage
    return, so a progress bar (tqdm redraws with ``\\r``) appears in its last state instead
    of one line per redraw. The record keeps the stream as it was; only the view changes."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p]
        lines.append(parts[-1] if parts else "")
    return "\n".join(lines)


def terminal_streams(outputs: list[Any]) -> list[Any]:
    """Consecutive outputs of one stream merged (each ``print`` or progress redraw arrives as
    its own output), then shown as a terminal would (:func:`terminal_text`)."""
    merged: list[Any] = []
    for out in outputs:
        last = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and last is not None
                and last.get("output_type") == "stream" and last.get("name") == out.get("name")
                and isinstance(out.get("text"), str) and isinstance(last.get("text"), str)):
            last["text"] += out["text"]
        else:
            merged.append(out)
    for out in merged:
        if out.get("output_type") == "stream" and isinstance(out.get("text"), str):
            out["text"] = terminal_text(out["text"])
    return merged


def render_notebook_html(path: str | os.PathLike[str]) -> str:
    """The executed notebook as one standalone HTML page: CSS inlined (nbconvert's ``lab``
    template), images embedded, no scripts, no external assets."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.get("outputs"):
            cell["outputs"] = terminal_streams(cell["outputs"])
    exporter = HTMLExporter(template_name="lab", embed_images=True, sanitize_html=False,
                            exclude_anchor_links=True, mathjax_url="", require_js_url="",
                            jquery_url="", widget_renderer_url="", mermaid_js_url="")
    body, _resources = exporter.from_notebook_node(nb)
    return sanitize_html(body)


def show(run_id: str, *, state: _State = None,
         ledger: LedgerReader | None = None) -> dict[str, Any]:
    """A run's audit summary: listing fields, :func:`run_details` (kind, error, notebook,
    parameters, config essentials, identity), inputs, files, verification problems, ledger
    entries, every publication (``publications``, withdrawn ones included) and its replays
    (``replays``: each ``lora audit replay`` of it, the replay's run id and verdict)."""
    with open_ledger(ledger, state) as led:
        record = runs_dir(state) / check_run_id(run_id)
        if not record.is_dir() and not led.entries(subject=run_id):
            raise ConfigError(f"no such run {run_id!r} in {record.parent} or the ledger; fix: "
                              "pick a run id from `lora audit list`", key="RUN")
        info = run_info(run_id, led, state)
        if (record / "manifest.json").exists():
            manifest = load_manifest(record)
            s = summary(manifest)
            info.update({k: s[k] for k in ("host", "seed", "base_model", "base_model_sha256",
                                           "notebook_source_sha256", "egress_refusals",
                                           "config", "files")})
            info.update(run_details(manifest))
        info["problems"] = [str(p) for p in verify_run(run_id, led, state)]
        info["publications"] = [
            {k: p.get(k) for k in ("seq", "path", "published_by", "expires", "withdrawn")}
            for p in publications(led) if p.get("run_id") == run_id]
        info["ledger"] = [{"seq": e.seq, "time": e.time, "kind": e.kind}
                          for e in led.entries(subject=run_id)]
        info["replays"] = [{"seq": e.seq, "time": e.time,
                            **{k: e.payload.get(k) for k in ("replay_run", "verdict", "reason",
                                                             "max_abs_diff")}}
                           for e in led.entries("replay", run_id)]
    return info


# -- lineage --------------------------------------------------------------------------------
def _query_digests(query: str) -> tuple[set[str], set[str]]:
    """``(digests, names)`` a lineage query stands for."""
    path = Path(query)
    if path.is_file():
        return {sha256_file(path)}, {str(path.resolve())}
    if path.is_dir():  # its files, and the folder as a whole (a model or adapter input)
        return ({sha256_file(p) for p in path.rglob("*") if p.is_file()} | {path_sha256(path)},
                {str(path.resolve())})
    if _HEX64.match(query):
        return {query.lower()}, set()
    return set(), {query}


def _isolation(extra: dict[str, Any]) -> str | None:
    """How a run was kept from its requester (``extra.isolation``), in words; None for
    records made before runs said."""
    iso = extra.get("isolation")
    if not isinstance(iso, dict):
        return None
    if iso.get("account"):
        return f"run account {iso['account']} (uid {iso.get('uid')}): not the requester's"
    return f"not isolated ({iso.get('why') or 'ran as its requester'})"


def lineage(query: str, *, state: _State = None,
            ledger: LedgerReader | None = None) -> list[dict[str, Any]]:
    """Every run that used (or produced) ``query``: a file or folder path (its digests), a
    sha256, a dataset version id, or a base model path/name. Each hit says what matched.
    Pruned runs are matched on what their ledger entry keeps (dataset version, base model,
    notebook and adapter digests)."""
    digests, names = _query_digests(query)
    hits = []
    with open_ledger(ledger, state) as led:
        for rid in run_ids(led, state):
            record = runs_dir(state) / rid
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
                entry = led.run_entry(rid)
                p = entry.payload if entry is not None else {}
                s = {"user": p.get("user"), "status": p.get("status"), **p}
                for key in ("base_model_sha256", "notebook_source_sha256", "adapter_digest"):
                    if p.get(key) in digests:
                        matched.append(f"{key} (ledger)")
            if s.get("dataset_version") in names:
                matched.append("dataset version")
            if (s.get("derived_from") or {}).get("run_id") in names:
                matched.append("derived from run")
            if s.get("adapter_digest") in digests and not any("adapter" in x for x in matched):
                matched.append("adapter digest")
            if matched:
                hits.append({"run_id": rid, "user": s.get("user"), "status": s.get("status"),
                             "matched": sorted(set(matched))})
    return hits


def notebook_path(run_id: str, state: _State = None) -> Path:
    """The executed notebook of a run."""
    return runs_dir(state) / check_run_id(run_id) / NOTEBOOK
