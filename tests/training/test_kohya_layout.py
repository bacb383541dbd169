"""kohya sd-scripts dataset layouts are used as they are: sidecar captions (``<stem>.txt`` /
``<stem>.caption``) and ``N_concept`` repeat folders; the dataset version covers the
captions; ``metadata.jsonl`` (Hugging Face imagefolder) works as ``metadata.csv`` does.
Every refusal is one ConfigError naming the file and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.data import (
    dataset_digests,
    dataset_files,
    dataset_version,
    image_entries,
    image_layout,
    read_image_rows,
)


def _img(path: Path, rgb=(200, 10, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def _cfg(tmp_path: Path, demo_home: Path, **extra) -> Path:
    cfg = {"train_data_dir": "data", "base_model": str(demo_home / "demo" / "models" / "tiny-sd"),
           "lora_rank": 4, "output_dir": "out", "resolution": 64, **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def kohya(tmp_path: Path, demo_home: Path) -> Path:
    """data/10_enclavestyle/{a.png,a.txt,b.png,b.caption} and data/c.png + c.txt."""
    data = tmp_path / "data"
    _img(data / "10_enclavestyle" / "a.png")
    (data / "10_enclavestyle" / "a.txt").write_text("enclavestyle, a red square\n")
    _img(data / "10_enclavestyle" / "b.png", (10, 10, 200))
    (data / "10_enclavestyle" / "b.caption").write_text("enclavestyle, a blue circle")
    _img(data / "c.png", (10, 200, 10))
    (data / "c.txt").write_text("\ufeffa green thing\r\n")
    return _cfg(tmp_path, demo_home)


def test_sidecars_and_repeat_folders_train_as_they_are(kohya):
    cfg = load_config(kohya)
    assert image_layout(cfg) == "kohya"
    entries = {e["image"].name: e for e in image_entries(cfg)}
    assert entries["a.png"]["caption"] == "enclavestyle, a red square"
    assert entries["b.png"]["caption"] == "enclavestyle, a blue circle"
    assert entries["c.png"]["caption"] == "a green thing"  # BOM and CRLF dropped
    assert entries["a.png"]["repeats"] == 10 and entries["a.png"]["concept"] == "enclavestyle"
    assert entries["c.png"]["repeats"] == 1 and entries["c.png"]["concept"] is None
    rows = read_image_rows(cfg)
    assert len(rows) == 21  # 10 + 10 + 1 per epoch
    assert sum(r["image"].name == "a.png" for r in rows) == 10
    from lora_kernel.training.image import load_examples
    assert len(load_examples(cfg)) == 21


def test_captions_are_dataset_files_and_change_the_version(kohya):
    cfg = load_config(kohya)
    keys = set(dataset_digests(cfg))
    assert keys == {"10_enclavestyle/a.png", "10_enclavestyle/a.txt", "10_enclavestyle/b.png",
                    "10_enclavestyle/b.caption", "c.png", "c.txt"}
    assert len(dataset_files(cfg)) == 6
    before = dataset_version(cfg)
    (kohya.parent / "data" / "c.txt").write_text("a green square\n")
    assert dataset_version(load_config(kohya)) != before


def test_renaming_the_repeat_folder_changes_the_version(kohya):
    before = dataset_version(load_config(kohya))
    data = kohya.parent / "data"
    (data / "10_enclavestyle").rename(data / "5_enclavestyle")
    cfg = load_config(kohya)
    assert dataset_version(cfg) != before and len(read_image_rows(cfg)) == 11


def test_image_without_caption_in_a_sidecar_folder_is_named(kohya):
    missing = _img(kohya.parent / "data" / "10_enclavestyle" / "d.png")
    with pytest.raises(ConfigError) as err:
        load_config(kohya)
    msg = str(err.value)
    assert err.value.exit_code == 2 and str(missing) in msg and "d.txt" in msg and "fix:" in msg


def test_caption_not_utf8_is_named(kohya):
    bad = kohya.parent / "data" / "c.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("cp1252"))
    with pytest.raises(ConfigError) as err:
        load_config(kohya)
    msg = str(err.value)
    assert str(bad) in msg and "not UTF-8" in msg and "fix:" in msg


def test_two_caption_files_for_one_image_are_refused(kohya):
    (kohya.parent / "data" / "c.caption").write_text("other")
    with pytest.raises(ConfigError, match=r"c\.png has two caption files"):
        load_config(kohya)


def test_repeat_folders_without_sidecars_use_the_concept_as_caption(tmp_path, demo_home):
    _img(tmp_path / "data" / "3_sks dog" / "x.png")
    _img(tmp_path / "data" / "notes" / "ignored.png")  # not a repeat folder: not in the dataset
    cfg = load_config(_cfg(tmp_path, demo_home))
    rows = read_image_rows(cfg)
    assert [r["caption"] for r in rows] == ["sks dog"] * 3
    assert set(dataset_digests(cfg)) == {"3_sks dog/x.png"}


def test_images_without_any_captions_are_refused_with_the_fixes(tmp_path, demo_home):
    img = _img(tmp_path / "data" / "x.png")
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, demo_home))
    msg = str(err.value)
    assert str(img) in msg and "metadata.csv" in msg and "x.txt" in msg and "lora label" in msg


def test_empty_folder_is_refused(tmp_path, demo_home):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="dataset is empty"):
        load_config(_cfg(tmp_path, demo_home))


def test_metadata_csv_wins_over_sidecars(kohya):
    data = kohya.parent / "data"
    (data / "metadata.csv").write_text("file_name,text\nc.png,from the csv\n")
    cfg = load_config(kohya)
    assert image_layout(cfg) == "csv"
    assert [r["caption"] for r in read_image_rows(cfg)] == ["from the csv"]
    assert set(dataset_digests(cfg)) == {"metadata.csv", "c.png"}


def test_metadata_jsonl_layout(tmp_path, demo_home):
    data = tmp_path / "data"
    _img(data / "a.png")
    _img(data / "b.png", (1, 2, 3))
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red one"}\n'
                                         '{"file_name": "b.png", "text": "a dark one"}\n')
    cfg = load_config(_cfg(tmp_path, demo_home))
    assert image_layout(cfg) == "jsonl"
    assert [r["caption"] for r in read_image_rows(cfg)] == ["a red one", "a dark one"]
    assert set(dataset_digests(cfg)) == {"metadata.jsonl", "a.png", "b.png"}
    (data / "metadata.jsonl").write_text('{"file_name": "zz.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"line 1 of .*metadata\.jsonl names 'zz\.png'"):
        load_config(_cfg(tmp_path, demo_home))


def test_empty_sidecar_caption_is_a_warning(kohya):
    (kohya.parent / "data" / "c.txt").write_text("\n")
    cfg = load_config(kohya)
    assert any("c.txt" in w and "empty" in w for w in cfg.dataset_warnings)
