"""Run habits: parameters files, output folders that hold a run, resuming."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exit_cases import Case

REPO = Path(__file__).resolve().parents[2]


def _params_unknown_key(c: Case) -> list:
    (c.tmp / "params.yaml").write_text(f"config_path: {c.config()}\nlerning_rate: 0.002\n")
    return ["run", REPO / "notebooks" / "train_image_lora.ipynb", "-f", c.tmp / "params.yaml",
            "--home", c.tmp / "home"]


def _output_dir_holds_a_run(c: Case) -> list:
    out = c.tmp / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "training_summary.json").write_text("{}")
    return ["train", "--config", c.config(output_dir=str(out)), "--home", c.tmp / "home"]


def _resume_finished(c: Case) -> list:
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train

    cfg = c.config(output_dir=str(c.tmp / "out"), max_train_steps=2, save_steps=1)
    train(load_config(cfg), progress=False, home=c.tmp / "home", samples=False,
          log=lambda m: None)
    return ["train", "--config", cfg, "--resume", "--quiet", "--no-samples",
            "--home", c.tmp / "home"]


def _resume_succeeded(c: Case) -> list:
    c.make_run("r1")
    return ["run", "--resume", "r1", "--home", c.tmp / "home"]


def _state_store_full(c: Case) -> list:
    from lora_kernel.trusted import runseal

    # a store with less free space than a run needs to be recorded (the real full disk, a
    # small tmpfs, is in tests/trusted/test_runner.py)
    c.monkeypatch.setattr(runseal, "START_MARGIN_BYTES", 1 << 60)
    (c.tmp / "nb").mkdir()
    return ["run", REPO / "notebooks" / "train_image_lora.ipynb", "-p", "config_path",
            c.config(), "--home", c.tmp / "home"]


def _snapshot_store_full(c: Case) -> list:
    from lora_kernel.trusted import objects

    # less free space than the run's inputs (plus the margin) need in the snapshot store
    c.monkeypatch.setattr(objects, "FREE_MARGIN", 1 << 60)
    return ["run", "--config", c.config(), "--home", c.tmp / "home"]


def _data_show_unknown(c: Case) -> list:
    return ["data", "show", "ds-" + "0" * 32, "--state", c.tmp / "state"]


CASES: dict[str, Callable[[Case], list]] = {
    "`params.yaml` has a key that is neither a parameter nor a config key": _params_unknown_key,
    "`lora train` into an `output_dir` that holds a run": _output_dir_holds_a_run,
    "`lora train --resume` after a finished run": _resume_finished,
    "`lora run --resume` of a run that succeeded": _resume_succeeded,
    "`lora run` when the state store has too little free space to record a run":
        _state_store_full,
    "`lora run` when the snapshot store has too little free space for the run's inputs":
        _snapshot_store_full,
    "`lora data show` of a dataset version the snapshot store does not hold":
        _data_show_unknown,
}
SLOW = {"`lora train --resume` after a finished run"}
