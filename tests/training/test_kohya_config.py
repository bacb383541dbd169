"""``lora config --from-kohya`` (lora_kernel.training.kohya_config, cli/kohya.py): a held-out
lora-scripts TOML converts key by key into a YAML that validates and trains through
``lora run``; kohya spellings of our keys are accepted and reported; a Hugging Face model id
is refused before anything is written."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.kohya_config import convert_kohya

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kohya"


@pytest.fixture
def kohya_root(tmp_path, demo_home) -> Path:
    """A lora-scripts root: sd-models/tiny-sd (the demo model), train/enclave/2_enclave/
    (demo images with .txt tag captions, trigger word first), reg/1_shape/, prompts.txt and
    the fixture TOMLs."""
    import csv
    demo = demo_home / "demo"
    root = tmp_path / "lora-scripts"
    (root / "sd-models").mkdir(parents=True)
    (root / "sd-models" / "tiny-sd").symlink_to(demo / "models" / "tiny-sd")
    concept = root / "train" / "enclave" / "2_enclave"
    concept.mkdir(parents=True)
    reg = root / "reg" / "1_shape"
    reg.mkdir(parents=True)
    with open(demo / "datasets" / "image" / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows[:8]):
        shutil.copy(demo / "datasets" / "image" / row["file_name"], concept / f"{i}.png")
        words = row["text"].replace(" in enclave style", "").split()
        (concept / f"{i}.txt").write_text("enclave, " + ", ".join(words) + "\n")
        shutil.copy(demo / "datasets" / "image" / row["file_name"], reg / f"{i}.png")
    (root / "prompts.txt").write_text("# samples\nenclave, red, circle --n blurry --d 7 --s 3\n"
                                      "enclave, blue, square --d 8\n")
    for name in ("lora_scripts_sd15.toml", "dataset_config.toml"):
        shutil.copy(FIXTURES / name, root / name)
    return root


def _lora(*argv):
    from lora_kernel.cli import main as cli
    return cli.main([str(a) for a in argv])


def test_lora_scripts_toml_converts_every_key_and_validates(kohya_root, capsys):
    toml = kohya_root / "lora_scripts_sd15.toml"
    out = kohya_root / "converted.yaml"
    assert _lora("config", "--from-kohya", toml, "-o", out, "--kohya-root", kohya_root) == 0
    report = capsys.readouterr().err
    cfg = yaml.safe_load(out.read_text())
    assert cfg["base_model"] == str((kohya_root / "sd-models" / "tiny-sd").resolve())
    assert cfg["train_data_dir"] == str(kohya_root / "train" / "enclave")
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["batch_size"], cfg["epochs"]) == (4, 2, 4, 2)
    assert cfg["learning_rate"] == 0.003  # unet_lr wins over learning_rate, as in kohya
    assert cfg["train_text_encoder"] is True and cfg["text_encoder_lr"] == 0.0005
    assert (cfg["optimizer"], cfg["optimizer_args"]) == ("adamw8bit", ["weight_decay=0.01",
                                                                       "betas=0.9,0.99"])
    assert (cfg["lr_scheduler"], cfg["lr_scheduler_num_cycles"]) == ("cosine_with_restarts", 2)
    assert (cfg["resolution"], cfg["enable_bucket"], cfg["seed"]) == (64, True, 1337)
    assert (cfg["shuffle_caption"], cfg["keep_tokens"], cfg["caption_extension"]) == (
        True, 1, ".txt")
    assert cfg["sample_prompts"] == ["enclave, red, circle", "enclave, blue, square"]
    assert (cfg["sample_seeds"], cfg["sample_steps"]) == ([7, 8], 3)
    assert (cfg["save_every_n_epochs"], cfg["sample_every_n_epochs"]) == (1, 1)
    assert cfg["min_snr_gamma"] == 5
    # every key of the TOML is accounted for, by name, in the report
    keys = re.findall(r"^(\w+) =", (toml).read_text(), re.M)
    for key in keys:
        assert re.search(rf"^(mapped|not mapped|ignored): {key}\b", report, re.M), key
    assert re.search(r"^mapped: clip_skip -> clip_skip", report, re.M) and cfg["clip_skip"] == 2
    # lora-scripts writes prior_loss_weight always: without reg images it weights nothing
    assert re.search(r"^ignored: prior_loss_weight: no regularization", report, re.M)
    assert "prior_loss_weight" not in cfg
    assert re.search(r"^ignored: xformers: ", report, re.M)
    # the unmapped keys head the YAML as comments; the file validates with `lora config`
    assert "#   max_token_length:" in out.read_text()
    capsys.readouterr()
    assert _lora("config", out) == 0
    assert f"{out}: OK" in capsys.readouterr().out


def test_dataset_config_subsets_become_the_training_folder(kohya_root):
    toml = kohya_root / "k.toml"
    toml.write_text('pretrained_model_name_or_path = "./sd-models/tiny-sd"\n'
                    'dataset_config = "./dataset_config.toml"\nnetwork_dim = 4\n'
                    'network_train_unet_only = true\n')
    conv = convert_kohya(toml, root=kohya_root)
    assert conv.config["train_data_dir"] == str(kohya_root / "train" / "enclave" / "2_enclave")
    assert (conv.config["resolution"], conv.config["batch_size"]) == (64, 2)
    assert conv.config["shuffle_caption"] is True and conv.config["keep_tokens"] == 1
    assert conv.config["train_text_encoder"] is False
    # the is_reg subset is the regularization folder; its class_tokens come from N_class here
    assert conv.config["reg_data_dir"] == str(kohya_root / "reg")  # 1_shape: an N_class folder
    assert ("datasets.subsets.is_reg", "reg_data_dir") in conv.mapped
    why = dict(conv.unmapped)
    assert "datasets.subsets.class_tokens" not in why  # the training subset has none
    assert "N_class" in why["datasets.subsets.class_tokens (is_reg)"]


def test_lycoris_network_args_become_the_adapter_keys_and_validate(kohya_root, capsys):
    toml = kohya_root / "k.toml"
    toml.write_text('pretrained_model_name_or_path = "./sd-models/tiny-sd"\n'
                    'train_data_dir = "./train/enclave"\n'
                    'network_module = "lycoris.kohya"\n'
                    'network_args = ["conv_dim=8", "conv_alpha=2", "algo=loha", '
                    '"use_tucker=False"]\n')
    conv = convert_kohya(toml, root=kohya_root)
    assert (conv.config["network_type"], conv.config["conv_dim"], conv.config["conv_alpha"]) \
        == ("loha", 8, 2.0)
    assert ("network_args.conv_dim", "conv_dim") in conv.mapped
    assert "Tucker" in dict(conv.unmapped)["network_args.use_tucker"]
    out = kohya_root / "loha.yaml"
    out.write_text(conv.to_yaml())
    assert _lora("config", out) == 0, capsys.readouterr().err
    toml.write_text('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", '
                    '"factor=4", "dora_wd=True"]\n')
    conv = convert_kohya(toml, root=kohya_root)
    assert (conv.config["network_type"], conv.config["lokr_factor"],
            conv.config["use_dora"]) == ("lokr", 4, True)


@pytest.mark.parametrize(("module", "args", "why"), [
    ("networks.dylora", "[]", "DyLoRA"),
    ("lycoris.kohya", '["algo=ia3"]', "algo ia3"),
])
def test_networks_not_trained_here_are_listed_with_why(kohya_root, module, args, why):
    toml = kohya_root / "k.toml"
    toml.write_text(f'network_module = "{module}"\nnetwork_args = {args}\n')
    conv = convert_kohya(toml, root=kohya_root)
    assert why in dict(conv.unmapped)["network_module"]
    assert "network_type" not in conv.config


def test_a_remote_model_id_is_refused_and_nothing_is_written(kohya_root, capsys):
    toml = kohya_root / "remote.toml"
    toml.write_text('pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"\n')
    out = kohya_root / "remote.yaml"
    assert _lora("config", "--from-kohya", toml, "-o", out, "--kohya-root", kohya_root) == 2
    err = capsys.readouterr().err
    assert "pretrained_model_name_or_path" in err and "set a local path" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="Hugging Face model id"):
        convert_kohya(toml, root=kohya_root)


def test_kohya_spellings_of_our_keys_are_accepted_reported_and_recorded_canonically(
        demo_home, tmp_path, capsys):
    raw = yaml.safe_load((demo_home / "demo" / "image_lora.yaml").read_text())
    for key in ("train_data_dir", "metadata_path", "base_model"):
        raw[key] = str((demo_home / "demo" / raw[key]).resolve())
    raw.pop("lora_rank")
    raw.pop("batch_size")
    raw.update({"network_dim": 4, "train_batch_size": 2, "optimizer_type": "Lion",
                "output_dir": str(tmp_path / "out")})
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _lora("config", path) == 0
    out = capsys.readouterr()
    assert "network_dim is kohya's spelling of lora_rank; recorded as lora_rank" in out.err
    shown = out.out[:out.out.rindex("}") + 1]
    import json
    resolved = json.loads(shown)
    assert (resolved["lora_rank"], resolved["batch_size"], resolved["optimizer"]) == (
        4, 2, "lion")
    assert "network_dim" not in resolved
    raw["lora_rank"] = 8  # both spellings: which one is meant?
    path.write_text(yaml.safe_dump(raw))
    assert _lora("config", path) == 2
    assert "network_dim" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_lora_scripts_config_trains_through_lora_run(kohya_root, tmp_path,
                                                               monkeypatch,
                                                               lora_kernel_prefix):
    from lora_kernel.trusted.runner import run_config
    out = kohya_root / "converted.yaml"
    assert _lora("config", "--from-kohya", kohya_root / "lora_scripts_sd15.toml", "-o", out,
                 "--kohya-root", kohya_root) == 0
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("JUPYTER_PATH", str(lora_kernel_prefix / "share" / "jupyter"))
    rec = run_config(out, {"max_train_steps": 3, "sample_steps": 1, "save_steps": 0,
                           "sample_seeds": [7]}, home=home)
    assert rec.status == "succeeded"
    assert "adapter/enclave_kohya_kohya.safetensors" in set(rec.files)
