"""Habits of papermill and kohya users: `lora run NOTEBOOK -p config_path ...`, config keys in
params.yaml, papermill directly with a JSON `overrides` string (and the notice that such a run
is not recorded), `lora train` into an output_dir that holds a run (--overwrite / --resume),
and the progress `lora run` shows. Each refusal is paired with the case that must work.

The quick tests need no kernel; those that train or start kernels are ``slow``.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from lora_kernel.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
IMAGE_NB = REPO / "notebooks" / "train_image_lora.ipynb"
FAST = {"max_train_steps": 2, "sample_steps": 1, "save_steps": 0,
        "sample_prompts": ["a red circle in enclave style"]}


def demo_config(demo_home: Path, folder: Path, **changes) -> Path:
    """The demo image config with absolute paths and ``changes``, written into ``folder``."""
    data = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    for key in ("train_data_dir", "metadata_path", "base_model"):
        data[key] = str((demo_home / "demo" / data[key]).resolve())
    data.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- lora run NOTEBOOK: parameters vs config overrides (no kernel) ----------------------------
def test_p_keys_the_notebook_declares_are_parameters_the_rest_overrides(tmp_path, monkeypatch):
    from lora_kernel.cli.run import notebook_parameters

    monkeypatch.chdir(tmp_path)
    params = notebook_parameters(IMAGE_NB, None, [["config_path", "my.yaml"],
                                                  ["learning_rate", "0.002"],
                                                  ["overrides", '{"seed": 3}']])
    assert params == {"config_path": str(tmp_path / "my.yaml"),  # relative: the cwd
                      "overrides": {"learning_rate": 0.002, "seed": 3}}


def test_params_file_config_keys_are_overrides(tmp_path):
    from lora_kernel.cli.run import notebook_parameters

    (tmp_path / "params.yaml").write_text("config_path: my.yaml\nlearning_rate: 0.002\n"
                                          "overrides: {max_train_steps: 3, seed: 1}\n")
    params = notebook_parameters(IMAGE_NB, str(tmp_path / "params.yaml"),
                                 [["seed", "5"]])
    assert params == {"config_path": str(tmp_path / "my.yaml"),  # relative: the file's folder
                      "overrides": {"max_train_steps": 3, "seed": 5, "learning_rate": 0.002}}


def test_params_file_key_that_is_neither_is_refused(tmp_path):
    from lora_kernel.cli.run import notebook_parameters

    (tmp_path / "params.yaml").write_text("config_path: my.yaml\nlerning_rate: 0.002\n")
    with pytest.raises(ConfigError) as info:
        notebook_parameters(IMAGE_NB, str(tmp_path / "params.yaml"), [])
    msg = str(info.value)
    assert "params.yaml" in msg and "'lerning_rate'" in msg and "did you mean 'learning_rate'" \
        in msg
    with pytest.raises(ConfigError, match="did you mean 'config_path'"):
        notebook_parameters(IMAGE_NB, None, [["config_pth", "my.yaml"]])


def test_a_notebook_without_overrides_takes_no_config_keys(tmp_path):
    from lora_kernel.cli.run import notebook_parameters

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "lora", "display_name": "LoRA (guarded)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(tmp_path / "plain.ipynb"))
    assert notebook_parameters(tmp_path / "plain.ipynb", None, [["x", "7"]]) == {"x": 7}
    with pytest.raises(ConfigError, match="neither a parameter of plain.ipynb"):
        notebook_parameters(tmp_path / "plain.ipynb", None, [["learning_rate", "0.1"]])


# -- papermill directly: overrides as a string, the "not recorded" notice (no kernel) ----------
def test_prepare_config_takes_overrides_as_a_json_or_yaml_string(demo_home):
    import lora_kernel.notebook as lk

    cfg_path = demo_home / "demo" / "image_lora.yaml"
    cfg = lk.prepare_config(cfg_path, '{"learning_rate": 0.002}', task="image")
    assert cfg.learning_rate == 0.002
    assert lk.prepare_config(cfg_path, "lora_rank: 4", task="image").lora_rank == 4
    assert lk.prepare_config(cfg_path, "", task="image").learning_rate == 3e-3
    with pytest.raises(ConfigError, match="key 'overrides'"):
        lk.prepare_config(cfg_path, "[1, 2]", task="image")
    with pytest.raises(ConfigError, match="unknown key"):
        lk.prepare_config(cfg_path, '{"lerning_rate": 0.002}', task="image")


def test_run_notice_says_a_direct_run_is_not_recorded_and_how_to_record_it(
        tmp_path, monkeypatch, capsys):
    import lora_kernel.notebook as lk

    monkeypatch.delenv("LORA_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    lk.run_notice("my.yaml", '{"learning_rate": 0.002, "output_dir": "x"}', task="image")
    err = capsys.readouterr().err
    assert err.startswith("NOT RECORDED")
    assert f"lora run --config {tmp_path / 'my.yaml'} -p learning_rate 0.002" in err
    assert "output_dir" not in err  # lora run trains in its own work folder

    monkeypatch.setenv("LORA_RUN_ID", "20260101T000000Z-abcdef")
    lk.run_notice("my.yaml", {}, task="image")
    out = capsys.readouterr()
    assert "NOT RECORDED" not in out.out + out.err
    assert out.out.startswith("recorded run 20260101T000000Z-abcdef")


def test_training_notebooks_call_run_notice_first_and_pass_resume_from():
    for name in ("train_image_lora.ipynb", "train_text_lora.ipynb"):
        nb = nbformat.read(str(REPO / "notebooks" / name), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert 'resume_from = ""' in code[0].source
        calls = [line for line in code[1].source.splitlines() if line.startswith("lk.")
                 or "= lk." in line]
        assert calls[0].startswith("lk.run_notice(config_path, overrides")
        assert any("run_training(cfg, resume=resume_from)" in c.source for c in code)


# -- progress: records -> terminal bar or periodic lines (no kernel) --------------------------
def _records(total=20, start=0) -> bytes:
    recs = [{"event": "cell", "done": 0, "cells": 9},
            {"event": "train_start", "step": start, "total": total, "task": "image"}]
    recs += [{"event": "step", "step": i, "total": total, "start": start, "loss": 1 / i,
              "lr": 1e-3, "elapsed": (i - start) * 0.5} for i in range(start + 1, total + 1)]
    recs += [{"event": "train_end", "step": total, "total": total}, {"event": "done"}]
    return b"".join(json.dumps(r).encode() + b"\n" for r in recs)


def test_progress_without_a_terminal_is_a_line_per_tenth():
    from lora_kernel.cli.run import ProgressView

    out = io.StringIO()
    view = ProgressView(out, live=False)
    data = _records(20) + b"a line that is no record\n"
    for i in range(0, len(data), 29):  # records split across chunks
        view.feed(data[i:i + 29])
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "training image LoRA: 20 steps"
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == [f"{n}/20" for n in range(2, 21, 2)]
    assert steps[0] == ("step 2/20 (10%)  loss 0.5000  2.00 it/s  elapsed 0:00:01  "
                        "ETA 0:00:09")
    assert lines[-1] == "a line that is no record"
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_with_loss_rate_and_eta():
    from lora_kernel.cli.run import ProgressView

    out = io.StringIO()
    view = ProgressView(out, live=True)
    view.feed(_records(20, start=6))
    view.close()
    text = out.getvalue()
    assert "Executing" in text and "cell" in text
    assert re.search(r"image LoRA: 100%.*20/20 \[.*<.*step/s, loss=0\.0500\]", text), text


def test_executor_relays_only_clean_training_records(tmp_path, capsys):
    from lora_kernel.steps import executor
    from lora_kernel.training.loop import PROGRESS_ENV, ProgressFile

    assert executor.PROGRESS_ENV == PROGRESS_ENV
    path = tmp_path / "progress.jsonl"
    relay = executor.ProgressRelay(path)
    records = ProgressFile(str(path))
    records.write("train_start", step=0, total=2, task="image", resumed_from=None)
    records.write("step", step=1, total=2, start=0, loss=0.5, lr=1e-3, elapsed=0.1,
                  extra="\x1b[2J")
    with open(path, "a") as fh:
        fh.write("not json\n" + json.dumps({"event": "rm -rf", "step": 1}) + "\n"
                 + json.dumps({"event": "step", "step": "2", "loss": True}) + "\n")
    records.close()
    relay.close()
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert got == [{"event": "train_start", "step": 0, "total": 2, "task": "image"},
                   {"event": "step", "step": 1, "total": 2, "start": 0, "loss": 0.5,
                    "lr": 1e-3, "elapsed": 0.1},
                   {"event": "step"},
                   {"event": "done"}]


# -- lora train and output_dir (trains: slow) ---------------------------------------------------
def _lora(*argv) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "lora_kernel.cli", *map(str, argv)],
                         capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.slow
def test_lora_train_into_a_run_refuses_overwrites_or_resumes(demo_home, tmp_path):
    out = tmp_path / "out"
    cfg = demo_config(demo_home, tmp_path, output_dir=str(out), max_train_steps=2,
                      save_steps=1)
    common = ["--quiet", "--no-samples", "--home", demo_home]
    code, text = _lora("train", "--config", cfg, *common)
    assert code == 0, text
    (out / "notes.txt").write_text("mine")

    code, text = _lora("train", "--config", cfg, *common)  # again: refused, nothing touched
    assert code == 2 and "already holds a run (checkpoints/" in text and "--overwrite" in text
    assert "Traceback" not in text
    before = (out / "enclave_style.safetensors").stat().st_mtime_ns

    code, text = _lora("train", "--config", cfg, "--resume", *common)  # finished: nothing left
    assert code == 2 and "nothing to resume" in text and "raise max_train_steps" in text
    assert (out / "enclave_style.safetensors").stat().st_mtime_ns == before

    code, text = _lora("train", "--config", cfg, "--resume", "-p", "max_train_steps", "3",
                       *common)  # the fix: train longer
    assert code == 0 and "resumed from" in text and "trained 3 steps" in text, text

    (out / "tb" / "stale").write_text("x")
    code, text = _lora("train", "--config", cfg, "--overwrite", *common)
    assert code == 0, text
    assert not (out / "tb" / "stale").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-1", "checkpoint-2"]


# -- recorded and direct notebook runs (start kernels: slow) -----------------------------------
@pytest.fixture
def kernel_env(tmp_path, lora_kernel_prefix):
    """The environment of a `lora` / papermill subprocess: a fresh working home, the test's
    ``lora`` kernelspec first on ``JUPYTER_PATH``, no ``LORA_RUN_ID``."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORA_RUN_ID"}
    env.update(LORA_HOME=str(home),
               JUPYTER_PATH=str(lora_kernel_prefix / "share" / "jupyter"))
    return env


@pytest.mark.slow
def test_lora_run_notebook_with_p_config_path_and_params_file_config_keys(
        demo_home, tmp_path, kernel_env):
    """`lora run NOTEBOOK -p config_path rel.yaml` with config keys in params.yaml and on the
    command line; not a terminal, so the progress comes as periodic lines on stdout."""
    demo_config(demo_home, tmp_path / "cfgs", **FAST)
    (tmp_path / "params.yaml").write_text("learning_rate: 0.002\n")
    res = subprocess.run(
        [sys.executable, "-m", "lora_kernel.cli", "run", IMAGE_NB, "-f", "params.yaml",
         "-p", "config_path", "cfgs/my.yaml", "-p", "max_train_steps", "3"],
        cwd=tmp_path, env=kernel_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "training image LoRA: 3 steps" in res.stdout
    assert re.search(r"^step 3/3 \(100%\)  loss \d\.\d{4}  [\d.]+ it/s .* ETA 0:00:00$",
                     res.stdout, re.M), res.stdout
    record = Path(re.search(r"^record: (.+)$", res.stdout, re.M).group(1))
    manifest = json.loads((record / "manifest.json").read_text())
    config = manifest["predicate"]["buildDefinition"]["externalParameters"]["config"]
    assert config["learning_rate"] == 0.002 and config["max_train_steps"] == 3
    extra = manifest["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["config_path"] == str(tmp_path / "cfgs" / "my.yaml")
    executed = nbformat.read(str(record / "executed.ipynb"), as_version=4)
    first = [c for c in executed.cells if c.cell_type == "code"][2].outputs[0]
    assert first["name"] == "stdout" and first["text"].startswith("recorded run ")


@pytest.mark.slow
def test_papermill_directly_with_a_json_overrides_string(demo_home, tmp_path, kernel_env):
    cfg = demo_config(demo_home, tmp_path, **FAST)
    overrides = json.dumps({"learning_rate": 0.002, "output_dir": str(tmp_path / "out")})
    res = subprocess.run(
        [sys.executable, "-m", "papermill", IMAGE_NB, tmp_path / "out.ipynb", "-k", "lora",
         "-p", "config_path", cfg, "-p", "overrides", overrides],
        env=kernel_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["config"]["learning_rate"] == 0.002
    executed = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    first = [c for c in executed.cells if c.cell_type == "code"][2].outputs[0]
    assert first["name"] == "stderr" and first["text"].startswith("NOT RECORDED")
    assert f"lora run --config {cfg} -p learning_rate 0.002" in first["text"]


def test_a_second_training_on_one_output_dir_is_refused_naming_the_holder(tmp_path):
    """Two trainings on one output_dir would mix checkpoints, adapters and summaries; the
    second is refused while the first holds the folder, and takes it once it is free."""

    from lora_kernel.common.errors import ConfigError
    from lora_kernel.training.train import output_dir_lock

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lora_kernel.training.train import "
         "output_dir_lock\nwith output_dir_lock(sys.argv[1]):\n print('held', flush=True)\n"
         " time.sleep(60)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="in use by a training still running") as err:
            with output_dir_lock(out, source="my.yaml"):
                pass
        assert f"pid {holder.pid}" in str(err.value) and "my.yaml" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with output_dir_lock(out):  # the holder is gone (killed): the folder is free again
        with pytest.raises(ConfigError):  # and held by us now, even from this process
            with output_dir_lock(out):
                pass
