"""Every base model, target list, output folder and resolution gets a clear answer before
training: corrupt, empty or renamed-pickle ``.safetensors`` files, empty folders, folders
without weights and models of the wrong kind are refused by validation (the loaders give the
same answer); ``target_modules`` naming nothing is refused where LoRA is attached; an
``output_dir`` that cannot be written and a run that cannot fit in memory are refused by
validation. Each refusal is paired with an input that works."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import yaml

from lora_kernel.common.errors import ConfigError, UnsafeModelError
from lora_kernel.training import models
from lora_kernel.training.checks import load_config
from lora_kernel.training.model_safety import check_model_path, read_safetensors_header

ROOT = os.geteuid() == 0


@pytest.fixture
def image_cfg(demo_home, tmp_path):
    """``write(**changes)`` -> a copy of the demo image config (absolute paths) with changes."""
    return _config_writer(demo_home / "demo" / "image_lora.yaml", tmp_path)


@pytest.fixture
def text_cfg(demo_home, tmp_path):
    """``write(**changes)`` -> a copy of the demo text config (absolute paths) with changes."""
    return _config_writer(demo_home / "demo" / "text_lora.yaml", tmp_path)


def _config_writer(src: Path, tmp_path: Path):
    def write(**changes) -> Path:
        data = yaml.safe_load(src.read_text())
        for key in ("train_data_dir", "metadata_path", "base_model"):
            if data.get(key):
                data[key] = str((src.parent / data[key]).resolve())
        data["output_dir"] = str(tmp_path / "out")
        data.update({k: str(v) if isinstance(v, Path) else v for k, v in changes.items()})
        path = tmp_path / f"cfg-{src.stem}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return write


def _refused(path: Path, exc=ConfigError, key: str = "base_model", **match) -> str:
    with pytest.raises(exc) as info:
        load_config(path)
    msg = str(info.value)
    if exc is ConfigError:
        assert info.value.key == key and info.value.exit_code == 2, msg
        assert f"key '{key}'" in msg and str(path) in msg and "fix:" in msg, msg
    else:
        assert info.value.exit_code == 3 and "fix:" in msg, msg
    return msg


class _Payload:
    """Unpickling this object writes a marker file: a stand-in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# -- .safetensors files ---------------------------------------------------------------------
def _random_bytes(n: int) -> bytes:
    data = random.Random(7).randbytes(n)
    assert data[:1] != b"\x80" and data[:4] != b"PK\x03\x04"
    return data


def test_a_corrupt_safetensors_file_is_a_config_error(image_cfg, tmp_path, demo_home):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(_random_bytes(4096))
    msg = _refused(image_cfg(base_model=bad))
    assert "is not a valid .safetensors file" in msg and "copy the file again" in msg
    # a truncated copy of a real checkpoint: its tensors point past the end
    real = demo_home / "demo" / "models" / "tiny-sd.safetensors"
    bad.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    assert "truncated" in _refused(image_cfg(base_model=bad))
    # the real one validates
    assert load_config(image_cfg(base_model=real)).base_model == str(real)


def test_an_empty_safetensors_file_is_a_config_error(image_cfg, tmp_path):
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in _refused(image_cfg(base_model=empty))


@pytest.mark.parametrize("kind", ["pickle", "torch zip"])
def test_a_pickle_renamed_to_safetensors_is_refused_unread(image_cfg, tmp_path, kind):
    import torch

    marker = tmp_path / "marker"
    fake = tmp_path / "model.safetensors"
    if kind == "pickle":
        fake.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=4))
    else:
        torch.save({"w": torch.zeros(2)}, str(fake))
    msg = _refused(image_cfg(base_model=fake), UnsafeModelError)
    assert "this is a pickle/torch file renamed to .safetensors" in msg
    with pytest.raises(UnsafeModelError, match="renamed to .safetensors"):
        models.load_sd_components(fake)
    assert not marker.exists()


def test_a_renamed_pickle_inside_a_model_folder_is_refused(demo_home, tmp_path, image_cfg):
    folder = tmp_path / "sd"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-sd", folder)
    assert load_config(image_cfg(base_model=folder)).base_model == str(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(pickle.dumps([1]))
    msg = _refused(image_cfg(base_model=folder), UnsafeModelError)
    assert "unet/diffusion_pytorch_model.safetensors" in msg


def test_the_header_is_read_without_tensors(demo_home):
    header = read_safetensors_header(demo_home / "demo" / "models" / "tiny-sd.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert header[key]["shape"] == [32, 4, 3, 3] and header[key]["dtype"] == "F32"


# -- folders and model kinds ----------------------------------------------------------------
@pytest.mark.parametrize("task", ["image", "text"])
def test_an_empty_model_folder_is_refused(image_cfg, text_cfg, tmp_path, task):
    (tmp_path / "empty").mkdir()
    write = image_cfg if task == "image" else text_cfg
    msg = _refused(write(base_model=tmp_path / "empty"))
    assert "is empty" in msg and "point base_model at" in msg


def test_a_folder_with_only_config_json_is_refused(demo_home, image_cfg, text_cfg, tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    shutil.copy(demo_home / "demo" / "models" / "tiny-llama" / "config.json", folder)
    msg = _refused(text_cfg(base_model=folder))
    assert "has no weights (*.safetensors), only config.json" in msg
    msg = _refused(image_cfg(base_model=folder))
    assert "is a text model (LlamaForCausalLM)" in msg
    (folder / "config.json").write_text("{}")
    assert "is not a diffusers folder" in _refused(image_cfg(base_model=folder))


def test_a_text_model_given_to_task_image_is_refused(demo_home, image_cfg, text_cfg):
    llama = demo_home / "demo" / "models" / "tiny-llama"
    msg = _refused(image_cfg(base_model=llama))
    assert "is a text model (LlamaForCausalLM), not a Stable Diffusion model" in msg
    assert "set task: text" in msg and "diffusers folder or a .safetensors checkpoint" in msg
    with pytest.raises(ConfigError, match="set task: text"):
        models.load_sd_components(llama)
    # its weights file alone, too
    msg = _refused(image_cfg(base_model=llama / "model.safetensors"))
    assert "holds a text model's weights" in msg
    assert load_config(text_cfg(base_model=llama)).task == "text"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd.safetensors"])
def test_a_stable_diffusion_model_given_to_task_text_is_refused(demo_home, text_cfg,
                                                                  image_cfg, name):
    sd = demo_home / "demo" / "models" / name
    msg = _refused(text_cfg(base_model=sd))
    assert "set task: image" in msg and "causal-LM folder" in msg
    with pytest.raises(ConfigError, match="set task: image"):
        models.load_causal_lm(sd)
    assert load_config(image_cfg(base_model=sd)).task == "image"


def test_a_diffusers_folder_without_unet_weights_is_refused(demo_home, image_cfg, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-sd", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "has no unet weights" in _refused(image_cfg(base_model=folder))


def test_a_config_of_another_architecture_is_refused_by_the_text_loader(demo_home, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    clip = json.loads((demo_home / "demo" / "models" / "tiny-sd" / "text_encoder" /
                       "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(clip))
    with pytest.raises(ConfigError, match="not a causal language model") as info:
        models.load_causal_lm(folder)
    assert info.value.key == "base_model"


@pytest.mark.skipif(ROOT, reason="root reads any file; the service-mode tests cover it as root")
def test_an_unreadable_model_is_a_config_error(demo_home, text_cfg, tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(demo_home / "demo" / "models" / "tiny-llama", folder)
    weights = folder / "model.safetensors"
    assert load_config(text_cfg(base_model=folder)).base_model == str(folder)
    weights.chmod(0)
    try:
        with pytest.raises(ConfigError, match="permission denied reading") as info:
            load_config(text_cfg(base_model=folder))
        assert str(weights) in str(info.value) and info.value.exit_code == 2
    finally:
        weights.chmod(0o600)


def test_check_model_path_without_a_task_checks_safety_only(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    assert check_model_path(tmp_path / "tok") == (tmp_path / "tok").resolve()


# -- target_modules -------------------------------------------------------------------------
def test_target_modules_naming_nothing_is_refused_before_training_text(demo_home, text_cfg):
    from lora_kernel.training.text import TextTask

    cfg = load_config(text_cfg(target_modules=["q_proj", "v_projj"]))
    model, tok = models.load_causal_lm(cfg.base_model)
    with pytest.raises(ConfigError) as info:
        TextTask(cfg, model, tok, device=__import__("torch").device("cpu"))
    msg = str(info.value)
    assert info.value.key == "target_modules" and info.value.exit_code == 2
    assert "'v_projj' names no module" in msg and "closest names: v_proj" in msg
    assert "q_proj, v_proj" in msg  # the default, as the fix
    assert not getattr(model, "peft_config", None)  # nothing attached
    ok = load_config(text_cfg(target_modules=["q_proj", "v_proj"]))
    task = TextTask(ok, model, tok, device=__import__("torch").device("cpu"))
    assert task.named_trainable()


def test_target_modules_naming_nothing_is_refused_before_training_image(demo_home, image_cfg,
                                                                         tmp_path):
    import torch

    from lora_kernel.training.image import ImageTask

    def task(**changes):
        cfg = load_config(image_cfg(**changes))
        comps = models.load_sd_components(cfg.base_model)
        return comps, lambda: ImageTask(cfg, comps, device=torch.device("cpu"), cache_dir=None,
                                        dataset_version="ds-test", log=lambda m: None)

    comps, make = task(target_modules=["to_qq"])
    with pytest.raises(ConfigError) as info:
        make()
    msg = str(info.value)
    assert info.value.key == "target_modules"
    assert "'to_qq' names no module of the UNet" in msg and "closest names: to_q" in msg
    assert not getattr(comps.unet, "peft_config", None)
    comps, make = task(target_modules=["attn1"])  # a container, not a layer
    with pytest.raises(ConfigError, match="Attention module.*which LoRA cannot wrap"):
        make()
    comps, make = task(target_modules=["to_q", "to_out.0"])
    assert make().named_trainable()


# -- output_dir -----------------------------------------------------------------------------
def test_output_dir_under_a_file_is_refused(image_cfg, tmp_path):
    (tmp_path / "a-file").write_text("x")
    msg = _refused(image_cfg(output_dir=tmp_path / "a-file" / "out"), key="output_dir")
    assert "which is a file" in msg and "set output_dir to a folder you can write" in msg
    msg = _refused(image_cfg(output_dir=tmp_path / "a-file"), key="output_dir")
    assert "is a file, not a folder" in msg
    cfg = load_config(image_cfg(output_dir=tmp_path / "new" / "out"))
    assert not Path(cfg.output_dir).exists()  # validation creates nothing


@pytest.mark.skipif(ROOT, reason="root ignores file modes; 'under a file' covers root")
def test_read_only_output_dir_is_refused(image_cfg, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro, ro / "sub" / "out"):
            msg = _refused(image_cfg(output_dir=out), key="output_dir")
            assert "is not writable by you" in msg
    finally:
        ro.chmod(0o755)
    assert load_config(image_cfg(output_dir=ro / "sub")).output_dir == str(ro / "sub")


# -- memory ---------------------------------------------------------------------------------
def test_a_resolution_the_machine_cannot_hold_is_refused(image_cfg):
    msg = _refused(image_cfg(resolution=16384), key="resolution")
    assert "training needs about" in msg and "GiB available" in msg
    assert "lower resolution, lower batch_size, set gradient_checkpointing: true" in msg
    cfg = load_config(image_cfg())  # the demo's own resolution
    assert cfg.resolution == 64


def test_the_memory_estimate_counts_the_real_parameters(demo_home, image_cfg, text_cfg):
    from lora_kernel.training.models import estimate_training_memory

    cfg = load_config(image_cfg())
    est = estimate_training_memory(cfg)
    comps = models.load_sd_components(cfg.base_model)
    params = sum(p.numel() for m in (comps.unet, comps.vae, comps.text_encoder)
                 for p in m.parameters())
    assert est.weights == 4 * params
    single = load_config(image_cfg(base_model=demo_home / "demo" / "models" /
                                   "tiny-sd.safetensors"))
    assert estimate_training_memory(single).weights == est.weights
    lm_cfg = load_config(text_cfg())
    lm, _ = models.load_causal_lm(lm_cfg.base_model)
    assert estimate_training_memory(lm_cfg).weights == 4 * sum(p.numel()
                                                               for p in lm.parameters())
    # activations fall with gradient checkpointing and with mixed precision
    big = load_config(image_cfg(resolution=512))
    gc = load_config(image_cfg(resolution=512, gradient_checkpointing=True))
    bf16 = load_config(image_cfg(resolution=512, mixed_precision="bf16"))
    a = estimate_training_memory(big).activations
    assert estimate_training_memory(gc).activations < a / 2
    assert estimate_training_memory(bf16).activations * 2 == a


def test_with_cuda_the_gpu_and_host_are_checked_apart(image_cfg, monkeypatch):
    """The CUDA branch's arithmetic, with the GPU's free memory given (1 GiB): weights and
    activations must fit on the GPU, the dataset's pixels in host memory."""
    from lora_kernel.training import checks

    monkeypatch.setattr(checks, "_cuda_free_bytes", lambda: 2 ** 30)
    assert load_config(image_cfg()).resolution == 64
    msg = _refused(image_cfg(resolution=2048), key="resolution")
    assert "but the GPU has 1.0 GiB available" in msg
    assert "set mixed_precision: bf16 (or fp16)" in msg
    assert load_config(image_cfg(resolution=512)).resolution == 512


@pytest.mark.gpu
def test_on_cuda_the_estimate_is_compared_with_free_gpu_memory(image_cfg):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lora_kernel.training.checks import _cuda_free_bytes

    free = _cuda_free_bytes()
    assert free is not None and 0 < free <= torch.cuda.mem_get_info()[1]
    msg = _refused(image_cfg(resolution=16384), key="resolution")
    assert "the GPU has" in msg or "host memory has" in msg
    assert load_config(image_cfg()).resolution == 64
