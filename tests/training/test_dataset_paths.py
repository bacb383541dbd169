"""Dataset entries must resolve inside train_data_dir (unless allow_outside_dataset: true).

Each refused case is paired with cases that must work: the same file moved inside the
folder validates, and with ``allow_outside_dataset: true`` the same config validates and
``dataset_digests`` records the file under ``outside:<absolute resolved path>``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config, validate_config
from lora_kernel.training.config import config_keys
from lora_kernel.training.data import dataset_digests, dataset_version

FIX = "or set allow_outside_dataset: true"


@pytest.fixture
def image_setup(tmp_path: Path, demo_home: Path) -> Path:
    """A minimal valid image config (data/a.png) plus an image outside the folder (x.png)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "x.png")
    (data / "metadata.csv").write_text("file_name,text\na.png,a cat\n")
    (tmp_path / "model").symlink_to(demo_home / "demo" / "models" / "tiny-sd")
    cfg = {"train_data_dir": "data", "base_model": "model", "lora_rank": 4,
           "learning_rate": 1e-4, "output_dir": "out", "resolution": 64}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(cfg_path: Path, *names: str) -> Path:
    meta = cfg_path.parent / "data" / "metadata.csv"
    meta.write_text("file_name,text\na.png,a cat\n" + "".join(f"{n},x\n" for n in names))
    return meta


def _refused(cfg_path: Path, line: int, value: str, meta: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    msg = str(err.value)
    data = cfg_path.parent / "data"
    assert err.value.exit_code == 2 and err.value.key == "metadata_path"
    assert str(cfg_path) in msg and str(meta) in msg
    assert f"line {line} of {meta} names {value!r}" in msg
    assert f"fix: move the file into {data}, {FIX}" in msg
    return msg


def _allowed_records_outside(cfg_path: Path, outside: Path) -> dict[str, str]:
    cfg = load_config(cfg_path, {"allow_outside_dataset": True})
    digests = dataset_digests(cfg)
    key = "outside:" + str(outside.resolve())
    assert key in digests
    assert "a.png" in digests and "metadata.csv" in digests  # inside files keep their keys
    assert outside.name not in digests  # no longer passed off as an inside file
    return digests


def test_key_is_declared_boolean_and_defaults_off(image_setup):
    assert "allow_outside_dataset" in config_keys()
    assert load_config(image_setup).allow_outside_dataset is False
    with pytest.raises(ConfigError, match="true or false"):
        load_config(image_setup, {"allow_outside_dataset": "yes"})


def test_dotdot_row_is_refused_and_works_inside_or_when_allowed(image_setup):
    meta = _rows(image_setup, "../x.png")
    msg = _refused(image_setup, 3, "../x.png", meta)
    assert str(image_setup.parent / "x.png") in msg  # says where it resolves to
    _allowed_records_outside(image_setup, image_setup.parent / "x.png")
    # the same file moved inside the folder validates
    shutil.move(image_setup.parent / "x.png", image_setup.parent / "data" / "x.png")
    _rows(image_setup, "x.png")
    assert set(dataset_digests(load_config(image_setup))) == {"a.png", "metadata.csv", "x.png"}


def test_absolute_row_is_refused_and_works_inside_or_when_allowed(image_setup):
    outside = image_setup.parent / "x.png"
    meta = _rows(image_setup, str(outside))
    _refused(image_setup, 3, str(outside), meta)
    _allowed_records_outside(image_setup, outside)
    # an absolute path that lies inside the folder is fine (recorded relative)
    inside = image_setup.parent / "data" / "x.png"
    shutil.move(outside, inside)
    _rows(image_setup, str(inside))
    assert set(dataset_digests(load_config(image_setup))) == {"a.png", "metadata.csv", "x.png"}


def test_symlink_leading_outside_is_refused_and_works_inside_or_when_allowed(image_setup):
    data = image_setup.parent / "data"
    outside = image_setup.parent / "x.png"
    (data / "link.png").symlink_to(outside)
    meta = _rows(image_setup, "link.png")
    _refused(image_setup, 3, "link.png", meta)
    digests = _allowed_records_outside(image_setup, outside)
    assert "link.png" not in digests
    # the same file moved inside the folder (the link now stays inside) validates
    (data / "link.png").unlink()
    shutil.move(outside, data / "x.png")
    (data / "link.png").symlink_to(data / "x.png")
    assert set(dataset_digests(load_config(image_setup))) == {"a.png", "metadata.csv", "x.png"}


def test_symlink_staying_inside_is_accepted(image_setup):
    data = image_setup.parent / "data"
    (data / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(data / "sub" / "b.png")
    (data / "rel.png").symlink_to(Path("sub") / "b.png")  # relative target
    (data / "dirlink").symlink_to(data / "sub", target_is_directory=True)
    _rows(image_setup, "rel.png", "dirlink/b.png", "sub/../a.png")
    digests = dataset_digests(load_config(image_setup))
    assert set(digests) == {"a.png", "metadata.csv", "sub/b.png"}


def test_second_bad_row_is_reported_with_its_line(image_setup):
    meta = _rows(image_setup, "a.png", "../x.png")
    _refused(image_setup, 4, "../x.png", meta)


def test_inside_dataset_version_is_unchanged(image_setup):
    """Inside files keep relative POSIX keys; allowing outside changes nothing for them."""
    data = image_setup.parent / "data"
    (data / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(data / "sub" / "b.png")
    _rows(image_setup, "sub/b.png")
    cfg = load_config(image_setup)
    digests = dataset_digests(cfg)
    assert set(digests) == {"a.png", "metadata.csv", "sub/b.png"}
    allowed = load_config(image_setup, {"allow_outside_dataset": True})
    assert dataset_digests(allowed) == digests
    assert dataset_version(allowed) == dataset_version(cfg)


def test_folder_named_outside_cannot_merge_with_an_outside_file(image_setup):
    data = image_setup.parent / "data"
    outside = image_setup.parent / "x.png"
    clash = data / ("outside:" + str(outside.resolve().parent))
    clash.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(clash / "x.png")
    rel = clash.relative_to(data) / "x.png"
    _rows(image_setup, str(rel), str(outside))
    cfg = load_config(image_setup, {"allow_outside_dataset": True})
    with pytest.raises(ConfigError, match="two dataset files would be recorded as"):
        dataset_digests(cfg)


# -- text datasets ------------------------------------------------------------------------
@pytest.fixture
def text_setup(tmp_path: Path, demo_home: Path) -> Path:
    """A text config over train_data_dir (one inside .jsonl) plus a .jsonl outside it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "x.jsonl").write_text('{"text": "outside"}\n')
    (tmp_path / "lm").symlink_to(demo_home / "demo" / "models" / "tiny-llama")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"task": "text", "train_data_dir": "data",
                                    "base_model": "lm"}))
    return path


def test_text_symlink_leading_outside_is_refused_and_works_inside_or_when_allowed(text_setup):
    data = text_setup.parent / "data"
    outside = text_setup.parent / "x.jsonl"
    (data / "link.jsonl").symlink_to(outside)
    with pytest.raises(ConfigError) as err:
        load_config(text_setup)
    msg = str(err.value)
    assert err.value.exit_code == 2 and err.value.key == "train_data_dir"
    assert str(data / "link.jsonl") in msg and str(outside) in msg
    assert f"fix: move the file into {data}, {FIX}" in msg
    cfg = load_config(text_setup, {"allow_outside_dataset": True})
    digests = dataset_digests(cfg)
    assert set(digests) == {"a.jsonl", "outside:" + str(outside.resolve())}
    # the same file moved inside the folder validates
    (data / "link.jsonl").unlink()
    shutil.move(outside, data / "x.jsonl")
    assert set(dataset_digests(load_config(text_setup))) == {"a.jsonl", "x.jsonl"}


def test_text_metadata_path_outside_train_data_dir(text_setup):
    outside = text_setup.parent / "x.jsonl"
    with pytest.raises(ConfigError, match="allow_outside_dataset: true") as err:
        load_config(text_setup, {"metadata_path": str(outside)})
    assert err.value.key == "metadata_path" and str(outside) in str(err.value)
    cfg = load_config(text_setup, {"metadata_path": str(outside), "allow_outside_dataset": True})
    assert set(dataset_digests(cfg)) == {"outside:" + str(outside.resolve())}


def test_text_symlink_staying_inside_and_metadata_path_alone_are_accepted(text_setup):
    data = text_setup.parent / "data"
    (data / "sub").mkdir()
    (data / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    (data / "b.jsonl").symlink_to(Path("sub") / "b.jsonl")
    assert set(dataset_digests(load_config(text_setup))) == {"a.jsonl", "sub/b.jsonl"}
    # without train_data_dir a metadata_path anywhere is its own folder: nothing is outside
    outside = text_setup.parent / "x.jsonl"
    cfg = validate_config({"task": "text", "metadata_path": str(outside),
                           "base_model": str(text_setup.parent / "lm")})
    assert set(dataset_digests(cfg)) == {"x.jsonl"}


def test_readme_documents_the_key():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    help_text = config_keys()["allow_outside_dataset"]
    assert f"| `allow_outside_dataset` | False | {help_text} |" in readme
