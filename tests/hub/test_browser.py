"""The hub in a real browser: Playwright (sync API) driving Debian's Chromium
(``/usr/bin/chromium``; Playwright's own browsers are never downloaded).

A researcher logs in, the hub spawns her server and JupyterLab opens a training notebook on
the ``lora`` kernel; an auditor browses the audit service's run list and a sealed run's page
(strict CSP, nothing but loopback requested); a researcher is refused the audit pages; the
studio trains; and a new team's first hour, from ``make hub`` to Ctrl-C.
Screenshots go to ``test-artifacts/browser/`` (git-ignored).
"""
from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest
import requests
from hubtools import PASSWORD, REPO, ROOT, user_name
from osdeps import missing

from lora_kernel.kernel.kernelspec import DISPLAY_NAME, KERNEL_NAME

pytestmark = [pytest.mark.hub, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
# No network on the test machines: keep Chromium's own background traffic off.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts" / "browser"
TIMEOUT_MS = 120_000
AUDIT = "/services/lora-audit"
RUNS = "/services/lora-runs"

if not os.path.exists(CHROMIUM):  # Debian's Chromium, never a downloaded one
    missing(f"{CHROMIUM} (Debian's chromium package)")


@pytest.fixture(scope="module")
def browser():
    """Chromium, headless; ``launch`` gives it a fresh temporary profile (removed on close)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def new_page(browser):
    """Factory: a page in a fresh context (own cookies); records every URL it requests."""
    contexts = []

    def make():
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.set_default_navigation_timeout(TIMEOUT_MS)
        page.requested = []  # type: ignore[attr-defined]
        page.on("request", lambda req: page.requested.append(req.url))  # type: ignore
        return page

    yield make
    for context in contexts:
        context.close()


def login(page, hub, short: str) -> None:
    """Log in through the hub's login form."""
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", user_name(short))
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("form [type=submit]")
    assert "/hub/login" not in page.url, f"login of {short} failed: {page.url}"


def assert_loopback_only(page) -> None:
    """Every request of ``page`` went to 127.0.0.1 (data:/blob:/about: stay in the page)."""
    assert page.requested
    off = []
    for url in page.requested:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            continue
        if parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname != "127.0.0.1":
            off.append(url)
    assert not off, f"requests off the loopback: {off}"


def open_notebook_in_lab(page, hub, short: str, notebook: str):  # type: ignore
    """Log in, start the server through the spawn form (0 GPUs when the pool offers some; on
    CPU-only the form is empty and the spawn starts at once), open ``notebooks/<notebook>`` in
    JupyterLab and wait for its toolbar to show the lora kernel; returns the notebook panel."""
    name = user_name(short)
    login(page, hub, short)
    page.goto(f"{hub.url}/hub/spawn/{name}")
    if "/hub/spawn/" in page.url and page.locator("#spawn_form").count():
        if page.locator("#lora-gpus").count():
            page.select_option("#lora-gpus", "0")
        page.click("#spawn_form [type=submit]")
    page.wait_for_url(f"**/user/{name}/lab**", timeout=TIMEOUT_MS)
    page.goto(f"{hub.url}/user/{name}/lab/tree/notebooks/{notebook}")
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").first
    panel.wait_for(state="visible")
    panel.locator(".jp-Toolbar-kernelName").get_by_text(DISPLAY_NAME, exact=True).wait_for(
        state="visible", timeout=TIMEOUT_MS)
    _wait_for_the_notebooks_kernel(page, hub, name, notebook)
    return panel


def _wait_for_the_notebooks_kernel(page, hub, name: str, notebook: str) -> None:  # type: ignore
    """Until the notebook's lora kernel runs. On a loaded machine JupyterLab may ask which
    kernel to start (its kernel list came late): the dialog offers only the lora kernel,
    preselected, and a user would press Select, so the test does (it checks the choice first)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    dialog = page.locator(".jp-Dialog")
    while time.monotonic() < deadline:
        if dialog.count() and dialog.first.get_by_text("Select Kernel").count():
            choice = dialog.first.locator("select")
            assert choice.locator("option:checked").inner_text().strip() == DISPLAY_NAME
            dialog.first.get_by_role("button", name="Select", exact=True).click()
        sessions = page.request.get(f"{hub.url}/user/{name}/api/sessions").json()
        kernels = [x["kernel"] for x in sessions if x["path"].endswith(notebook)]
        if kernels and kernels[0].get("execution_state") in ("idle", "busy"):
            assert kernels[0]["name"] == KERNEL_NAME, kernels
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"{notebook}: no running lora kernel after {TIMEOUT_MS} ms")


def test_researcher_logs_in_spawns_and_opens_a_notebook_on_the_lora_kernel(hub, new_page):
    page = new_page()
    name = user_name("alice")
    panel = open_notebook_in_lab(page, hub, "alice", "train_image_lora.ipynb")
    kernel = panel.locator(".jp-Toolbar-kernelName")
    assert kernel.inner_text().strip() == DISPLAY_NAME
    # the kernel really runs (the name alone could come from the notebook's metadata)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    mine: list = []
    while time.monotonic() < deadline:
        sessions = page.request.get(f"{hub.url}/user/{name}/api/sessions").json()
        mine = [s["kernel"] for s in sessions if s["path"].endswith("train_image_lora.ipynb")]
        if mine and mine[0].get("execution_state") in ("idle", "busy"):
            break
        page.wait_for_timeout(1000)
    assert [k["name"] for k in mine] == [KERNEL_NAME], mine
    assert mine[0].get("execution_state") in ("idle", "busy"), mine

    page.screenshot(path=str(ARTIFACTS / "lab_notebook.png"), full_page=True)
    assert_loopback_only(page)


# -- a sealed run for the audit pages ----------------------------------------------------------
def _write_notebook(path: Path, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": DISPLAY_NAME,
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(cells[0], metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells[1:]]
    nbformat.write(nb, str(path))


def _alice_home() -> Path:
    """Alice's working home (hub.settings.user_home), made as her server would make it."""
    from hub.settings import user_home

    name = user_name("alice")
    home = user_home(name, demo=not ROOT)
    home.mkdir(parents=True, exist_ok=True)
    if ROOT:
        pw = pwd.getpwnam(name)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return home


@pytest.fixture(scope="module")
def sealed_run(hub) -> str:
    """The run id of a tiny notebook run alice submitted through the runs service."""
    home = _alice_home()
    nb = home / "browser_hello.ipynb"
    _write_notebook(nb, "greeting = 'hello'",
                    "print(f'{greeting} from the browser test')")
    if ROOT:
        pw = pwd.getpwnam(user_name("alice"))
        os.chown(nb, pw.pw_uid, pw.pw_gid)
    headers = {"Authorization": f"token {hub.token('alice')}"}
    r = requests.post(f"{hub.url}{RUNS}/api/runs", headers=headers, timeout=60,
                      json={"notebook": nb.name, "parameters": {"greeting": "hello"}})
    assert r.status_code == 202, (r.status_code, r.text)
    sub_id = r.json()["id"]
    deadline = time.monotonic() + 400
    row: dict = {}
    while time.monotonic() < deadline:
        row = requests.get(f"{hub.url}{RUNS}/api/runs/{sub_id}", headers=headers,
                           timeout=30).json()
        if row.get("status") in ("succeeded", "failed", "cancelled", "interrupted"):
            break
        time.sleep(1)
    log = hub.state / "hub" / "logs" / f"{sub_id}.log"
    detail = f"{row}\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
    assert row.get("status") == "succeeded" and row.get("run_id"), detail
    return str(row["run_id"])


def test_auditor_browses_the_run_list_and_a_sealed_runs_notebook(hub, new_page, sealed_run):
    page = new_page()
    login(page, hub, "audrey")

    # the hub's OAuth (no confirmation page) lands on the list
    listing = page.goto(f"{hub.url}{AUDIT}/runs")
    assert listing is not None and listing.status == 200, listing and listing.status
    assert urlsplit(page.url).path == f"{AUDIT}/runs"
    page.get_by_role("heading", name="Runs").wait_for()
    assert "signed in as " + user_name("audrey") in page.inner_text("header")
    link = page.locator(f"table a:text-is('{sealed_run}')")
    link.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "audit_runs.png"), full_page=True)

    with page.expect_navigation() as nav:
        link.click()
    response = nav.value
    assert response is not None and response.status == 200
    assert urlsplit(page.url).path == f"{AUDIT}/runs/{sealed_run}"
    page.get_by_role("heading", name=f"Run {sealed_run}").wait_for()
    assert page.locator("p.ok", has_text="Verified").count() == 1
    # the executed notebook, rendered: its container, the source and the cell's output
    notebook = page.locator("div.record-notebook")
    notebook.wait_for(state="visible")
    assert "greeting" in notebook.inner_text()
    notebook.get_by_text("hello from the browser test").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "audit_run.png"), full_page=True)

    # the run page (loaded anew for its own response) has a strict CSP
    again = page.goto(f"{hub.url}{AUDIT}/runs/{sealed_run}")
    assert again is not None and again.status == 200
    csp = {d.strip().split(" ", 1)[0]: d.strip() for d in
           (again.headers.get("content-security-policy") or "").split(";") if d.strip()}
    assert csp.get("default-src") == "default-src 'none'", csp
    assert "script-src" not in csp  # no script at all: default-src 'none' applies
    assert csp.get("frame-ancestors") == "frame-ancestors 'none'", csp
    assert csp.get("base-uri") == "base-uri 'none'", csp
    assert csp.get("form-action") == "form-action 'self'", csp
    assert not any("*" in v or "http" in v for v in csp.values()), csp
    assert again.headers.get("x-content-type-options") == "nosniff"
    assert_loopback_only(page)


def test_researcher_is_refused_the_audit_pages(hub, new_page):
    page = new_page()
    login(page, hub, "bob")
    response = page.goto(f"{hub.url}{AUDIT}/runs")
    assert response is not None and response.status == 403, response and response.status
    assert urlsplit(page.url).path == f"{AUDIT}/runs"
    assert "403" in page.inner_text("h1")
    assert page.locator("table").count() == 0
    assert_loopback_only(page)


# -- the studio, clicked through in JupyterLab ---------------------------------------------------
def _give_demo_assets(hub, short: str, demo_home: Path) -> Path:
    """The demo models and datasets in the user's working home, owned by the user."""
    import shutil

    from hub.settings import user_home

    home = user_home(user_name(short), demo=not ROOT) if ROOT else \
        hub.home / "hub-users" / user_name(short)
    if not (home / "demo").exists():
        shutil.copytree(demo_home / "demo", home / "demo",
                        ignore=shutil.ignore_patterns("output"))
    if ROOT:
        pw = pwd.getpwnam(user_name(short))
        for root, dirs, files in os.walk(home):
            for n in [root, *(os.path.join(root, d) for d in dirs),
                      *(os.path.join(root, f) for f in files)]:
                os.chown(n, pw.pw_uid, pw.pw_gid)
    return home


def _studio_trains(page, panel, output_name: str) -> str:
    """In an open studio.ipynb: run all cells, set a 2-step run, press Start, wait until it
    succeeded; returns the run id (progress bar, "done", the sample grid and "my runs" seen)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    try:
        panel.locator(".widget-dropdown").first.wait_for(state="visible")
    finally:
        page.screenshot(path=str(ARTIFACTS / "studio_open.png"), full_page=True)

    # (JupyterLab skips rendering what is off screen: find it in the DOM, then scroll to it)
    start = panel.locator("button.widget-button", has_text="Start")
    scroller = panel.locator(".jp-WindowedPanel-outer").first
    for _ in range(6):                                   # bring the widget's end on screen
        scroller.evaluate("el => el.scrollBy(0, 600)")
        page.wait_for_timeout(300)
    try:
        start.wait_for(state="attached", timeout=20_000)
        start.scroll_into_view_if_needed()
    finally:
        page.screenshot(path=str(ARTIFACTS / "studio_open.png"), full_page=True)

    def field(label: str):
        return panel.locator(f".widget-text:has(label:text-is('{label}')) input")

    for label, value in (("max train steps", "2"), ("save steps", "0"),
                         ("output name", output_name)):
        field(label).fill(value)
        field(label).press("Enter")
    panel.locator(".widget-textarea:has(label:text-is('sample prompts')) textarea").fill(
        "a red circle in enclave style")
    page.wait_for_timeout(1500)                          # the kernel re-validates the form
    assert start.is_enabled()
    start.click()

    status = panel.locator(".widget-html", has_text="succeeded — run").first
    status.wait_for(state="visible", timeout=600_000)    # queued, trained, sealed
    run_id = status.inner_text().split("run", 1)[1].strip()
    bar = panel.locator(".widget-inline-hbox:has(> label:text-is('steps'))").first
    assert bar.is_visible()                               # the progress bar, then "done"
    assert panel.locator(".widget-label", has_text="done").first.is_visible()
    panel.locator(".widget-output img").last.wait_for(state="visible")  # the sample grid
    page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
    runs_table = panel.locator(".widget-html table").last          # "my runs"
    assert run_id in runs_table.inner_text() and "succeeded" in runs_table.inner_text()
    return run_id


def test_studio_in_jupyterlab_starts_a_run_and_shows_progress_and_samples(hub, new_page,
                                                                         demo_home):
    _give_demo_assets(hub, "alice", demo_home)
    page = new_page()
    panel = open_notebook_in_lab(page, hub, "alice", "studio.ipynb")
    _studio_trains(page, panel, "browser_studio")
    assert_loopback_only(page)


# -- day one: a new team's first hour, from `make hub` to Ctrl-C --------------------------------
def _tree(pid: int) -> set[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _as(name: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", name, "--", *cmd], capture_output=True, text=True,
                          timeout=60)


def test_the_first_hour_of_a_new_team(hub_root, new_page):
    """Issue 21's day one, as a new team lives it: the admin starts ``make hub`` (which fills
    the shared store); alice logs in, her studio lists the shared demo model and dataset and
    Start trains; her run is on her "My runs" page; ``!lora`` works in a cell of her kernel;
    erin cannot read alice's home (root); rita approves the run in the audit service and sees
    the confirmation with her note; Ctrl-C of ``make hub`` leaves no process behind."""
    import signal

    from hubtools import Hub, execute, start_kernel

    shared = hub_root / "first-hour-shared"
    h = Hub(hub_root / "first-hour", env={"LORA_SHARED_STORE": str(shared)})
    h.sessions = {}
    h.add_users({"alice": ["lora-researchers"], "erin": ["lora-researchers"],
                 "rita": ["lora-reviewers"]})
    h.start(make_hub=True, timeout=400)  # the first start fills the shared store
    try:
        # alice: the studio lists the shared store's demo model and dataset; Start trains
        page = new_page()
        panel = open_notebook_in_lab(page, h, "alice", "studio.ipynb")
        run_id = _studio_trains(page, panel, "first_hour")
        model = panel.locator(".widget-dropdown:has(label:text-is('base model')) select")
        dataset = panel.locator(".widget-dropdown:has(label:text-is('dataset')) select")
        # (the options show the path, a model's with its family: "…/tiny-sd (sd15)")
        assert model.input_value().split(" (")[0] == str(shared / "models" / "tiny-sd"), \
            model.input_value()
        assert dataset.input_value() == str(shared / "datasets" / "image"), \
            dataset.input_value()

        # her run on "My runs" (the runs service's root, the hub's Services menu entry)
        mine = page.goto(f"{h.url}{RUNS}/")
        assert mine is not None and mine.status == 200
        page.get_by_role("heading", name=f"My runs ({user_name('alice')})").wait_for()
        assert run_id in page.inner_text("table") and "succeeded" in page.inner_text("table")
        page.screenshot(path=str(ARTIFACTS / "first_hour_my_runs.png"), full_page=True)
        assert_loopback_only(page)

        # a shell inside the guarded kernel: the platform's lora, her runs
        s = h.login("alice")
        assert s.get(f"{h.url}/user/{user_name('alice')}/lab").status_code == 200  # OAuth
        kernel_id = start_kernel(h, s)
        out = execute(h, s, kernel_id, "!lora audit list\n!echo hi from a shell", timeout=120)
        assert out["status"] == "ok", out
        assert "Bad file descriptor" not in out["stdout"] and "Traceback" not in out["stdout"]
        assert run_id in out["stdout"] and "hi from a shell" in out["stdout"], out["stdout"]

        if ROOT:  # another researcher cannot read alice's home (0700), she can
            home = pwd.getpwnam(user_name("alice")).pw_dir
            assert _as(user_name("erin"), "ls", home).returncode != 0
            assert _as(user_name("alice"), "ls", home).returncode == 0

        # rita approves in the audit service and sees it confirmed, with her note
        review = new_page()
        login(review, h, "rita")
        review.goto(f"{h.url}{AUDIT}/runs/{run_id}")
        review.fill("textarea[name=note]", "samples look right")
        with review.expect_navigation():
            review.get_by_role("button", name="Approve").click()
        confirmation = review.locator("p.ok", has_text="You approved this run")
        confirmation.wait_for(state="visible")
        assert "samples look right" in confirmation.inner_text()
        review.screenshot(path=str(ARTIFACTS / "first_hour_approved.png"), full_page=True)
        assert_loopback_only(review)

        # Ctrl-C (SIGINT to the foreground process group) stops everything make hub started
        everything = _tree(h.proc.pid)  # hub.demo, the hub, proxy, services, server, kernel
        assert len(everything) >= 6, _alive(everything)
        before = len(h.log_path.read_bytes())  # the shutdown's own lines are checked below
        os.killpg(h.proc.pid, signal.SIGINT)
        assert h.proc.wait(timeout=120) == 0, h.log_tail()
        assert _alive(everything) == [], h.log_tail()
        log = h.log_path.read_bytes()[before:].decode(errors="replace")
        assert "nothing left running" in log, log[-3000:]
        at = max(log.find("Traceback"), log.find("KeyboardInterrupt"))  # a quiet shutdown
        assert at < 0, log[max(0, at - 1500):at + 3500]
    finally:
        h.proc = None if h.proc is None or h.proc.poll() is not None else h.proc
        h.stop_all()
