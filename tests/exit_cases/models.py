"""Model-input cases: base model files and folders of the wrong kind, target modules, output
folders and memory."""
from __future__ import annotations

import pickle
import random
from collections.abc import Callable

import numpy as np
import yaml

from exit_cases import Case


def _model_file(c: Case, data: bytes) -> list:
    (c.tmp / "model.safetensors").write_bytes(data)
    return ["config", c.config(base_model=str(c.tmp / "model.safetensors"))]


def _corrupt(c: Case) -> list:
    data = random.Random(7).randbytes(4096)  # seeded: never starts like a pickle
    return _model_file(c, data)


def _renamed_pickle(c: Case) -> list:
    return _model_file(c, pickle.dumps({"state_dict": [1, 2, 3]}, protocol=4))


def _empty_folder(c: Case) -> list:
    (c.tmp / "model").mkdir()
    return ["config", c.config(base_model=str(c.tmp / "model"))]


def _only_config_json(c: Case) -> list:
    (c.tmp / "model").mkdir()
    config = c.demo / "models" / "tiny-llama" / "config.json"
    (c.tmp / "model" / "config.json").write_text(config.read_text())
    return ["config", _text_config(c, base_model=str(c.tmp / "model"))]


def _text_config(c: Case, **changes) -> str:
    """The demo text config with ``changes``, in a temp file."""
    data = yaml.safe_load((c.demo / "text_lora.yaml").read_text())
    for key in ("metadata_path", "base_model"):
        data[key] = str((c.demo / data[key]).resolve())
    data.update(changes)
    path = c.tmp / "text.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _refiner_folder(c: Case) -> list:
    """The tiny SDXL saved as an SDXL refiner says it is (img2img pipeline class, aesthetic
    score conditioning)."""
    import json
    import shutil

    folder = c.tmp / "refiner"
    shutil.copytree(c.demo / "models" / "tiny-sdxl", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return ["config", c.config(base_model=str(folder))]


def _unknown_layout(c: Case) -> list:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"encoder.blocks.0.weight": np.zeros(4, dtype=np.float32)},
              str(c.tmp / "odd.safetensors"))
    return ["config", c.config(base_model=str(c.tmp / "odd.safetensors"))]


def _sd15_lora_as_sdxl_init(c: Case) -> list:
    """An adapter file that says it is an SD1.5 LoRA (header metadata, as ours are)."""
    from safetensors.numpy import save_file

    path = c.tmp / "sd15_lora.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    save_file({key: np.zeros((8, 32), dtype=np.float32)}, str(path),
              metadata={"lora_enclave.model_family": "sd15", "ss_base_model_version": "sd_v1"})
    return ["config", c.config(base_model=str(c.demo / "models" / "tiny-sdxl"),
                               init=str(path))]


def _output_under_file(c: Case) -> list:
    (c.tmp / "a-file").write_text("not a folder")
    return ["config", c.config(output_dir=str(c.tmp / "a-file" / "out"))]


_HELD: list = []  # the lock of a "running" training, held by this process for the case


def _output_in_use(c: Case) -> list:
    import fcntl

    from lora_kernel.training.train import LOCK_NAME

    while _HELD:
        _HELD.pop().close()
    out = c.tmp / "out"
    out.mkdir()
    fh = open(out / LOCK_NAME, "w")  # noqa: SIM115 - held past this function, on purpose
    fcntl.flock(fh, fcntl.LOCK_EX)
    fh.write("pid 4242, user alice, host gpu1, since 2026-12-07 10:00:00")
    fh.flush()
    _HELD.append(fh)
    return ["train", "--config", c.config(output_dir=str(out), max_train_steps=1),
            "--no-samples", "--quiet", "--home", c.tmp / "home"]


def _bad_targets(c: Case) -> list:
    return ["train", "--config", c.config(target_modules=["to_qq"], max_train_steps=1),
            "--no-samples", "--quiet", "--home", c.tmp / "home"]


def _models_add_taken(c: Case) -> list:
    src = c.demo / "models" / "tiny-sd"
    (c.tmp / "shared" / "models" / "tiny-sd").mkdir(parents=True)
    return ["models", "add", src, "--store", c.tmp / "shared"]


CASES: dict[str, Callable[[Case], list]] = {
    "base model `.safetensors` is corrupt": _corrupt,
    "base model `.safetensors` is empty (0 bytes)": lambda c: _model_file(c, b""),
    "base model `.safetensors` is a renamed pickle": _renamed_pickle,
    "base model folder is empty": _empty_folder,
    "base model folder holds only `config.json`": _only_config_json,
    "a text model given to `task: image`":
        lambda c: ["config", c.config(base_model=str(c.demo / "models" / "tiny-llama"))],
    "a Stable Diffusion model given to `task: text`":
        lambda c: ["config", _text_config(c, base_model=str(c.demo / "models" / "tiny-sd"))],
    "`target_modules` names no module": _bad_targets,
    "`output_dir` is under a file": _output_under_file,
    "`output_dir` is in use by another `lora train` still running": _output_in_use,
    "`resolution` needs more memory than the machine has":
        lambda c: ["config", c.config(resolution=16384)],
    "base model is of a family not trained here (Flux fill, SDXL refiner, inpainting, video)":
        _refiner_folder,
    "base model `.safetensors` keys fit no known checkpoint layout": _unknown_layout,
    "`text_encoder_2_lr` for a model with one text encoder":
        lambda c: ["config", c.config(text_encoder_2_lr=1e-4)],
    "an SD1.5 LoRA given as `init` to an SDXL run": _sd15_lora_as_sdxl_init,
    "`lora models add` under a name the shared store already has": _models_add_taken,
}
SLOW = {"`target_modules` names no module"}
