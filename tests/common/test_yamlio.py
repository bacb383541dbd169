"""The one YAML loader (configs, ``lora run -f`` parameters, policies, ``-p`` values): YAML as
kohya / diffusers users write it — ``1e-4`` is a number, ``no`` is text, only ``true`` /
``false`` are booleans — and a key given twice is refused naming both lines.

Every refused case is paired with the case that must work.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import DuplicateKeyError, load_yaml, parse_yaml
from lora_kernel.training.checks import load_config
from lora_kernel.training.config import parse_value


@pytest.fixture
def image_cfg(tmp_path: Path, demo_home: Path):
    """``write(text) -> config path``: a minimal valid image config (the demo's tiny model,
    never loaded) plus the YAML ``text``."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "metadata.csv").write_text("file_name,text\na.png,a cat\n")
    model = demo_home / "demo" / "models" / "tiny-sd"

    def write(text: str = "") -> Path:
        path = tmp_path / "cfg.yaml"
        path.write_text(f"train_data_dir: data\nbase_model: {model}\nresolution: 64\n" + text)
        return path
    return write


@pytest.mark.parametrize("text, number", [
    ("1e-4", 0.0001), ("5e-5", 0.00005), ("1E-3", 0.001), ("-2e3", -2000.0), ("1.0e5", 1e5),
    ("3.0e-3", 0.003), ("1.5", 1.5), (".5", 0.5), ("1_000.5", 1000.5),
])
def test_exponents_without_a_dot_are_numbers(text, number):
    value = parse_yaml(f"learning_rate: {text}\n")["learning_rate"]
    assert isinstance(value, float) and value == number


@pytest.mark.parametrize("text, value", [
    ("100", 100), ("0", 0), ("-3", -3), ("0x10", 16), ("1_000", 1000),  # integers stay ints
    ("1e", "1e"), ("e5", "e5"), ("1.2.3", "1.2.3"), ("v1e4", "v1e4"),  # not numbers: text
])
def test_integers_and_text_are_untouched(text, value):
    got = parse_yaml(f"k: {text}\n")["k"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["no", "No", "NO", "yes", "on", "off", "y", "n"])
def test_yaml_1_1_booleans_are_text(text):
    assert parse_yaml(f"mixed_precision: {text}\n") == {"mixed_precision": text}


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("TRUE", True), ("tRuE", True),
    ("false", False), ("False", False), ("FALSE", False),
])
def test_true_and_false_in_any_case_are_booleans(text, value):
    assert parse_yaml(f"center_crop: {text}\n") == {"center_crop": value}


def test_pyyaml_itself_is_not_changed():
    assert yaml.safe_load("a: no\nb: 1e-4\n") == {"a": False, "b": "1e-4"}


def test_mixed_precision_no_validates(image_cfg):
    assert load_config(image_cfg("mixed_precision: no\n")).mixed_precision == "no"
    assert load_config(image_cfg("mixed_precision: bf16\n")).mixed_precision == "bf16"


def test_learning_rate_1e_4_equals_0_0001(image_cfg):
    assert load_config(image_cfg("learning_rate: 1e-4\n")).learning_rate == 0.0001
    assert load_config(image_cfg("learning_rate: 0.0001\n")).learning_rate == 0.0001
    assert load_config(image_cfg("learning_rate: 5E-5\n")).learning_rate == 5e-5


def test_bool_key_given_yes_says_use_true_or_false(image_cfg):
    path = image_cfg("center_crop: yes\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.exit_code == 2 and err.value.key == "center_crop"
    msg = str(err.value)
    assert str(path) in msg and "'yes'" in msg and "fix: use true or false" in msg
    # must work: the same key given true (any case) or false
    assert load_config(image_cfg("center_crop: True\n")).center_crop is True
    assert load_config(image_cfg("center_crop: false\n")).center_crop is False


def test_duplicate_key_is_refused_naming_both_lines(image_cfg):
    path = image_cfg("lora_rank: 4\nepochs: 2\nseed: 1\nlora_rank: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.exit_code == 2 and err.value.key == "lora_rank"
    assert str(err.value) == (f"{path}: key 'lora_rank' appears twice, at lines 4 and 7; "
                              "fix: keep one")
    # must work: the same file with one of them
    assert load_config(image_cfg("lora_rank: 4\nepochs: 2\nseed: 1\n")).lora_rank == 4


def test_duplicate_key_in_a_nested_mapping_and_a_policy(tmp_path):
    pol = tmp_path / "review.yaml"
    pol.write_text("publication:\n  expiry_days: 30\n  access_groups: [a]\n  expiry_days: 9\n")
    with pytest.raises(ConfigError, match=r"key 'expiry_days' appears twice, at lines 2 and 4"):
        load_yaml(pol, what="policy file")
    pol.write_text("publication:\n  expiry_days: 30\n  access_groups: [a]\n")
    assert load_yaml(pol)["publication"]["expiry_days"] == 30


def test_merge_keys_may_be_overridden():
    text = "base: &b {lora_rank: 4, seed: 1}\nrun:\n  <<: *b\n  lora_rank: 8\n"
    assert parse_yaml(text)["run"] == {"lora_rank": 8, "seed": 1}
    with pytest.raises(DuplicateKeyError):
        parse_yaml("run:\n  <<: {seed: 1}\n  seed: 2\n  seed: 3\n")


@pytest.mark.parametrize("text", ["1e-4", "5e-5", "1E-3", "no", "yes", "true", "False", "16",
                                  "0.5", "[to_q, to_v]", "cosine", "null", "{a: 1}"])
def test_p_values_and_files_agree(text, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"k: {text}\n")
    assert parse_value(text) == load_yaml(path)["k"]
    assert type(parse_value(text)) is type(load_yaml(path)["k"])


def test_p_value_that_is_not_yaml_stays_text():
    assert parse_value("a: b: c") == "a: b: c"
    assert parse_value("{a: 1, a: 2}") == "{a: 1, a: 2}"
