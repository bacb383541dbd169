"""``lora label``: CLIP zero-shot tags land on the right images (the demo CLIP, trained by
``lora demo-assets`` in a few seconds, to tell red, green and blue apart: an untrained or
mis-wired tagger fails), in
``metadata.csv`` or ``.txt`` sidecars with the trigger first; labeling resumes where it
stopped; pickle models are refused; and no network connection is ever attempted."""
from __future__ import annotations

import csv
import random
import socket
from pathlib import Path

import pytest

from lora_kernel.cli.main import main
from lora_kernel.common.errors import ConfigError, UnsafeModelError
from lora_kernel.training.data import kohya_entries
from lora_kernel.training.demo_assets import CLIP_COLOURS as COLOURS
from lora_kernel.training.demo_assets import CLIP_SHAPES as SHAPES
from lora_kernel.training.demo_assets import draw_shape
from lora_kernel.training.label import label_folder, load_vocab

VOCAB = ["red", "green", "blue", "yellow", "square", "circle"]
draw = draw_shape


@pytest.fixture(scope="module")
def clip_dir(demo_home) -> Path:
    """The demo CLIP that ``lora demo-assets`` builds: the tiny CLIP trained with a
    contrastive loss on drawn squares and circles against "a photo of red/green/blue"."""
    return demo_home / "demo" / "models" / "tiny-clip"


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    """data/: 2 images per colour (unseen in training), ``{file name: colour}``."""
    data = tmp_path / "data"
    data.mkdir()
    rng, out = random.Random(123), {}
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{shape}_{colour}.png"
            draw(colour, shape, rng, size=64).save(data / name)
            out[name] = colour
    return out


def _csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["file_name"]: r["text"] for r in csv.DictReader(fh)}


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every way Python code opens a connection or resolves a name raises (and is noted)."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test that must stay offline")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse)
    return attempts


def test_colour_tags_land_in_metadata_csv_with_the_trigger_first(clip_dir, images, tmp_path,
                                                                  no_network, capsys):
    data = tmp_path / "data"
    vocab = tmp_path / "tags.txt"
    vocab.write_text("# test vocabulary\n" + "\n".join(VOCAB) + "\n")
    rc = main(["label", str(data), "--model", str(clip_dir), "--vocab", str(vocab),
               "--trigger", "enclavestyle", "--top-k", "1", "--batch-size", "4", "--quiet"])
    assert rc == 0 and not no_network
    rows = _csv(data / "metadata.csv")
    assert set(rows) == set(images)
    for name, colour in images.items():
        assert rows[name] == f"enclavestyle, {colour}", (name, rows[name])
    assert "6 labelled, 0 already captioned" in capsys.readouterr().out


def test_txt_sidecars_make_a_kohya_dataset(clip_dir, images, tmp_path, no_network):
    data = tmp_path / "data"
    res = label_folder(data, clip_dir, vocab=VOCAB, fmt="txt", top_k=2, threshold=0.0,
                       trigger="sks", progress=False)
    assert sorted(res.labelled) == sorted(images) and not no_network
    assert not (data / "metadata.csv").exists()
    for e in kohya_entries(data):
        tags = e["caption"].split(", ")
        assert tags[0] == "sks" and tags[1] == images[e["image"].name], e
        assert len(tags) == 3


def test_resume_skips_labelled_images_and_keeps_hand_edits(clip_dir, images, tmp_path):
    data = tmp_path / "data"

    class Stop(Exception):
        pass

    def stop_after_first_batch(result):
        raise Stop

    with pytest.raises(Stop):  # interrupted after the first batch: that batch is on disk
        label_folder(data, clip_dir, vocab=VOCAB, batch_size=2, progress=False,
                     on_batch=stop_after_first_batch)
    first = _csv(data / "metadata.csv")
    assert len(first) == 2
    edited = next(iter(first))
    text = (data / "metadata.csv").read_text().replace(first[edited], "my own caption")
    (data / "metadata.csv").write_text(text)
    res = label_folder(data, clip_dir, vocab=VOCAB, batch_size=2, progress=False)
    assert sorted(res.skipped) == sorted(first) and len(res.labelled) == 4
    rows = _csv(data / "metadata.csv")
    assert set(rows) == set(images) and rows[edited] == "my own caption"
    again = label_folder(data, clip_dir, vocab=VOCAB, progress=False)
    assert again.labelled == [] and len(again.skipped) == 6
    over = label_folder(data, clip_dir, vocab=VOCAB, overwrite=True, top_k=1, progress=False)
    assert len(over.labelled) == 6 and _csv(data / "metadata.csv")[edited] != "my own caption"


def test_unreadable_image_is_reported_not_fatal(clip_dir, images, tmp_path):
    data = tmp_path / "data"
    (data / "broken.png").write_bytes(b"not a png")
    res = label_folder(data, clip_dir, vocab=VOCAB, progress=False)
    assert [f for f, _ in res.failed] == ["broken.png"] and len(res.labelled) == 6


def test_pickle_and_weightless_models_are_refused(images, tmp_path, capsys):
    data = tmp_path / "data"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "clip"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")
    with pytest.raises(UnsafeModelError):
        label_folder(data, pickled, vocab=VOCAB, progress=False)
    assert main(["label", str(data), "--model", str(pickled)]) == 3
    assert "pickle" in capsys.readouterr().err
    empty = tmp_path / "weightless"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        label_folder(data, empty, vocab=VOCAB, progress=False)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text('{"auto_map": {"AutoModel": "x.Y"}}')
    (remote / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsafeModelError):
        label_folder(data, remote, vocab=VOCAB, progress=False)
    assert not (data / "metadata.csv").exists()


def test_default_vocabulary_is_generic_and_editable():
    tags = load_vocab()
    assert 50 <= len(tags) <= 120 and len(set(tags)) == len(tags)
    assert {"red", "blue", "circle", "square", "photo", "painting"} <= set(tags)
    assert not any(t.startswith("#") for t in tags)


def test_the_demo_clip_builds_deterministically(tmp_path, clip_dir):
    from lora_kernel.common.digests import sha256_file
    from lora_kernel.training.demo_assets import write_demo_clip
    a, b = clip_dir, write_demo_clip(tmp_path / "b", seed=0)
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and "preprocessor_config.json" in files
    assert all(sha256_file(a / f) == sha256_file(b / f) for f in files)


def _tiny_blip(folder: Path) -> Path:
    """A tiny, randomly initialised BLIP captioner with a WordPiece vocabulary of a dozen
    words (it says nonsense, deterministically)."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue",
             "square", "circle", "photo", "of"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                         tokenizer=BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2)
    cfg = BlipConfig(text_config=dict(small, vocab_size=len(words), encoder_hidden_size=32,
                                      bos_token_id=5, pad_token_id=0, sep_token_id=3,
                                      max_position_embeddings=64),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
    proc.save_pretrained(folder)
    return folder


def test_caption_model_goes_between_trigger_and_tags(clip_dir, images, tmp_path, no_network):
    data = tmp_path / "data"
    blip = _tiny_blip(tmp_path / "blip")
    res = label_folder(data, clip_dir, vocab=VOCAB, caption_model=blip, trigger="sks",
                       top_k=1, progress=False)
    assert not no_network
    for name, text in res.captions.items():
        parts = text.split(", ")
        assert parts[0] == "sks" and parts[-1] == images[name] and len(parts) == 3, text
        assert set(parts[1].split()) <= {"a", "red", "blue", "square", "circle", "photo", "of"}


def test_format_that_training_would_not_read_is_refused(images, tmp_path, clip_dir):
    data = tmp_path / "data"
    (data / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ConfigError, match="use --format csv"):
        label_folder(data, clip_dir, vocab=VOCAB, fmt="txt", progress=False)
    (data / "metadata.csv").unlink()
    (data / "circle_red.txt").write_text("a red circle\n")
    with pytest.raises(ConfigError, match="kohya-layout .* use --format txt"):
        label_folder(data, clip_dir, vocab=VOCAB, fmt="csv", progress=False)
    (data / "circle_red.txt").unlink()
    (data / "5_thing").mkdir()
    with pytest.raises(ConfigError, match=r"repeat folders \(5_thing\)"):
        label_folder(data, clip_dir, vocab=VOCAB, fmt="csv", progress=False)


def test_txt_format_labels_repeat_folders(clip_dir, tmp_path):
    data = tmp_path / "kohya"
    rng = random.Random(7)
    (data / "10_style").mkdir(parents=True)
    draw("red", "square", rng, 64).save(data / "10_style" / "r.png")
    draw("blue", "circle", rng, 64).save(data / "b.png")
    res = label_folder(data, clip_dir, vocab=VOCAB, fmt="txt", top_k=1, progress=False)
    assert sorted(res.labelled) == ["10_style/r.png", "b.png"]
    assert (data / "10_style" / "r.txt").read_text() == "red\n"
    assert (data / "b.txt").read_text() == "blue\n"
