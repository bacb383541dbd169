"""papermill runs notebooks in the guarded kernel (``-k lora``); its events carry the run id."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kernel.kernel.execlog import read_events

NOTEBOOK = Path(__file__).parent / "notebooks" / "test-kernel-pass-parameters.ipynb"


@pytest.mark.slow
def test_papermill_runs_a_notebook_in_the_lora_kernel(lora_kernel_prefix, tmp_path):
    out = tmp_path / "out.ipynb"
    home = tmp_path / "home"
    env = {**os.environ, "JUPYTER_PATH": str(lora_kernel_prefix / "share/jupyter"),
           "LORA_HOME": str(home), "LORA_RUN_ID": "run-pm-1"}
    done = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOK), str(out),
                           "-k", "lora", "-p", "greeting", "hi", "-p", "repeat", "2",
                           "--cwd", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "greeting = \"hi\"" in "".join(injected[0]["source"])
    text = "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o["text"])
                   for c in nb["cells"] for o in c.get("outputs", []) if "text" in o)
    assert "greeting: hihi" in text and "offline: 1" in text
    assert "egress: refused EgressBlocked" in text
    events = read_events(home, run_id="run-pm-1")
    executes = [e for e in events if e["type"] == "execute"]
    assert len(executes) == 4 and all(e["status"] == "ok" for e in executes)
    assert any(e["type"] == "refusal" and e["destination"] == "example.com:443" for e in events)
