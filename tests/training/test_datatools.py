"""``lora data``: lint finds each planted problem (and passes a clean folder), version is the
id manifests record and moves with a caption, diff lists exactly what changed, sheet draws a
PNG of the expected size."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_kernel.cli.main import main
from lora_kernel.training.datatools import (
    ahash,
    contact_sheet,
    dhash,
    diff_digests,
    folder_digests,
    folder_version,
    hamming,
    lint,
    sheet_size,
)
from lora_kernel.training.demo_assets import draw_image


def _draw(path: Path, color: str, shape: str, index: int, size: int = 256) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_image(color, shape, index).resize((size, size), Image.Resampling.NEAREST).save(path)
    return path


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    """Six distinct 256x256 RGB images with .txt captions (kohya layout)."""
    data = tmp_path / "clean"
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "square"),
                                        ("green", "triangle"), ("yellow", "diamond"),
                                        ("cyan", "circle"), ("orange", "square")]):
        _draw(data / f"{i}.png", color, shape, i)
        (data / f"{i}.txt").write_text(f"a {color} {shape}\n", encoding="utf-8")
    return data


def test_clean_folder_passes(clean, capsys):
    report = lint(clean)
    assert report.findings == [] and report.ok and report.images == 6
    assert main(["data", "lint", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "0 error(s), 0 warning(s)" in out and "layout kohya" in out


def test_clean_csv_folder_passes(clean):
    rows = ["file_name,text"]
    for txt in sorted(clean.glob("*.txt")):
        rows.append(f"{txt.stem}.png,{txt.read_text().strip()}")
        txt.unlink()
    (clean / "metadata.csv").write_text("\n".join(rows) + "\n")
    report = lint(clean)
    assert report.findings == [] and report.layout == "csv"


def _checks(report) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for f in report.findings:
        out.setdefault(f.check, set()).add((f.level, f.path))
    return out


def test_lint_finds_every_planted_problem(clean, capsys):
    d = clean
    # unreadable: not an image at all; truncated: half a PNG
    (d / "bad.png").write_bytes(b"this is no image")
    (d / "bad.txt").write_text("broken\n")
    buf = io.BytesIO()
    draw_image("red", "square", 7).resize((256, 256)).save(buf, format="PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "cut.txt").write_text("cut\n")
    # missing caption; empty caption; caption not UTF-8; mojibake
    _draw(d / "nocap.png", "blue", "triangle", 8)
    _draw(d / "empty.png", "green", "diamond", 9)
    (d / "empty.txt").write_text("  \n")
    _draw(d / "latin.png", "yellow", "square", 10)
    (d / "latin.txt").write_bytes("caf\u00e9".encode("cp1252"))
    _draw(d / "moji.png", "cyan", "triangle", 11)
    (d / "moji.txt").write_text("cafÃ© style\n")
    # exact duplicate; near duplicate (JPEG re-encode of 1.png)
    shutil.copy(d / "0.png", d / "dup.png")
    (d / "dup.txt").write_text("a red circle\n")
    Image.open(d / "1.png").convert("RGB").save(d / "near.jpg", quality=85)
    (d / "near.txt").write_text("a blue square\n")
    # too small; colour modes; EXIF rotation
    _draw(d / "small.png", "red", "diamond", 12, size=64)
    (d / "small.txt").write_text("small\n")
    _draw(d / "rgba.png", "green", "circle", 13)
    Image.open(d / "rgba.png").convert("RGBA").save(d / "rgba.png")
    (d / "rgba.txt").write_text("rgba\n")
    _draw(d / "grey.png", "blue", "diamond", 14)
    Image.open(d / "grey.png").convert("L").save(d / "grey.png")
    (d / "grey.txt").write_text("grey\n")
    im = draw_image("orange", "triangle", 15).resize((256, 256))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "rotated.jpg", exif=exif, quality=95)
    (d / "rotated.txt").write_text("rotated\n")
    # stray files
    (d / "notes.docx").write_bytes(b"PK\x03\x04")
    (d / "orphan.txt").write_text("caption of nothing\n")

    report = lint(d)
    c = _checks(report)
    assert c["image-unreadable"] == {("error", "bad.png")}
    assert c["image-truncated"] == {("error", "cut.png")}
    assert c["caption-missing"] == {("error", "nocap.png")}
    assert c["caption-empty"] == {("warning", "empty.txt")}
    assert c["caption-encoding"] == {("error", "latin.txt"), ("warning", "moji.txt")}
    assert c["duplicate"] == {("warning", "dup.png")}
    assert c["near-duplicate"] == {("warning", "near.jpg")}
    assert c["too-small"] == {("warning", "small.png")}
    assert c["colour-mode"] == {("warning", "rgba.png"), ("warning", "grey.png")}
    assert c["exif-rotation"] == {("warning", "rotated.jpg")}
    assert c["stray-file"] == {("warning", "notes.docx"), ("warning", "orphan.txt")}
    assert not report.ok

    assert main(["data", "lint", str(d)]) == 2
    out = capsys.readouterr().out
    for check in c:
        assert check in out
    assert "error: latin.txt: [caption-encoding]" in out


def test_warnings_alone_exit_zero_and_min_size_is_a_flag(clean, capsys):
    _draw(clean / "small.png", "red", "diamond", 12, size=100)
    (clean / "small.txt").write_text("small\n")
    assert main(["data", "lint", str(clean)]) == 0
    assert "too-small" in capsys.readouterr().out
    assert lint(clean, min_size=64).findings == []


def test_csv_problems_missing_file_and_unlisted_image(clean):
    for txt in clean.glob("*.txt"):
        txt.unlink()
    (clean / "metadata.csv").write_text("file_name,text\n0.png,a red circle\n1.png,\n"
                                        "gone.png,lost\n")
    c = _checks(lint(clean))
    assert c["missing-image"] == {("error", "metadata.csv")}
    assert c["caption-empty"] == {("warning", "1.png")}
    assert ("warning", "2.png") in c["not-in-dataset"]


def test_metadata_csv_not_utf8_is_an_error(clean):
    for txt in clean.glob("*.txt"):
        txt.unlink()
    (clean / "metadata.csv").write_bytes("file_name,text\n0.png,caf\u00e9\n".encode("cp1252"))
    c = _checks(lint(clean))
    assert c["caption-encoding"] == {("error", "metadata.csv")}


def test_perceptual_hashes():
    a = draw_image("red", "circle", 0)
    again = a.resize((128, 128)).resize((64, 64))
    other = draw_image("blue", "square", 5).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert hamming(dhash(a), dhash(again)) <= 4 and hamming(ahash(a), ahash(again)) <= 4
    assert hamming(dhash(a), dhash(other)) > 6


# -- version and diff --------------------------------------------------------------------
def test_version_is_the_manifest_id_and_changes_with_a_caption(clean, capsys, demo_home):
    from lora_kernel.training.checks import validate_config
    from lora_kernel.training.data import dataset_version
    v = folder_version(clean)
    cfg = validate_config({"train_data_dir": str(clean),
                           "base_model": str(demo_home / "demo" / "models" / "tiny-sd")})
    assert v == dataset_version(cfg) and v.startswith("ds-")
    assert main(["data", "version", str(clean)]) == 0
    assert capsys.readouterr().out.strip() == v
    (clean / "3.txt").write_text("a yellow diamond, edited\n")
    assert folder_version(clean) != v
    demo = demo_home / "demo" / "datasets" / "image"
    from lora_kernel.training.checks import load_config
    assert folder_version(demo) == dataset_version(load_config(demo_home / "demo" /
                                                               "image_lora.yaml"))


def test_diff_lists_exactly_the_changed_files(clean, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(clean, b)
    (b / "2.txt").write_text("a green triangle, edited\n")
    (b / "5.png").unlink()
    (b / "5.txt").unlink()
    _draw(b / "6.png", "red", "square", 20)
    (b / "6.txt").write_text("new\n")
    d = diff_digests(folder_digests(clean), folder_digests(b))
    assert d.changed == ["2.txt"] and d.removed == ["5.png", "5.txt"]
    assert d.added == ["6.png", "6.txt"]
    assert main(["data", "diff", str(clean), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if ln[:2] in ("+ ", "- ", "M ")] == [
        "M 2.txt", "- 5.png", "- 5.txt", "+ 6.png", "+ 6.txt"]
    assert diff_digests(folder_digests(clean), folder_digests(clean)).same


def test_diff_against_a_run_record(clean, make_run, state_tmp, capsys):
    import json
    rec = make_run("run-ds")
    manifest = json.loads((rec / "manifest.json").read_text())
    pinned = {d["name"][len("dataset/"):] for d in
              manifest["predicate"]["buildDefinition"]["resolvedDependencies"]
              if d.get("name", "").startswith("dataset/")}
    assert pinned
    assert main(["data", "diff", "run-ds", str(clean), "--state", str(state_tmp)]) == 0
    out = capsys.readouterr().out
    assert "--- run run-ds" in out
    for name in pinned:
        assert f"- {name}" in out or f"M {name}" in out
    assert main(["data", "diff", "no-such-run", str(clean)]) == 2


# -- sheet -------------------------------------------------------------------------------
def test_sheet_is_a_png_of_the_expected_size(clean, tmp_path, capsys):
    out = tmp_path / "sheets" / "sheet.png"
    assert main(["data", "sheet", str(clean), "-o", str(out), "--columns", "4"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == sheet_size(6, 4) == (4 * 140, 2 * 176)
        # the first thumbnail is the red circle image, shrunk: red is there
        px = im.convert("RGB").load()
        reds = sum(1 for x in range(6, 134) for y in range(6, 134)
                   if px[x, y][0] > 180 and px[x, y][1] < 80)
        assert reds > 100
    path = contact_sheet(clean, tmp_path / "one.png", columns=10, thumb=64)
    with Image.open(path) as im:
        assert im.size == sheet_size(6, 10, 64)


def test_sheet_draws_chinese_captions_not_boxes(tmp_path):
    """Two images, same colour, captions differing in one Chinese character: with a CJK font
    the caption strips differ (each character drawn); PIL's bitmap font draws both as the same
    boxes. The Latin caption of a third image is drawn too (ink below its thumbnail)."""
    import numpy as np
    from osdeps import missing

    from lora_kernel.training.datatools import SHEET_PAD
    from lora_kernel.training.fonts import cjk_font_file

    if cjk_font_file() is None:
        missing("a CJK font (Debian's fonts-droid-fallback)")
    data = tmp_path / "cjk"
    data.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (200, 40, 120)).save(data / f"{name}.png")
    (data / "metadata.csv").write_text(
        "file_name,text\na.png,一只猫在草地上\nb.png,一只狗在草地上\nc.png,a cat on grass\n",
        encoding="utf-8")
    sheet = np.asarray(Image.open(contact_sheet(data, tmp_path / "s.png", columns=3,
                                                thumb=64)).convert("L"))
    cell_w = sheet.shape[1] // 3
    strip = [sheet[SHEET_PAD + 64 + 2:, i * cell_w:(i + 1) * cell_w] for i in range(3)]
    assert all((s < 128).sum() > 20 for s in strip)  # every caption left ink
    assert (strip[0] != strip[1]).sum() > 10  # 猫 and 狗 are different glyphs, not two boxes
