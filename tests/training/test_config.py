"""The one config validator: every error names the file, the key, the problem and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config, validate_config
from lora_kernel.training.config import parse_value


@pytest.fixture
def image_setup(tmp_path: Path, demo_home: Path) -> Path:
    """A minimal valid image config (tiny files, no model is loaded by validation)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "metadata.csv").write_text("file_name,text\na.png,a cat\n")
    (tmp_path / "model").symlink_to(demo_home / "demo" / "models" / "tiny-sd")
    cfg = {"train_data_dir": "data", "base_model": "model", "lora_rank": 4,
           "batch_size": 1, "epochs": 1, "learning_rate": 1e-4, "output_dir": "out",
           "save_steps": 0, "resolution": 64}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _write(path: Path, **changes) -> Path:
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_config_resolves_paths_against_the_file(image_setup):
    cfg = load_config(image_setup)
    assert cfg.train_data_dir == str(image_setup.parent / "data")
    assert cfg.metadata_path == str(image_setup.parent / "data" / "metadata.csv")
    assert cfg.output_dir == str(image_setup.parent / "out")
    assert cfg.alpha == 4.0 and cfg.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    json.dumps(cfg.to_dict())  # plain data


@pytest.mark.parametrize("change, key, words", [
    ({"lora_rnak": 4}, "lora_rnak", "did you mean 'lora_rank'"),
    ({"lora_rank": "eight"}, "lora_rank", "must be an integer"),
    ({"learning_rate": 5}, "learning_rate", "must be in (0, 1)"),
    ({"batch_size": 0}, "batch_size", "must be >= 1"),
    ({"resolution": 60}, "resolution", "multiple of 8"),
    ({"lr_scheduler": "cosin"}, "lr_scheduler", "did you mean 'cosine'"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "must be one of"),
    ({"lora_dropout": 1.5}, "lora_dropout", "[0, 1)"),
    ({"train_text_encoder": "yes"}, "train_text_encoder", "true or false"),
    ({"base_model": "missing"}, "base_model", "base model not found"),
    ({"train_data_dir": "nowhere", "metadata_path": "nowhere/m.csv"}, "train_data_dir",
     "folder not found"),
    ({"task": "audio"}, "task", "must be one of image, text"),
    ({"caption_column": "caption"}, "caption_column", "not in"),
])
def test_each_kind_of_error_names_file_key_and_fix(image_setup, change, key, words):
    _write(image_setup, **change)
    with pytest.raises(ConfigError) as err:
        load_config(image_setup)
    msg = str(err.value)
    assert str(image_setup) in msg and f"key '{key}'" in msg and words in msg
    assert err.value.key == key


def test_empty_dataset_is_refused(image_setup):
    (image_setup.parent / "data" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ConfigError, match="dataset is empty"):
        load_config(image_setup)


def test_missing_image_named_in_metadata_is_refused(image_setup):
    (image_setup.parent / "data" / "metadata.csv").write_text("file_name,text\nb.png,x\n")
    with pytest.raises(ConfigError, match="line 2 .* names 'b.png'"):
        load_config(image_setup)


def test_unreadable_image_is_refused_and_a_real_one_accepted(image_setup):
    data = image_setup.parent / "data"
    (data / "metadata.csv").write_text("file_name,text\na.png,x\nb.png,y\n")
    (data / "b.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="line 3 .* not a readable image"):
        load_config(image_setup)
    Image.new("RGB", (8, 8)).save(data / "b.png")
    assert load_config(image_setup)


def test_pickle_base_model_is_refused_before_loading(image_setup):
    """The validator and the loader share one refusal: UnsafeModelError, exit code 3."""
    from lora_kernel.common.errors import UnsafeModelError

    (image_setup.parent / "model.ckpt").write_bytes(b"not loaded")
    _write(image_setup, base_model="model.ckpt")
    with pytest.raises(UnsafeModelError, match="pickle") as info:
        load_config(image_setup)
    assert info.value.exit_code == 3 and "safetensors" in str(info.value)
    (image_setup.parent / "model.txt").write_bytes(b"not a model")
    _write(image_setup, base_model="model.txt")
    with pytest.raises(ConfigError, match="unsupported model file model.txt") as info:
        load_config(image_setup)
    assert str(info.value).count("key 'base_model'") == 1


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 4\n  bad: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_overrides_apply_and_are_validated(image_setup):
    cfg = load_config(image_setup, {"learning_rate": parse_value("5e-4"), "lora_rank": 16})
    assert cfg.learning_rate == 5e-4 and cfg.lora_rank == 16
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(image_setup, {"lora_rank": -1})


def test_an_error_in_an_override_names_the_override_and_one_in_the_file_the_file(image_setup):
    with pytest.raises(ConfigError) as err:
        load_config(image_setup, {"lora_rank": 0})
    text = str(err.value)
    assert text.startswith("override -p lora_rank 0 (over cfg.yaml): key 'lora_rank'"), text
    _write(image_setup, lora_rank=0)
    with pytest.raises(ConfigError) as err:
        load_config(image_setup)
    assert str(err.value).startswith(f"{image_setup}: key 'lora_rank'"), str(err.value)
    assert load_config(image_setup, {"lora_rank": 8}).lora_rank == 8  # the override fixes it


def test_text_dataset_checks(tmp_path, demo_home):
    (tmp_path / "lm").symlink_to(demo_home / "demo" / "models" / "tiny-llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    raw = {"task": "text", "metadata_path": str(data), "base_model": str(tmp_path / "lm")}
    assert validate_config(raw, base_dir=tmp_path).task == "text"
    data.write_text('{"question": "a"}\n')
    with pytest.raises(ConfigError, match="neither 'text' nor 'prompt'"):
        validate_config(raw, base_dir=tmp_path)
    data.write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        validate_config(raw, base_dir=tmp_path)
    data.write_text("\n")
    with pytest.raises(ConfigError, match="dataset is empty"):
        validate_config(raw, base_dir=tmp_path)


def test_templates_are_valid_keys():
    root = Path(__file__).resolve().parents[2] / "templates"
    for name in ("image_lora.yaml", "text_lora.yaml"):
        raw = yaml.safe_load((root / name).read_text())
        cfg = validate_config(raw, source=root / name, base_dir=root, check_paths=False)
        assert cfg.task in ("image", "text")
