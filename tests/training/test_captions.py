"""Caption habits (lora_kernel.training.captions): shuffle with keep_tokens and its separator,
full-width separators, caption and tag dropout, caption_extension; deterministic under seed,
and what the text encoder saw per step for a fixed seed."""
from __future__ import annotations

import random
import shutil
from types import SimpleNamespace

import pytest
import yaml

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.captions import CaptionHabits, split_tags
from lora_kernel.training.checks import load_config


def _habits(**kw):
    base = {"shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "",
            "caption_separator": ",", "caption_dropout_rate": 0.0,
            "caption_tag_dropout_rate": 0.0}
    return CaptionHabits(SimpleNamespace(**{**base, **kw}))


def test_full_width_comma_splits_like_a_comma():
    assert split_tags("enclave，红色, circle ，  blue") == ["enclave", "红色", "circle", "blue"]
    assert split_tags("a; b, c", ";") == ["a", "b, c"]


def test_shuffle_keeps_the_trigger_word_first_and_is_deterministic_under_seed():
    h = _habits(shuffle_caption=True, keep_tokens=1)
    caption = "enclave, red, circle, small, flat, bright"
    seen = {h.captions([caption], seed)[0] for seed in range(20)}
    assert len(seen) > 5  # it shuffles
    assert all(c.startswith("enclave, ") for c in seen)
    assert all(sorted(c.split(", ")) == sorted(caption.split(", ")) for c in seen)
    assert h.captions([caption], 3) == h.captions([caption], 3)
    plain = _habits()
    assert plain.captions([caption], 3) == [caption] and not plain.active


def test_keep_tokens_separator_fixes_the_part_before_it():
    h = _habits(shuffle_caption=True, keep_tokens=0, keep_tokens_separator="|||")
    out = h.captions(["enclave, style ||| red, circle, blue"], 1)[0]
    assert out.startswith("enclave, style, ")


def test_caption_and_tag_dropout_rates():
    rng = random.Random(0)
    drop = _habits(caption_dropout_rate=0.5)
    empty = sum(drop.apply("a, b, c", rng) == "" for _ in range(400))
    assert 150 < empty < 250
    tags = _habits(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [tags.apply("enclave, a, b, c, d", rng) for _ in range(200)]
    assert all(o.startswith("enclave") for o in outs)
    kept = sum(len(o.split(", ")) - 1 for o in outs) / (200 * 4)
    assert 0.4 < kept < 0.6


@pytest.fixture
def kohya_data(tmp_path, demo_home):
    """A kohya-layout copy of the demo images: 2_enclave/<i>.png with <i>.txt tag captions
    (trigger word first) and a stale <i>.caption beside each."""
    import csv
    src = demo_home / "demo" / "datasets" / "image"
    folder = tmp_path / "data" / "2_enclave"
    folder.mkdir(parents=True)
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    for i, row in enumerate(rows):
        shutil.copy(src / row["file_name"], folder / f"{i}.png")
        tags = row["text"].replace(" in enclave style", "").split()
        (folder / f"{i}.txt").write_text("enclave，" + "，".join(tags) + "\n")
        (folder / f"{i}.caption").write_text("old caption\n")
    return tmp_path / "data"


def _config(demo_home, tmp_path, data, **kw):
    raw = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    raw["base_model"] = str((demo_home / "demo" / raw["base_model"]).resolve())
    raw.pop("metadata_path")
    raw.update({"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), **kw})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_caption_extension_picks_the_sidecar(demo_home, tmp_path, kohya_data):
    with pytest.raises(ConfigError, match="has two caption files"):
        load_config(_config(demo_home, tmp_path, kohya_data))
    cfg = load_config(_config(demo_home, tmp_path, kohya_data, caption_extension=".txt"))
    from lora_kernel.training.data import read_image_rows
    assert all(r["caption"].startswith("enclave，") for r in read_image_rows(cfg))


def test_keep_tokens_above_a_captions_tag_count_warns_with_the_rows(demo_home, tmp_path,
                                                                     kohya_data):
    cfg = load_config(_config(demo_home, tmp_path, kohya_data, caption_extension=".txt",
                              shuffle_caption=True, keep_tokens=9))
    warned = [w for w in cfg.dataset_warnings if "keep_tokens: 9" in w]
    assert len(warned) == 4 and "2_enclave/0.txt" in warned[0] and "fix:" in warned[0]
    cfg = load_config(_config(demo_home, tmp_path, kohya_data, caption_extension=".txt",
                              shuffle_caption=True, keep_tokens=1))
    assert not [w for w in cfg.dataset_warnings if "keep_tokens" in w]


@pytest.mark.slow
def test_what_the_text_encoder_saw_per_step_for_a_fixed_seed(demo_home, tmp_path, kohya_data,
                                                             monkeypatch):
    """The token ids that reach the text encoder, decoded, per micro-batch: shuffled tags
    with the trigger word first, the same for the same seed, other for another seed."""
    from lora_kernel.training.families.sd15 import SD15Family
    from lora_kernel.training.train import train

    seen: list[list[str]] = []
    original = SD15Family.encode_prompt

    def spy(self, comps, ids):
        seen.append(comps.tokenizers[0].batch_decode(ids[0], skip_special_tokens=True))
        return original(self, comps, ids)

    monkeypatch.setattr(SD15Family, "encode_prompt", spy)

    def run(seed):
        seen.clear()
        cfg = load_config(_config(demo_home, tmp_path, kohya_data, caption_extension=".txt",
                                  shuffle_caption=True, keep_tokens=1, max_train_steps=3,
                                  batch_size=2, save_steps=0, seed=seed, cache_latents=False),
                          {"output_dir": str(tmp_path / f"out{seed}")})
        train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)
        return list(seen)

    first = run(5)
    # 8 examples (4 images x 2 repeats) in batches of 2: 4 evaluation batches before and
    # after training see the captions as written; the 3 steps between see this step's
    assert len(first) == 11 and first[:4] == first[-4:]
    written = [sorted(c.split(" \uff0c ")) for b in first[:4] for c in b]
    steps = first[4:7]
    for batch in steps:
        assert len(batch) == 2
        for caption in batch:
            tags = caption.split(" , ")
            assert tags[0] == "enclave"  # the trigger word stays first
            assert sorted(tags) in written  # the same tags, split at the full-width comma
    as_written = [c.split(" \uff0c ") for b in first[:4] for c in b]
    assert any(c.split(" , ") not in as_written for b in steps for c in b)  # shuffled
    assert run(5)[4:7] == steps  # same seed, same captions (other seeds: the unit tests)
