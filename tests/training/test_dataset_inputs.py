"""Dataset files as people really save them: every bad one gets one ConfigError (exit 2) naming
the file, the line and the fix; what is odd but usable (empty captions, duplicate rows, 1x1
images) is a warning naming its row; and what validation accepts, training reads the same way
(Excel's BOM + CRLF captions, JSON Lines with a BOM).

Each refused case is paired with the case that must work.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.config import config_keys
from lora_kernel.training.data import (
    MAX_IMAGE_PIXELS,
    ImageTooLarge,
    dataset_files,
    open_image,
    read_image_rows,
    read_text_records,
)

BOMB = (20000, 20000)  # 400M pixels declared, a few dozen bytes on disk


def write_header_only_png(path: Path, size: tuple[int, int]) -> Path:
    """A valid PNG whose IHDR declares ``size`` followed by a tiny IDAT: PIL reads the header
    (and ``verify()`` the chunk CRCs) without ever allocating the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def image_setup(tmp_path: Path, demo_home: Path) -> Path:
    """A minimal valid image config: data/a.png, data/b.png (8x8) and their metadata.csv; the
    demo's tiny model (validation never loads it)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(data / "a.png")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(data / "b.png")
    (data / "metadata.csv").write_text("file_name,text\na.png,a cat\nb.png,a dog\n")
    cfg = {"train_data_dir": "data", "base_model": str(demo_home / "demo" / "models" / "tiny-sd"),
           "lora_rank": 4, "output_dir": "out", "resolution": 64}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def text_setup(tmp_path: Path, demo_home: Path) -> Path:
    """A minimal valid text config over d.jsonl (the demo's tiny LM, never loaded)."""
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n{"prompt": "a", "response": "b"}\n')
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(_text_cfg(demo_home, "d.jsonl")))
    return path


def _text_cfg(demo_home: Path, data: str) -> dict:
    return {"task": "text", "base_model": str(demo_home / "demo" / "models" / "tiny-llama"),
            "metadata_path": data}


def _meta(cfg_path: Path) -> Path:
    return cfg_path.parent / "data" / "metadata.csv"


def _refused(cfg_path: Path, key: str = "metadata_path") -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert err.value.exit_code == 2 and err.value.key == key
    msg = str(err.value)
    assert str(cfg_path) in msg and "fix:" in msg and "\n" not in msg
    return msg


# -- encodings and line ends -------------------------------------------------------------
def test_captions_csv_not_utf8_names_file_and_line(image_setup):
    meta = _meta(image_setup)
    meta.write_bytes("file_name,text\na.png,a cat\nb.png,caf\u00e9 au lait\n".encode("cp1252"))
    msg = _refused(image_setup)
    assert f"line 3 of {meta} is not UTF-8" in msg and "save it as UTF-8" in msg
    # must work: the same captions saved as UTF-8
    meta.write_text("file_name,text\na.png,a cat\nb.png,caf\u00e9 au lait\n", encoding="utf-8")
    assert read_image_rows(load_config(image_setup))[1]["caption"] == "caf\u00e9 au lait"


def test_excel_bom_and_crlf_captions_train_the_same_rows(image_setup):
    plain = load_config(image_setup)
    rows, files = read_image_rows(plain), dataset_files(plain)
    meta = _meta(image_setup)
    meta.write_bytes(b"\xef\xbb\xbffile_name,text\r\na.png,a cat\r\nb.png,a dog\r\n")
    excel = load_config(image_setup)  # "file_name" found: no "\ufeff" prefix
    assert read_image_rows(excel) == rows
    assert [r["caption"] for r in rows] == ["a cat", "a dog"]  # no "\r" left in captions
    assert dataset_files(excel) == files and excel.dataset_warnings == []


def test_excel_csv_gives_the_same_training_examples(image_setup):
    pytest.importorskip("torch")
    from lora_kernel.training.image import load_examples
    plain = [(e.caption, e.pixels.sum().item()) for e in load_examples(load_config(image_setup))]
    _meta(image_setup).write_bytes(b"\xef\xbb\xbffile_name,text\r\na.png,a cat\r\nb.png,a dog\r\n")
    excel = [(e.caption, e.pixels.sum().item()) for e in load_examples(load_config(image_setup))]
    assert excel == plain


def test_short_csv_row_names_its_line(image_setup):
    _meta(image_setup).write_text("file_name,text\na.png,a cat\n\n,lonely caption\n")
    msg = _refused(image_setup)
    assert f"line 4 of {_meta(image_setup)} has no 'file_name' value" in msg
    _meta(image_setup).write_text("file_name,text\na.png,a cat\n\nb.png,lonely caption\n")
    assert len(read_image_rows(load_config(image_setup))) == 2


def test_jsonl_not_utf8_names_file_and_line(text_setup):
    data = text_setup.parent / "d.jsonl"
    data.write_bytes('{"text": "ok"}\n{"text": "na\u00efve"}\n'.encode("latin-1"))
    msg = _refused(text_setup)
    assert f"line 2 of {data} is not UTF-8" in msg
    data.write_text('{"text": "ok"}\n{"text": "na\u00efve"}\n', encoding="utf-8")
    assert read_text_records(load_config(text_setup))[1] == {"text": "na\u00efve"}


def test_jsonl_with_bom_and_crlf_validates_and_reads(text_setup):
    data = text_setup.parent / "d.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b\\u2028c"}\r\n')
    assert read_text_records(load_config(text_setup)) == [{"text": "a"}, {"text": "b\u2028c"}]


# -- .json where .jsonl is expected, record shapes ------------------------------------------
def test_json_array_given_as_jsonl_says_so_and_how_to_convert(text_setup, demo_home):
    records = [{"prompt": "2+2?", "response": "4"}, {"text": "hello"}]
    array = text_setup.parent / "d.json"
    array.write_text(json.dumps(records, indent=2))
    text_setup.write_text(yaml.safe_dump(_text_cfg(demo_home, "d.json")))
    msg = _refused(text_setup)
    assert f"{array} holds one JSON array (2 items), not JSON Lines" in msg
    assert "fix: write one JSON object per line" in msg
    # must work: the conversion the message gives, run as written
    command = msg.split("e.g. ", 1)[1].rsplit(" and use ", 1)[0]
    subprocess.run(command, shell=True, check=True, cwd=text_setup.parent)
    text_setup.write_text(yaml.safe_dump(_text_cfg(demo_home, "d.jsonl")))
    assert read_text_records(load_config(text_setup)) == records


def test_json_array_named_jsonl_gets_a_conversion_that_keeps_the_data(text_setup, demo_home):
    """A `.jsonl` file holding an array: the suggested command must not be `cmd F > F` (the
    shell would empty F before Python reads it)."""
    records = [{"text": "one"}, {"text": "two"}]
    array = text_setup.parent / "d.jsonl"
    array.write_text(json.dumps(records))
    text_setup.write_text(yaml.safe_dump(_text_cfg(demo_home, "d.jsonl")))
    msg = _refused(text_setup)
    command = msg.split("e.g. ", 1)[1].rsplit(" and use ", 1)[0]
    assert command.count(str(array)) == 1 and "d.lines.jsonl" in command
    subprocess.run(command, shell=True, check=True, cwd=text_setup.parent)
    assert json.loads(array.read_text()) == records  # the original is untouched
    text_setup.write_text(yaml.safe_dump(_text_cfg(demo_home, "d.lines.jsonl")))
    assert read_text_records(load_config(text_setup)) == records


@pytest.mark.parametrize("line, kind", [("[1, 2]", "an array"), ('"just text"', "a string"),
                                        ("42", "a number"), ("null", "null")])
def test_jsonl_record_that_is_not_an_object_names_line(text_setup, line, kind):
    data = text_setup.parent / "d.jsonl"
    data.write_text('{"text": "ok"}\n' + line + "\n")
    msg = _refused(text_setup)
    assert f"{data} line 2 is {kind}, not a JSON object" in msg
    data.write_text('{"text": "ok"}\n{"text": ' + json.dumps(line) + "}\n")
    assert len(read_text_records(load_config(text_setup))) == 2


@pytest.mark.parametrize("record, field, kind", [
    ({"text": None}, "text", "null"),
    ({"text": 3}, "text", "a number"),
    ({"prompt": "q", "response": None}, "response", "null"),
    ({"prompt": 1.5, "response": "a"}, "prompt", "a number"),
    ({"prompt": ["q"], "response": "a"}, "prompt", "an array"),
])
def test_jsonl_field_that_is_not_text_names_file_line_field(text_setup, record, field, kind):
    data = text_setup.parent / "d.jsonl"
    data.write_text('{"text": "ok"}\n\n' + json.dumps(record) + "\n")
    msg = _refused(text_setup)
    assert f"{data} line 3: field {field!r} is {kind}, not a string" in msg
    data.write_text('{"text": "ok"}\n\n' + json.dumps({k: str(v) for k, v in record.items()})
                    + "\n")
    assert len(read_text_records(load_config(text_setup))) == 2


# -- warnings ------------------------------------------------------------------------------
def test_empty_caption_duplicate_row_and_1x1_image_are_warnings(image_setup):
    data = image_setup.parent / "data"
    Image.new("RGB", (1, 1)).save(data / "dot.png")
    _meta(image_setup).write_text("file_name,text\na.png,a cat\nb.png,\na.png,a cat again\n"
                                  "dot.png,a dot\n")
    cfg = load_config(image_setup)
    meta = _meta(image_setup)
    assert cfg.dataset_warnings == [
        f"line 3 of {meta}: the caption of 'b.png' is empty (it trains unconditioned)",
        f"line 4 of {meta}: 'a.png' is listed again (first at line 2); it trains twice per epoch",
        f"line 5 of {meta}: 'dot.png' is 1x1 pixels (a placeholder?)",
    ]
    assert "dataset_warnings" not in cfg.to_dict() and "dataset_warnings" not in config_keys()
    # a clean dataset: no warnings
    _meta(image_setup).write_text("file_name,text\na.png,a cat\nb.png,a dog\n")
    assert load_config(image_setup).dataset_warnings == []


def test_lora_config_prints_warnings_on_stderr(image_setup, capsys):
    from lora_kernel.cli import main as cli
    _meta(image_setup).write_text("file_name,text\na.png,\nb.png,a dog\n")
    assert cli.main(["config", str(image_setup)]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"warning: line 2 of {_meta(image_setup)}: the caption of "
                                    "'a.png' is empty (it trains unconditioned)"]
    assert "warning" not in out.out and json.loads(out.out.rsplit("\n", 2)[0])
    _meta(image_setup).write_text("file_name,text\na.png,a cat\nb.png,a dog\n")
    assert cli.main(["config", str(image_setup)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_lora_train_prints_warnings_on_stderr(demo_home, tmp_path, capsys):
    from lora_kernel.cli import main as cli
    data = tmp_path / "data"
    shutil.copytree(demo_home / "demo" / "datasets" / "image", data)
    meta = data / "metadata.csv"
    first = meta.read_text().splitlines()[1]
    meta.write_text(meta.read_text() + first + "\n")  # the first image listed twice
    raw = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    raw.update({"train_data_dir": str(data), "metadata_path": str(meta), "max_train_steps": 1,
                "base_model": str(demo_home / "demo" / raw["base_model"]),
                "output_dir": str(tmp_path / "out")})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    code = cli.main(["train", "-c", str(tmp_path / "cfg.yaml"), "-q", "--no-samples",
                     "--home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: line " in err and "is listed again (first at line 2)" in err


def test_runner_pin_step_returns_the_warnings(demo_home, tmp_path):
    from lora_kernel.steps.executor import _pin_training
    data = tmp_path / "data"
    shutil.copytree(demo_home / "demo" / "datasets" / "image", data)
    meta = data / "metadata.csv"
    name = meta.read_text().splitlines()[1].split(",")[0]
    raw = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    raw.update({"train_data_dir": str(data), "metadata_path": str(meta),
                "base_model": str(demo_home / "demo" / raw["base_model"])})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    pinned = _pin_training({"config_path": str(tmp_path / "cfg.yaml")}, tmp_path / "work")
    assert pinned["dataset_warnings"] == []
    meta.write_text(meta.read_text() + f"{name},\n")
    pinned = _pin_training({"config_path": str(tmp_path / "cfg.yaml")}, tmp_path / "work")
    assert [w.split(": ", 1)[1] for w in pinned["dataset_warnings"]] == [
        f"the caption of {name!r} is empty (it trains unconditioned)",
        f"{name!r} is listed again (first at line 2); it trains twice per epoch"]
    assert "dataset_warnings" not in pinned["config"]


# -- decompression bombs -------------------------------------------------------------------
def test_max_image_pixels_is_a_key_with_pils_default(image_setup):
    assert "decompression bomb" in config_keys()["max_image_pixels"]
    assert load_config(image_setup).max_image_pixels == MAX_IMAGE_PIXELS == 89478485
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(image_setup, {"max_image_pixels": 0})


def test_image_header_above_max_image_pixels_is_refused(image_setup):
    data = image_setup.parent / "data"
    write_header_only_png(data / "bomb.png", BOMB)
    _meta(image_setup).write_text("file_name,text\na.png,a cat\nbomb.png,boom\n")
    msg = _refused(image_setup, key="max_image_pixels")
    assert f"line 3 of {_meta(image_setup)} names 'bomb.png'" in msg
    assert "20000x20000 = 400000000 pixels, above the limit of 89478485 pixels" in msg
    assert "raise max_image_pixels" in msg
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's global left as it was
    # a limit lower than a real image refuses it too
    with pytest.raises(ConfigError, match=r"line 2 .* 8x8 = 64 pixels, above the limit of 63"):
        load_config(image_setup, {"max_image_pixels": 63})
    # must work: a limit raised above the bomb's size passes that check
    cfg = load_config(image_setup, {"max_image_pixels": BOMB[0] * BOMB[1]})
    assert [r["image"].name for r in read_image_rows(cfg)] == ["a.png", "bomb.png"]


def test_training_opens_images_under_the_same_limit(tmp_path):
    pytest.importorskip("torch")
    from lora_kernel.training.image import prepare_image
    bomb = write_header_only_png(tmp_path / "bomb.png", BOMB)
    with pytest.raises(ImageTooLarge) as err:
        prepare_image(bomb, (8, 8), center=True, rng=random.Random(0))
    assert err.value.exit_code == 2 and err.value.key == "max_image_pixels"
    assert "20000x20000" in str(err.value) and str(bomb) in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge):
        with open_image(bomb, BOMB[0] * BOMB[1] - 1):
            pass
    # must work: an ordinary image, and the bomb's header under a limit that allows it
    Image.new("RGB", (16, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    assert tuple(prepare_image(tmp_path / "ok.png", (8, 8), center=True,
                               rng=random.Random(0)).shape) == (3, 8, 8)
    with open_image(bomb, BOMB[0] * BOMB[1]) as im:
        assert im.size == BOMB and Image.MAX_IMAGE_PIXELS == BOMB[0] * BOMB[1]
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
