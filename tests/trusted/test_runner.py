"""Recorded runs (lora_kernel.trusted.runner, lora run / lora demo) with real papermill and the real
guarded ``lora`` kernel on the demo assets; nbval on the training notebooks.

Trainings are cut to a few steps; every test here starts at least one kernel (``slow``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbtools import write_notebook

from lora_kernel.common.digests import sha256_file
from lora_kernel.common.errors import RunFailed
from lora_kernel.provenance.ledger import LedgerReader
from lora_kernel.provenance.records import load_manifest, verify_record
from lora_kernel.trusted.runner import new_run_id, notebook_for_task, run_config, run_notebook

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# A few steps and one cheap sample: the record is the same shape as a long run's.
FAST_IMAGE = {"max_train_steps": 2, "sample_steps": 1, "save_steps": 0,
              "sample_prompts": ["a red circle in enclave style"]}
FAST_TEXT = {"max_train_steps": 2, "max_new_tokens": 2, "save_steps": 0,
             "sample_prompts": ["Q: what is the code for apple? A:"]}


@pytest.fixture
def run_home(tmp_path, monkeypatch, lora_kernel_prefix):
    """A fresh working home for runs (``LORA_HOME``), the test's ``lora`` kernelspec first on
    ``JUPYTER_PATH`` (inherited by the executor and the kernel). Records go to the test's
    own ``LORA_STATE`` (``state_of(home)``)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    return home


def state_of(_home) -> Path:
    """The state directory runs of the test go to (the autouse ``LORA_STATE``)."""
    return Path(os.environ["LORA_STATE"])


def lora_cli(*args, home, wait=True, **kw):
    """Run the ``lora`` CLI in a subprocess (the environment of the test)."""
    cmd = [sys.executable, "-m", "lora_kernel.cli", *map(str, args), "--home", str(home)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def assert_sealed(record: Path, status: str) -> dict:
    """The record verifies, the ledger attests its manifest, and its status is ``status``."""
    assert verify_record(record) == []
    manifest = load_manifest(record)
    meta = manifest["predicate"]["runDetails"]["metadata"]
    assert meta["status"] == status
    for entry in manifest["subject"]:
        assert sha256_file(record / entry["name"]) == entry["digest"]["sha256"], entry["name"]
    with LedgerReader(state=record.parent.parent) as ledger:
        entry = ledger.run_entry(record.name)
        assert entry is not None and entry.payload["status"] == status
        assert entry.payload["manifest_sha256"] == sha256_file(record / "manifest.json")
        assert ledger.verify() == []
    staging = record.parent / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    return manifest


def find_processes(pred, timeout=120):
    """Wait until processes matching ``pred(proc, environ)`` exist; return them."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if pred(proc, proc.environ()):
                    found.append(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("process did not appear")


def start_sleeping_run(run_home: Path, tmp_path: Path):
    """``lora run`` of a notebook that prints 'started' and then sleeps (not waited for)."""
    nb = write_notebook(tmp_path / "sleep.ipynb", "seconds = 600", "print('started')",
                        "import time; time.sleep(seconds)")
    return lora_cli("run", nb, home=run_home, wait=False)


def wait_for_kernel(run_home: Path):
    """Wait until the sleeping run printed 'started'; return its kernel process."""
    deadline = time.monotonic() + 60
    while not _started(run_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    kernel, = find_processes(lambda p, env: env.get("LORA_HOME") == str(run_home)
                             and "-f" in p.info["cmdline"])
    return kernel


def test_run_id_sorts_by_time():
    import datetime as dt

    a = new_run_id(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    b = new_run_id(dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.UTC))
    assert re.fullmatch(r"20260102T030405Z-[0-9a-f]{6}", a) and a < b


def test_sdxl_run_through_lora_run_is_a_sealed_record(run_home, demo_home):
    """A new user's SDXL run: ``lora run --config sdxl_lora.yaml`` seals a record whose
    adapter names both text encoders in kohya form and whose manifest and summary say the
    family and the dtypes (bf16 frozen weights, fp32 LoRA)."""
    from safetensors.torch import load_file

    args = ["run", "--config", demo_home / "demo" / "sdxl_lora.yaml", "--quiet"]
    for key, value in {**FAST_IMAGE, "train_text_encoder": "true",
                       "mixed_precision": "bf16"}.items():
        args += ["-p", key, json.dumps(value) if not isinstance(value, str) else value]
    proc = lora_cli(*args, home=run_home)
    assert proc.returncode == 0, proc.stderr
    record = Path(re.search(r"^record: (\S+)$", proc.stdout, re.M).group(1))
    manifest = assert_sealed(record, "succeeded")
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["model_family"] == "sdxl"
    assert (extra["base_weight_dtype"], extra["trainable_dtype"]) == ("bfloat16", "float32")
    kohya = load_file(str(record / "adapter" / "enclave_style_xl_kohya.safetensors"))
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    summary = json.loads((record / "training_summary.json").read_text())
    assert (summary["model_family"], summary["base_weight_dtype"]) == ("sdxl", "bfloat16")
    assert (record / "adapter" / "enclave_style_xl.safetensors").is_file()


@pytest.mark.slow
def test_flux_run_through_lora_run_is_a_sealed_record(run_home, demo_home, tmp_path,
                                                       monkeypatch):
    """A new user's Flux run: ``lora run --config flux_lora.yaml`` seals a record with the
    family, both adapter formats (the kohya one in Black Forest Labs' layout), a sample grid
    rendered by ``FluxPipeline`` and the base model's licence, which the policy allows for
    the user's own group (the refusal of another group: tests/exit_cases/flow.py)."""
    import grp

    from safetensors.torch import load_file

    pdir = tmp_path / "policies"
    shutil.copytree(Path(__file__).resolve().parents[2] / "policies", pdir)
    models = yaml.safe_load((pdir / "models.yaml").read_text())
    models["models"] = [{"match": "tiny-flux*", "licence": "flux-1-dev-non-commercial"}]
    models["licences"] = {"flux-1-dev-non-commercial": {
        "allowed_groups": [grp.getgrgid(os.getgid()).gr_name]}}
    (pdir / "models.yaml").write_text(yaml.safe_dump(models))
    monkeypatch.setenv("LORA_POLICIES", str(pdir))

    args = ["run", "--config", demo_home / "demo" / "flux_lora.yaml", "--quiet"]
    for key, value in {**FAST_IMAGE, "train_text_encoder": "true"}.items():
        args += ["-p", key, json.dumps(value) if not isinstance(value, str) else value]
    proc = lora_cli(*args, home=run_home)
    assert proc.returncode == 0, proc.stderr
    record = Path(re.search(r"^record: (\S+)$", proc.stdout, re.M).group(1))
    manifest = assert_sealed(record, "succeeded")
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["model_family"] == "flux"
    assert extra["base_model_licence"] == "flux-1-dev-non-commercial"
    kohya = load_file(str(record / "adapter" / "enclave_style_flux_kohya.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    assert any(k.startswith("lora_te1_text_model_") for k in kohya)
    assert (record / "adapter" / "enclave_style_flux.safetensors").is_file()
    assert (record / "samples" / "grid.png").is_file()


@pytest.mark.slow
def test_sd3_run_through_lora_run_is_a_sealed_record(run_home, demo_home):
    """The demo SD3.5 through ``lora run``: a sealed record naming the family, whose
    diffusers adapter holds the transformer's LoRA (StableDiffusion3Pipeline's names) and a
    kohya file in OneTrainer's ``lora_transformer_`` names."""
    from safetensors.torch import load_file

    args = ["run", "--config", demo_home / "demo" / "sd3_lora.yaml", "--quiet"]
    for key, value in FAST_IMAGE.items():
        args += ["-p", key, json.dumps(value) if not isinstance(value, str) else value]
    proc = lora_cli(*args, home=run_home)
    assert proc.returncode == 0, proc.stderr
    record = Path(re.search(r"^record: (\S+)$", proc.stdout, re.M).group(1))
    manifest = assert_sealed(record, "succeeded")
    assert manifest["predicate"]["runDetails"]["metadata"]["extra"]["model_family"] == "sd3"
    adapter = load_file(str(record / "adapter" / "enclave_style_sd3.safetensors"))
    assert adapter and all(k.startswith("transformer.") for k in adapter)
    kohya = load_file(str(record / "adapter" / "enclave_style_sd3_kohya.safetensors"))
    assert kohya and all(k.startswith("lora_transformer_") for k in kohya)
    assert (record / "samples" / "grid.png").is_file()


def test_image_run_record_is_complete(run_home, demo_home):
    cfg_path = demo_home / "demo" / "image_lora.yaml"
    rec = run_config(cfg_path, FAST_IMAGE, home=run_home)
    assert rec.status == "succeeded" and rec.path == state_of(run_home) / "runs" / rec.run_id
    manifest = assert_sealed(rec.path, "succeeded")
    files = set(rec.files)
    assert {"adapter/enclave_style.safetensors", "adapter/enclave_style_kohya.safetensors",
            "executed.ipynb", "events.jsonl", "samples/grid.png", "loss_curve.png",
            "run_result.json"} <= files
    assert any(f.startswith("tb/events.out.tfevents") for f in files)
    assert not any("checkpoint" in f for f in files)
    assert not (run_home / "work" / rec.run_id).exists()
    assert not (state_of(run_home) / "runs" / ".active" / f"{rec.run_id}.json").exists()

    # the executed notebook: injected parameters, every cell ran, displays recorded
    nb = nbformat.read(str(rec.path / "executed.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    # the notebook read the pinned snapshot laid out in the work folder, not the user's files
    laid = run_home / "work" / rec.run_id / "inputs"
    assert str(laid / "config" / cfg_path.name) in injected[0].source
    assert str(laid / "dataset") in injected[0].source and "max_train_steps" in \
        injected[0].source
    assert str(run_home / "work" / rec.run_id / "output") in injected[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    mimes = {m for c in code for o in c.outputs for m in o.get("data", {})}
    assert {"image/png", "text/html"} <= mimes
    html = "".join(o["data"]["text/html"] for c in code for o in c.outputs
                   if "text/html" in o.get("data", {}))
    assert sha256_file(rec.path / "adapter/enclave_style.safetensors") in html

    # the manifest pins the inputs
    build = manifest["predicate"]["buildDefinition"]
    assert build["externalParameters"]["notebook_source_sha256"] == sha256_file(
        notebook_for_task("image"))
    assert build["externalParameters"]["config"]["max_train_steps"] == 2
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    from lora_kernel.training.models import model_sha256
    assert deps["base_model"]["digest"]["sha256"] == model_sha256(demo_home / "demo/models/tiny-sd")
    data = demo_home / "demo" / "datasets" / "image"
    assert {n[len("dataset/"):] for n in deps if n.startswith("dataset/")} == {
        p.name for p in data.iterdir()}
    meta = manifest["predicate"]["runDetails"]["metadata"]
    assert meta["egressRefusals"] == 0 and meta["extra"]["steps"] == 2
    assert build["internalParameters"]["environment"]["packages"]["papermill"]
    snap = meta["extra"]["snapshot"]
    assert snap["read_from"] == "snapshot" and snap["dataset_version"] == \
        deps["dataset"]["annotations"]["version"]
    assert snap["base_model_sha256"] == deps["base_model"]["digest"]["sha256"]
    from lora_kernel.provenance.audit import show
    info = show(rec.run_id)  # what `lora audit show` prints
    assert info["isolation"].startswith("not isolated (local mode") and \
        info["inputs_read_from"] == "snapshot"
    index = json.loads((state_of(run_home) / "objects" / "datasets" /
                        f"{snap['dataset_version']}.json").read_text())
    assert index["first_run"] == rec.run_id and set(index["files"]) == {
        p.name for p in data.iterdir()}

    # the kernel's events of this run: one execute event per code cell, in order
    events = [json.loads(line) for line in (rec.path / "events.jsonl").read_text().splitlines()]
    assert events and {e["run_id"] for e in events} == {rec.run_id}
    executed = [e for e in events if e["type"] == "execute"]
    assert [e["code"] for e in executed] == [c.source for c in code]
    assert all(e["status"] == "ok" for e in executed)


def test_cli_run_text_config(run_home, demo_home):
    args = ["run", "--config", demo_home / "demo" / "text_lora.yaml"]
    for key, value in FAST_TEXT.items():
        args += ["-p", key, json.dumps(value)]
    res = lora_cli(*args, home=run_home)
    assert res.returncode == 0, res.stderr
    record = Path(re.search(r"^record: (.+)$", res.stdout, re.M).group(1))
    assert_sealed(record, "succeeded")
    assert (record / "adapter" / "codes" / "adapter_config.json").is_file()
    assert (record / "samples" / "completions.json").is_file()


def test_a_run_continued_from_an_adapter_pins_it_and_lineage_finds_it(run_home, demo_home):
    """``init_adapter`` (kohya's ``network_weights``): the adapter a run starts from is pinned
    by sha256 as an input of the manifest, stored in the snapshot store and laid out with the
    run's inputs; ``lora audit lineage ADAPTER`` finds both the run that made it and the run
    that continued from it. A run without one pins none (the twin)."""
    first = run_config(demo_home / "demo" / "text_lora.yaml", FAST_TEXT, home=run_home)
    deps = {d["name"] for d in load_manifest(first.path)["predicate"]["buildDefinition"][
        "resolvedDependencies"]}
    assert "init_adapter" not in deps
    adapter = first.path / "adapter" / "codes"
    second = run_config(demo_home / "demo" / "text_lora.yaml",
                        {**FAST_TEXT, "init_adapter": str(adapter)}, home=run_home)
    manifest = load_manifest(second.path)
    deps = {d["name"]: d for d in manifest["predicate"]["buildDefinition"][
        "resolvedDependencies"]}
    from lora_kernel.common.digests import path_sha256
    assert deps["init_adapter"]["digest"]["sha256"] == path_sha256(adapter)
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["snapshot"]["init_adapter_sha256"] == path_sha256(adapter)
    assert "/inputs/init_adapter" in extra["parameters"]["overrides"]["init_adapter"]
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "lineage",
                          str(adapter)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert first.run_id in res.stdout and second.run_id in res.stdout


def test_a_plain_notebooks_own_numbers_never_crash_lora_run(run_home, tmp_path):
    """A plain notebook reports steps but no losses (or losses that are not numbers): lora run
    prints its record and exits 0 (it crashed with KeyError: 'first_loss' after sealing)."""
    nb = write_notebook(tmp_path / "own.ipynb", "result_path = ''",
                        "import json\njson.dump({'steps': 3, 'final_loss': 'low'}, "
                        "open(result_path, 'w'))")
    res = lora_cli("run", nb, home=run_home)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and re.search(r"^run \S+ succeeded in", res.stdout, re.M)
    assert "loss" not in res.stdout.splitlines()[0]  # no numbers made up for it


def test_a_dataset_swapped_after_the_pin_seals_a_failed_record_naming_both(
        run_home, demo_home, tmp_path):
    """User code changes the dataset between the pin and the training.

    * In the user's own folder: the run trains on the pinned snapshot anyway (laid out from
      the content-addressed store), so the record succeeds and its claim is true — the
      training read the pinned dataset version.
    * In the laid-out snapshot itself (a local-mode user owns the work folder): the training
      reports the version it read, sealing compares it with the pinned one and the record is
      failed, naming both; its manifest keeps the pinned version.
    The same notebook without a swap succeeds (the honest twin)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_home / "demo" / "datasets" / "image", data)
    config = tmp_path / "cfg.yaml"
    raw = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    raw.update({"base_model": str((demo_home / "demo" / raw["base_model"]).resolve()),
                "train_data_dir": str(data), "metadata_path": str(data / "metadata.csv"),
                **FAST_IMAGE})
    config.write_text(yaml.safe_dump(raw))
    params = "config_path = ''\noverrides = {}\nresult_path = ''\nswap = ''"
    swap = ("import pathlib\n"
            f"where = {{'original': pathlib.Path({str(data)!r}), 'snapshot': "
            "pathlib.Path(config_path).parent.parent / 'dataset'}.get(swap)\n"
            "if where:\n    p = where / 'metadata.csv'\n    text = p.read_text()\n"
            "    p.unlink()\n    p.write_text(text.replace('enclave style', 'other style'))")
    train = ("import lora_kernel.notebook as lk\ncfg = lk.prepare_config(config_path, "
             "overrides, task='image')\nresult = lk.run_training(cfg)\n"
             "lk.write_result(result, result_path)")
    nb = write_notebook(tmp_path / "swap.ipynb", params, swap, train)
    honest = lora_cli("run", nb, "-p", "config_path", config, home=run_home)
    assert honest.returncode == 0, honest.stdout + honest.stderr
    # the user's own notebook around a config: its numbers are self-reported, not "training"
    honest_record = Path(re.search(r"^record: (.+)$", honest.stdout, re.M).group(1))
    honest_meta = load_manifest(honest_record)["predicate"]["runDetails"]["metadata"]
    assert honest_meta["extra"]["kind"] == "notebook"
    pinned = honest_meta["extra"]["snapshot"]["dataset_version"]

    res = lora_cli("run", nb, "-p", "config_path", config, "-p", "swap", "original",
                   home=run_home)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "other style" in (data / "metadata.csv").read_text()  # the swap happened
    record = Path(re.search(r"^record: (.+)$", res.stdout, re.M).group(1))
    summary = json.loads((record / "training_summary.json").read_text())
    assert summary["dataset_version"] == pinned  # trained on what was pinned

    (data / "metadata.csv").write_text((data / "metadata.csv").read_text().replace(
        "other style", "enclave style"))
    res = lora_cli("run", nb, "-p", "config_path", config, "-p", "swap", "snapshot",
                   home=run_home)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "other inputs than were pinned" in res.stderr and "dataset version" in res.stderr
    record = Path(re.search(r"recorded in (\S+)", res.stderr).group(1))
    manifest = assert_sealed(record, "failed")
    meta = manifest["predicate"]["runDetails"]["metadata"]
    assert f"pinned {pinned}" in meta["extra"]["error"] and "the training read ds-" in \
        meta["extra"]["error"]


def test_failing_notebook_leaves_failed_record(run_home, tmp_path):
    nb = write_notebook(tmp_path / "boom.ipynb", "x = 1", "print('before', x)",
                        "raise RuntimeError(f'boom {x}')", "print('never')")
    (tmp_path / "params.yaml").write_text("x: 7\n")
    res = lora_cli("run", nb, "-f", tmp_path / "params.yaml", home=run_home)
    assert res.returncode == 7, res.stderr
    record = Path(re.search(r"recorded in (\S+)", res.stderr).group(1))
    assert "RuntimeError" in res.stderr and "boom 7" in res.stderr
    manifest = assert_sealed(record, "failed")
    assert "RuntimeError" in manifest["predicate"]["runDetails"]["metadata"]["extra"]["error"]
    executed = nbformat.read(str(record / "executed.ipynb"), as_version=4)
    outputs = [c.outputs for c in executed.cells if c.cell_type == "code"]
    assert outputs[2][0]["text"] == "before 7\n"  # [parameters, injected, print, raise, never]
    assert outputs[3][0]["output_type"] == "error" and outputs[3][0]["evalue"] == "boom 7"
    assert outputs[4] == []

    # the same through the API: RunFailed carries the record
    with pytest.raises(RunFailed) as info:
        run_notebook(nb, {"x": 8}, home=run_home)
    assert info.value.exit_code == 7 and info.value.record.status == "failed"
    assert_sealed(info.value.record.path, "failed")


def test_sigkill_of_the_kernel_mid_training_is_recorded(run_home, demo_home):
    proc = lora_cli("run", "--config", demo_home / "demo" / "image_lora.yaml",
                    "-p", "max_train_steps", "5000", "-p", "save_steps", "0",
                    home=run_home, wait=False)
    try:
        work = run_home / "work"
        deadline = time.monotonic() + 180
        while not list(work.glob("*/output/tb")) and time.monotonic() < deadline:
            time.sleep(0.3)  # the TensorBoard folder appears as the training loop starts
        kernel, = find_processes(lambda p, env: env.get("LORA_HOME") == str(run_home)
                                 and env.get("LORA_RUN_ID") and "-f" in p.info["cmdline"])
        time.sleep(1.0)
        os.kill(kernel.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    record = Path(re.search(r"recorded in (\S+)", err).group(1))
    manifest = assert_sealed(record, "failed")
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert "DeadKernelError" in extra["error"]
    assert Path(extra["work_dir"]).is_dir()  # checkpoints are kept for a resume
    nb = nbformat.read(str(record / "executed.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(o.get("text", "") for o in code[2].outputs)  # one stream or several
    assert "config:" in printed  # ran before the kill
    assert code[-1].outputs == []  # never reached
    events = [json.loads(x) for x in (record / "events.jsonl").read_text().splitlines()]
    assert [e["code"] for e in events if e["type"] == "execute"] == [c.source for c in code[:3]]


def test_sigkill_of_the_executor_is_recorded_and_the_kernel_stopped(run_home, tmp_path):
    import psutil

    proc = start_sleeping_run(run_home, tmp_path)
    try:
        executor, = find_processes(lambda p, env: p.ppid() == proc.pid
                                   and p.info["cmdline"][-1:] == ["run"])
        kernel, = find_processes(lambda p, env: env.get("LORA_HOME") == str(run_home)
                                 and "-f" in p.info["cmdline"])
        deadline = time.monotonic() + 60
        while not _started(run_home) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(executor.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert "executor killed by signal SIGKILL" in err
    assert not psutil.pid_exists(kernel.pid) or kernel.status() == psutil.STATUS_ZOMBIE
    record = Path(re.search(r"recorded in (\S+)", err).group(1))
    assert_sealed(record, "failed")
    nb_out = nbformat.read(str(record / "executed.ipynb"), as_version=4)
    printed, = [c for c in nb_out.cells if c.source == "print('started')"]
    assert printed.outputs[0]["text"] == "started\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_of_lora_run_records_an_interrupted_run(run_home, tmp_path, sig):
    """SIGTERM, or SIGHUP when the terminal or SSH session closes: the run is stopped and
    sealed as failed, never orphaned."""
    import psutil

    proc = start_sleeping_run(run_home, tmp_path)
    try:
        kernel = wait_for_kernel(run_home)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert "interrupted" in err
    assert not psutil.pid_exists(kernel.pid) or kernel.status() == psutil.STATUS_ZOMBIE
    assert_sealed(Path(re.search(r"recorded in (\S+)", err).group(1)), "failed")


def _started(home: Path) -> bool:
    """Whether the sleep notebook's ``print`` output was saved into the executed notebook."""
    for path in (home / "work").glob("*/executed.ipynb"):
        try:
            nb = json.loads(path.read_text())
        except (OSError, ValueError):  # being written
            return False
        return any("started\n" in "".join(o.get("text", "")) for c in nb["cells"]
                   for o in c.get("outputs", []))
    return False


def test_nbval_runs_the_notebooks_as_they_are(tmp_path, demo_home, lora_kernel_prefix):
    """``pytest --nbval-lax notebooks/``: the notebooks, unchanged, on the demo assets of a
    home whose demo configs train only a few steps."""
    import yaml

    home = tmp_path / "home"
    shutil.copytree(demo_home / "demo", home / "demo",
                    ignore=shutil.ignore_patterns("output"))
    for name, fast in (("image_lora.yaml", FAST_IMAGE), ("text_lora.yaml", FAST_TEXT)):
        cfg = home / "demo" / name
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), **fast}))
    env = dict(os.environ, LORA_HOME=str(home),
               JUPYTER_PATH=str(lora_kernel_prefix / "share" / "jupyter"))
    res = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider",
                          "-q", str(REPO / "notebooks")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
    assert (home / "demo" / "output" / "image" / "enclave_style.safetensors").is_file()
    assert (home / "demo" / "output" / "text" / "codes" / "adapter_config.json").is_file()


def test_training_notebook_without_its_config_is_refused_before_it_runs(run_home, demo_home):
    """`lora run NOTEBOOK -p max_train_steps 2` used to train the demo config outside the
    record; a training notebook is only run with its inputs pinned (the must-work twin is
    test_image_run_record_is_complete)."""
    res = lora_cli("run", REPO / "notebooks" / "train_image_lora.ipynb",
                   "-p", "max_train_steps", "2", home=run_home)
    assert res.returncode == 2, res.stderr
    assert "lora run --config" in res.stderr and "params.yaml" in res.stderr
    runs = state_of(run_home) / "runs"
    assert not runs.is_dir() or not [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert not (run_home / "work").exists() or not any((run_home / "work").iterdir())


def _gone(pid: int, timeout: float = 20) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def test_kill9_of_lora_run_ends_the_kernel_and_recover_seals_the_run(run_home, tmp_path):
    proc = start_sleeping_run(run_home, tmp_path)
    try:
        kernel = wait_for_kernel(run_home)
        executor, = find_processes(lambda p, env: p.ppid() == proc.pid
                                   and p.info["cmdline"][-1:] == ["run"])
        proc.kill()  # SIGKILL: no handler, no clean-up in lora run
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(executor.pid) and _gone(kernel.pid)  # nothing trains on without a record
    active = list((state_of(run_home) / "runs" / ".active").glob("*.json"))
    assert len(active) == 1
    run_id = active[0].stem
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "recover"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"recovered {run_id}" in res.stdout, res.stderr
    record = state_of(run_home) / "runs" / run_id
    manifest = assert_sealed(record, "failed")
    assert "runner stopped before sealing" in \
        manifest["predicate"]["runDetails"]["metadata"]["extra"]["error"]
    nb_out = nbformat.read(str(record / "executed.ipynb"), as_version=4)
    printed, = [c for c in nb_out.cells if c.source == "print('started')"]
    assert printed.outputs[0]["text"] == "started\n"  # the evidence up to the kill is kept
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "verify", "--all"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "1 run(s)" in res.stdout, res.stdout + res.stderr
    again = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "recover"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to recover" in again.stdout


def test_the_kernel_environment_never_names_the_state_directory(run_home, tmp_path):
    state = str(state_of(run_home))
    nb = write_notebook(tmp_path / "env.ipynb", "x = 1",
                        "import json, os\n"
                        f"print(json.dumps({{'state': any({state!r} in v"
                        " for v in os.environ.values()),"
                        " 'home': os.environ.get('LORA_HOME'),"
                        " 'run': os.environ.get('LORA_RUN_ID')}))")
    rec = run_notebook(nb, {}, home=run_home)
    executed = nbformat.read(str(rec.path / "executed.ipynb"), as_version=4)
    out = json.loads(executed.cells[-1].outputs[0]["text"])
    assert out == {"state": False, "home": str(run_home), "run": rec.run_id}
    assert load_manifest(rec.path)["predicate"]["runDetails"]["metadata"]["extra"]["kind"] \
        == "notebook"


def test_lora_run_resume_continues_an_interrupted_run_into_a_new_record(run_home, demo_home):
    """SIGTERM after a checkpoint: the run is recorded as failed with its work folder; `lora
    run --resume RUN` continues it from the latest checkpoint there into a new succeeded
    record that names it, with the full step count. Resuming that succeeded run is refused."""
    from lora_kernel.training.loop import checkpoint_step, latest_checkpoint

    args = ["run", "--config", demo_home / "demo" / "image_lora.yaml"]
    for key, value in {**FAST_IMAGE, "max_train_steps": 40, "save_steps": 2}.items():
        args += ["-p", key, json.dumps(value)]
    proc = lora_cli(*args, home=run_home, wait=False)
    try:
        deadline = time.monotonic() + 240
        while not list((run_home / "work").glob("*/output/checkpoints/checkpoint-2")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7 and "interrupted" in err, err
    old = Path(re.search(r"recorded in (\S+)", err).group(1))
    old_extra = assert_sealed(old, "failed")["predicate"]["runDetails"]["metadata"]["extra"]
    ckpt = latest_checkpoint(Path(old_extra["work_dir"]) / "output")
    step = checkpoint_step(ckpt)
    assert 2 <= step < 40

    res = lora_cli("run", "--resume", old.name, home=run_home)
    assert res.returncode == 0, res.stderr
    assert f"resuming at step {step}/40" in res.stdout  # the progress lines (not a terminal)
    record = Path(re.search(r"^record: (.+)$", res.stdout, re.M).group(1))
    assert record.name != old.name
    manifest = assert_sealed(record, "succeeded")
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["resumed_from_run"] == old.name
    assert extra["resumed_from_checkpoint"]["checkpoint"] == str(ckpt)
    assert extra["resumed_from_checkpoint"]["step"] == step
    assert extra["steps"] == 40 and len(extra["losses"]) == 40
    assert extra["parameters"]["resume_from"] == str(ckpt)
    config = manifest["predicate"]["buildDefinition"]["externalParameters"]["config"]
    assert config["max_train_steps"] == 40 and config["output_dir"].startswith(
        str(run_home / "work" / record.name))
    assert Path(old_extra["work_dir"]).is_dir()  # the failed run's evidence stays

    again = lora_cli("run", "--resume", record.name, home=run_home)
    assert again.returncode == 2 and "succeeded: there is nothing to resume" in again.stderr
    runs = [p for p in (state_of(run_home) / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 2


# -- a recorded run runs nothing from the requester's home (issue 20) -----------------------
EVIL_STARTUP = "open({marker!r}, 'a').write('{what}\\n')\n"


def _plant_home_code(home: Path, markers: Path) -> None:
    """What a hostile trainer leaves in their home: an IPython startup file and kernel config
    in their IPython profile (``exec_lines``, ``exec_files``), each appending its name to
    ``markers``."""
    profile = home / ".ipython" / "profile_default"
    (profile / "startup").mkdir(parents=True)
    (profile / "startup" / "00-evil.py").write_text(
        EVIL_STARTUP.format(marker=str(markers), what="startup"))
    line = EVIL_STARTUP.format(marker=str(markers), what="{}").strip()
    (profile / "ipython_kernel_config.py").write_text(
        f"c.InteractiveShellApp.exec_lines = [{line.format('profile-config')!r}]\n")
    evil = home / "evil.py"
    evil.write_text(line.format("exec-file") + "\n")
    (profile / "ipython_config.py").write_text(
        f"c.InteractiveShellApp.exec_files = [{str(evil)!r}]\n")


def test_startup_files_and_kernel_config_in_the_home_never_run_in_a_recorded_run(
        run_home, tmp_path, monkeypatch, lora_kernel_prefix):
    """IPython startup files and kernel config in the requester's home ran before the
    notebook's first cell and the record showed nothing of it. A recorded run's kernel gets a
    fresh IPython/Jupyter config and data folder in its work folder (steps.cleanenv), and is
    not dumpable (no ptrace by the user's processes). The paired case: the same home's files
    do run in an ordinary kernel of the same kernelspec — the attack is real."""
    from jupyter_client.manager import start_new_kernel

    user_home = tmp_path / "userhome"
    user_home.mkdir()
    markers = tmp_path / "markers.txt"
    _plant_home_code(user_home, markers)
    monkeypatch.setenv("HOME", str(user_home))
    for var in ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    nb = write_notebook(tmp_path / "probe.ipynb", "x = 1",
                        "import json, os\nfrom lora_kernel.common.process import is_dumpable\n"
                        "print(json.dumps({'dumpable': is_dumpable(), "
                        "'ipythondir': os.environ.get('IPYTHONDIR'), "
                        "'cache': os.environ.get('LORA_CACHE_DIR')}))")
    rec = run_notebook(nb, {}, home=run_home)
    assert rec.status == "succeeded"
    assert not markers.exists(), markers.read_text()
    executed = nbformat.read(str(rec.path / "executed.ipynb"), as_version=4)
    out = json.loads(executed.cells[-1].outputs[0]["text"])
    work = run_home / "work" / rec.run_id
    assert out == {"dumpable": False, "ipythondir": str(work / ".env" / "ipython"),
                   "cache": str(work / ".env" / "cache")}

    km, kc = start_new_kernel(kernel_name="lora", cwd=str(tmp_path))  # not a recorded run
    try:
        kc.execute_interactive("pass", timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert set(markers.read_text().split()) == {"startup", "profile-config", "exec-file"}


def test_a_poisoned_latent_cache_in_the_home_is_not_what_a_recorded_run_trains_on(
        run_home, demo_home, tmp_path):
    """The latent cache in ``$LORA_HOME/cache`` is keyed by the claimed dataset version, so a
    trainer could edit it and get records claiming dataset X for training on something else.
    ``lora train`` (not a record) still uses it — and reads the poisoned latents; a recorded
    run never does: its cache is its own, in its work folder, and its losses equal a run's
    from a home with no cache at all."""
    from safetensors.torch import load_file, save_file

    cfg = demo_home / "demo" / "image_lora.yaml"
    fast = [a for k, v in FAST_IMAGE.items() for a in ("-p", k, json.dumps(v))]
    first = lora_cli("train", "--config", cfg, *fast, "-p", "output_dir",
                     tmp_path / "o1", home=run_home)
    assert first.returncode == 0, first.stderr
    (cache,) = (run_home / "cache").glob("sd-*.safetensors")
    tensors = load_file(str(cache))
    save_file({k: (v * 0 + 3.0 if k.startswith("latent") else v) for k, v in tensors.items()},
              str(cache), metadata={"poisoned": "yes"})
    again = lora_cli("train", "--config", cfg, *fast, "-p", "output_dir", tmp_path / "o2",
                     home=run_home)
    assert again.returncode == 0, again.stderr
    poisoned = json.loads((tmp_path / "o2" / "training_summary.json").read_text())
    assert poisoned["cache_hit"] is True  # the unrecorded path reads what is in the home

    rec = run_config(cfg, FAST_IMAGE, home=run_home)
    extra = load_manifest(rec.path)["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["cache_hit"] is False and extra["kind"] == "training"
    clean_home = tmp_path / "clean"
    clean_home.mkdir()
    clean = run_config(cfg, FAST_IMAGE, home=clean_home)
    clean_extra = load_manifest(clean.path)["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["losses"] == clean_extra["losses"] != poisoned["losses"]


@pytest.fixture
def small_state(tmp_path, monkeypatch):
    """A 1.3 MB tmpfs as the state store (root only: it mounts one)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the state store needs root")
    mnt = tmp_path / "small-state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mnt)], check=True)
    monkeypatch.setenv("LORA_STATE", str(mnt))
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _writer(tmp_path: Path, nbytes: int) -> Path:
    return write_notebook(tmp_path / f"w{nbytes}.ipynb", "x = 1",
                          "import os\nos.makedirs('output', exist_ok=True)\n"
                          f"open('output/adapter.safetensors', 'wb').write(b'7' * {nbytes})")


@pytest.mark.root
def test_a_full_state_store_never_hangs_lora_run(run_home, tmp_path, small_state):
    """Sealing ran out of space and `lora run` hung forever (the collector blocked on a pipe
    nobody read): no record, no ledger entry, and `verify --all` said OK. Now the run ends
    failed with a minimal record written from the run's reserved space, exit 7, naming the
    cause; the paired small run on the same store succeeds; and a store with too little
    space left refuses to start a run (exit 2)."""
    small = lora_cli("run", _writer(tmp_path, 10_000), home=run_home)
    assert small.returncode == 0, small.stdout + small.stderr
    big = lora_cli("run", _writer(tmp_path, 1_200_000), home=run_home)
    assert big.returncode == 7, big.stdout + big.stderr
    assert "state store is full" in big.stderr and "Traceback" not in big.stderr
    record = Path(re.search(r"recorded in (\S+)", big.stderr).group(1))
    manifest = assert_sealed(record, "failed")
    assert "ENOSPC" in manifest["predicate"]["runDetails"]["metadata"]["extra"]["error"]
    assert not list((small_state / "runs" / ".active").iterdir())
    verify = subprocess.run([sys.executable, "-m", "lora_kernel.cli", "audit", "verify",
                             "--all"], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    filler = small_state / "filler"
    free = os.statvfs(small_state).f_bavail * os.statvfs(small_state).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 100_000))
    refused = lora_cli("run", _writer(tmp_path, 10), home=run_home)
    assert refused.returncode == 2 and "a run needs at least" in refused.stderr, refused.stderr
