"""The researcher studio (lora_kernel.studio): the form validates like `lora config`, Start
writes and submits the config and follows the run (progress, ETA, loss curve, samples, my
runs); it builds in the real `lora` kernel; a run started from it completes."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lora_kernel.studio import Studio, read_progress

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "20261126T070000Z-abc123"


class FakeRuns:
    """Stands in for the runs service: records what was submitted; the test drives status."""

    def __init__(self):
        self.submitted: list[Path] = []
        self.state = {"status": "queued", "run_id": None, "error": None, "done": False}
        self.grid: bytes | None = None
        self.measured: dict | None = None

    def submit(self, path):
        self.submitted.append(Path(path))
        return "7"

    def status(self, handle):
        return dict(self.state)

    def samples(self, handle):
        return self.grid

    def measures(self, handle):
        return self.measured

    def my_runs(self):
        return [{"id": 7, "run_id": self.state["run_id"], "status": self.state["status"],
                 "what": "x.yaml"}]


@pytest.fixture
def home(demo_home, tmp_path, monkeypatch):
    h = tmp_path / "home"
    shutil.copytree(demo_home / "demo", h / "demo", ignore=shutil.ignore_patterns("output"))
    monkeypatch.setenv("LORA_HOME", str(h))
    return h


def test_a_fresh_home_lists_the_shared_stores_models_and_only_readable_datasets(
        demo_home, tmp_path, monkeypatch):
    """A new user's empty working home: the studio lists the platform's shared models and
    datasets ($LORA_SHARED_STORE, what `make hub` fills); a shared dataset folder the user may
    not read is not listed. Without a shared store the lists are the home's (empty here)."""
    from lora_kernel.studio import list_datasets, list_models

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("LORA_HOME", str(fresh))
    monkeypatch.delenv("LORA_SHARED_STORE", raising=False)
    assert list_models("image") == [] and list_datasets("image") == []
    shared = tmp_path / "shared"
    shutil.copytree(demo_home / "demo" / "models", shared / "models")
    shutil.copytree(demo_home / "demo" / "datasets", shared / "datasets")
    monkeypatch.setenv("LORA_SHARED_STORE", str(shared))
    assert shared / "models" / "tiny-sd" in list_models("image")
    assert shared / "models" / "tiny-llama" in list_models("text")
    assert list_datasets("image") == [shared / "datasets" / "image"]
    if os.geteuid() != 0:  # root reads everything; the OS rule is what the studio follows
        os.chmod(shared / "datasets" / "image", 0o000)
        try:
            assert list_datasets("image") == []
        finally:
            os.chmod(shared / "datasets" / "image", 0o755)


def test_the_model_picker_shows_each_image_models_family(home):
    s = Studio(home=home, runs=FakeRuns(), announce=lambda _t: None)
    labels = {Path(value).name: label for label, value in s.model.options}
    assert labels["tiny-sd"].endswith("(sd15)")
    assert labels["tiny-sdxl"].endswith("(sdxl)")
    assert labels["tiny-sdxl.safetensors"].endswith("(sdxl)")
    s.model.value = s.model.options[[Path(v).name for _, v in s.model.options].index(
        "tiny-sdxl")][1]
    assert not s.start_button.disabled  # an SDXL model validates like any other


def test_the_form_validates_like_the_cli_with_errors_under_their_fields(home):
    s = Studio(home=home, runs=FakeRuns(), announce=lambda _t: None)
    assert s.task == "image" and s.dataset.value.endswith("datasets/image")
    assert s.model.value and not s.start_button.disabled        # must work: the defaults
    s.fields["lora_rank"].value = "0"
    assert "must be &gt;= 1" in s.errors["lora_rank"].value and "fix:" in \
        s.errors["lora_rank"].value
    assert s.start_button.disabled and s.start() is None
    s.fields["lora_rank"].value = "4"
    assert s.errors["lora_rank"].value == "" and not s.start_button.disabled
    s.fields["learning_rate"].value = "fast"
    assert s.errors["learning_rate"].value and s.start_button.disabled
    s.fields["learning_rate"].value = "2e-4"
    assert s.validate().learning_rate == pytest.approx(2e-4)
    # the text template switches datasets and models to text ones
    s.template.value = str(REPO / "templates" / "text_lora.yaml")
    assert s.task == "text" and s.model.value.endswith("tiny-llama")
    assert s.values()["metadata_path"].endswith(".jsonl") and s.validate() is not None


def test_start_submits_the_chosen_config_and_follows_the_run(home):
    runs, said = FakeRuns(), []
    s = Studio(home=home, runs=runs, announce=said.append)
    s.fields["max_train_steps"].value = "4"
    s.fields["output_name"].value = "my_style"
    s._watch = lambda every=1.0: None                              # the test polls by hand
    assert s.start() == "7"
    written = runs.submitted[0]
    assert written.parent == home / "studio"
    import yaml

    cfg = yaml.safe_load(written.read_text())
    assert cfg["max_train_steps"] == 4 and cfg["output_name"] == "my_style"
    assert cfg["train_data_dir"] == s.dataset.value and cfg["base_model"] == s.model.value
    assert "max_train_steps: 4" in said[0]                        # kept in the cell's output

    runs.state = {"status": "running", "run_id": RUN_ID, "error": None, "done": False}
    progress = home / "work" / RUN_ID / "progress.jsonl"
    progress.parent.mkdir(parents=True)
    progress.write_text("\n".join(json.dumps(r) for r in [
        {"event": "train_start", "step": 0, "total": 4},
        {"event": "step", "step": 1, "total": 4, "start": 0, "loss": 0.9, "elapsed": 2.0},
        {"event": "step", "step": 2, "total": 4, "start": 0, "loss": 0.7, "elapsed": 4.0}]))
    assert s.poll() is False
    assert (s.progress.value, s.progress.max) == (2, 4) and s.eta.value == "ETA 4 s"
    assert s.plot.outputs and "image/png" in s.plot.outputs[0]["data"]
    assert RUN_ID in s.status.value

    from matplotlib.figure import Figure

    from lora_kernel.notebook import _png  # any PNG will do as the grid

    runs.grid = _png(Figure(figsize=(1, 1)))
    runs.measured = {"kind": "text_exact_match", "base": {"exact_match": 0.0, "prompts": 12},
                     "lora": {"exact_match": 0.75, "prompts": 12}, "exact_match_floor": 0.8,
                     "base_ceiling": 0.1}
    runs.state = {"status": "succeeded", "run_id": RUN_ID, "error": None, "done": True}
    assert s.poll() is True and s.progress.value == 4 and s.eta.value == "done"
    assert s.samples.outputs and RUN_ID in s.my_runs_html.value
    # the run's measures are shown under its samples (issue 27)
    shown = [o["data"].get("text/html", "") for o in s.samples.outputs]
    assert any("base 0% -&gt; LoRA 75%" in h for h in shown), shown


def test_progress_of_a_missing_or_partial_file():
    assert read_progress(Path("/nonexistent/progress.jsonl"))["total"] is None


@pytest.mark.slow
def test_the_studio_builds_and_validates_in_the_lora_kernel(home, lora_kernel_prefix):
    from jupyter_client.manager import start_new_kernel

    env = dict(os.environ, JUPYTER_PATH=str(lora_kernel_prefix / "share" / "jupyter"),
               LORA_HOME=str(home))
    km, kc = start_new_kernel(kernel_name="lora", env=env)
    try:
        code = ("from lora_kernel.studio import Studio\n"
                "s = Studio()\n"
                "ok = s.validate() is not None\n"
                "s.fields['lora_rank'].value = '-3'\n"
                "print('ok', ok, 'refused', 'must be' in s.errors['lora_rank'].value, "
                "type(s.widget).__name__)\n")
        out: list[str] = []
        reply = kc.execute_interactive(code, timeout=120, output_hook=lambda m: out.append(
            m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "ok True refused True VBox" in "".join(out)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.slow
def test_a_run_started_from_the_studio_completes_and_appears_in_my_runs(home, lora_kernel_prefix,
                                                                       monkeypatch):
    from lora_kernel.studio import LocalRuns

    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep +
                       os.environ.get("PATH", ""))
    s = Studio(home=home, runs=LocalRuns(), announce=lambda _t: None)
    s.fields["max_train_steps"].value = "2"
    s.fields["save_steps"].value = "0"
    s.fields["sample_prompts"].value = "a red circle in enclave style"
    s.base["sample_steps"] = 1
    assert s.start() is not None
    assert s.wait(timeout=600), "the run did not finish"
    st = s.runs.status(s.handle)
    assert st["status"] == "succeeded", st
    assert s.run_id and s.run_id in s.my_runs_html.value and "succeeded" in s.my_runs_html.value
    assert s.samples.outputs, "no sample grid shown"
    assert Path(st["record"], "manifest.json").is_file()


def test_the_gpus_field_asks_the_run_for_that_many_gpus(home):
    """GPUs 2: the hub request asks for 2 GPUs (the run's num_processes: auto trains on 2
    ranks); GPUs 1: the request as before (no gpus key)."""
    from lora_kernel.user.studio import HubRuns, LocalRuns

    class Client:
        def __init__(self):
            self.requests = []

        def submit(self, request):
            self.requests.append(request)
            return {"id": len(self.requests)}

    hub = HubRuns.__new__(HubRuns)
    hub.client = Client()

    class Runs(FakeRuns):
        def submit(self, path, gpus=None):
            self.gpus = gpus
            return hub.submit(Path(path), gpus=gpus)

    runs = Runs()
    s = Studio(home=home, runs=runs, announce=lambda _t: None)
    s.gpus.value = 2
    assert s.start() is not None
    assert hub.client.requests[-1]["gpus"] == 2 and runs.gpus == 2
    s.gpus.value = 1
    assert s.start() is not None
    assert "gpus" not in hub.client.requests[-1] and runs.gpus is None
    assert "gpus" in LocalRuns.submit.__code__.co_varnames  # local: -p num_processes N
