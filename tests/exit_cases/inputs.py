"""Input cases: YAML as people write it and dataset files as people save them."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import yaml

from exit_cases import Case


def _image_data(c: Case) -> Path:
    """A copy of the demo image dataset (its metadata.csv may be rewritten)."""
    data = c.tmp / "data"
    shutil.copytree(c.demo / "datasets" / "image", data)
    return data


def _text_config(c: Case, data: Path) -> Path:
    """The demo text config reading ``data`` (a file written by the case)."""
    raw = yaml.safe_load((c.demo / "text_lora.yaml").read_text())
    raw.update({"base_model": str((c.demo / raw["base_model"]).resolve()),
                "metadata_path": str(data), "output_dir": str(c.tmp / "out")})
    path = c.tmp / "text.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _csv_not_utf8(c: Case) -> list:
    data = _image_data(c)
    meta = data / "metadata.csv"
    text = meta.read_text()
    first = text.splitlines()[1].split(",")[0]
    meta.write_bytes((text + f"{first},caf\u00e9 au lait\n").encode("cp1252"))
    return ["config", c.config(train_data_dir=str(data), metadata_path=str(meta))]


def _csv_row_without_file(c: Case) -> list:
    data = _image_data(c)
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text() + ",a caption without its image\n")
    return ["config", c.config(train_data_dir=str(data), metadata_path=str(meta))]


def _json_array(c: Case) -> list:
    records = [{"prompt": "Q: what is the code for apple? A:", "response": " 17"}] * 3
    (c.tmp / "train.json").write_text(json.dumps(records, indent=2))
    return ["config", _text_config(c, c.tmp / "train.json")]


def _jsonl_not_utf8(c: Case) -> list:
    (c.tmp / "train.jsonl").write_bytes('{"prompt": "na\u00efve?", "response": "yes"}\n'
                                        .encode("latin-1"))
    return ["config", _text_config(c, c.tmp / "train.jsonl")]


def _jsonl_not_object(c: Case) -> list:
    (c.tmp / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n["a", "b"]\n')
    return ["config", _text_config(c, c.tmp / "train.jsonl")]


def _jsonl_field_null(c: Case) -> list:
    (c.tmp / "train.jsonl").write_text('{"prompt": "a", "response": null}\n')
    return ["config", _text_config(c, c.tmp / "train.jsonl")]


def _png_header(size: tuple[int, int]) -> bytes:
    """A PNG declaring ``size`` in its header, with a tiny IDAT (no pixels are allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def _bomb(c: Case) -> list:
    data = _image_data(c)
    (data / "bomb.png").write_bytes(_png_header((20000, 20000)))
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text() + "bomb.png,a harmless looking caption\n")
    return ["config", c.config(train_data_dir=str(data), metadata_path=str(meta))]


def _animated(c: Case) -> list:
    from PIL import Image

    data = _image_data(c)
    frames = [Image.new("RGB", (64, 64), col) for col in ((255, 0, 255), (0, 0, 0))]
    frames[0].save(data / "blink.gif", save_all=True, append_images=frames[1:], duration=80)
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text() + "blink.gif,a blinking square in enclave style\n")
    return ["config", c.config(train_data_dir=str(data), metadata_path=str(meta))]


def _duplicate_key(c: Case) -> list:
    path = c.config(lora_rank=4)
    path.write_text(path.read_text() + "lora_rank: 16\n")
    return ["config", path]


def _bool_yes(c: Case) -> list:
    path = c.config(center_crop=None)
    path.write_text(path.read_text() + "center_crop: yes\n")
    return ["config", path]


CASES: dict[str, Callable[[Case], list]] = {
    "config key appears twice": _duplicate_key,
    "config true/false key given `yes`, `no`, `on` or `off`": _bool_yes,
    "captions CSV is not UTF-8": _csv_not_utf8,
    "captions CSV row has no image file name": _csv_row_without_file,
    "an image's header exceeds `max_image_pixels` (decompression bomb)": _bomb,
    "a dataset image is animated (GIF, WebP or APNG with several frames)": _animated,
    "a `.json` array given as a `.jsonl` dataset": _json_array,
    "a `.jsonl` dataset is not UTF-8": _jsonl_not_utf8,
    "a `.jsonl` line is not a JSON object": _jsonl_not_object,
    "a `.jsonl` text, prompt or response field is null or a number": _jsonl_field_null,
}
