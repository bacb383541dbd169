"""Flux.1 / SD3.5 cases: a model folder without its T5 or VAE, guidance for a model without a
guidance embedding, fp8 without an fp8 GPU, a resolution the 2x2 latent patches cannot tile."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import yaml

from exit_cases import Case


def _flux_config(c: Case, **changes) -> str:
    """The demo Flux config with ``changes``, in a temp file."""
    data = yaml.safe_load((c.demo / "flux_lora.yaml").read_text())
    for key in ("train_data_dir", "metadata_path", "base_model"):
        data[key] = str((c.demo / data[key]).resolve())
    data.update(changes)
    path = c.tmp / "flux.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _copy_flux(c: Case, name: str):
    folder = c.tmp / name
    shutil.copytree(c.demo / "models" / "tiny-flux", folder)
    return folder


def _without_t5(c: Case) -> list:
    """The transformer, CLIP and VAE, but no T5 (nor its entry in model_index.json)."""
    folder = _copy_flux(c, "flux-no-t5")
    shutil.rmtree(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("text_encoder_2")
    (folder / "model_index.json").write_text(json.dumps(index))
    return ["config", _flux_config(c, base_model=str(folder))]


def _schnell_with_guidance(c: Case) -> list:
    folder = _copy_flux(c, "flux-schnell")
    conf = folder / "transformer" / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "guidance_embeds": False}))
    return ["config", _flux_config(c, base_model=str(folder), guidance_scale=3.5)]


def _licence_not_allowed(c: Case) -> list:
    """The platform's policies, with the demo Flux under a licence only a group nobody is
    in may train on."""
    import shutil as sh
    from pathlib import Path

    pdir = c.tmp / "policies"
    sh.copytree(Path(__file__).resolve().parents[2] / "policies", pdir)
    with open(pdir / "models.yaml", "a", encoding="utf-8") as fh:
        fh.write("\n")  # the repository file ends its own mappings; ours replace them
    data = yaml.safe_load((pdir / "models.yaml").read_text())
    data["models"] = [{"match": "tiny-flux*", "licence": "flux-1-dev-non-commercial"}]
    data["licences"] = {"flux-1-dev-non-commercial": {"allowed_groups": ["nobody-xyz"]}}
    (pdir / "models.yaml").write_text(yaml.safe_dump(data))
    c.monkeypatch.setenv("LORA_POLICIES", str(pdir))
    return ["run", "--config", _flux_config(c, max_train_steps=1), "--quiet",
            "--home", c.tmp / "home"]


CASES: dict[str, Callable[[Case], list]] = {
    "`lora run` on a base model whose licence the policy does not allow for the user's groups":
        _licence_not_allowed,
    "a Flux / SD3.5 model folder without its T5 or VAE": _without_t5,
    "`guidance_scale` for a model without a guidance embedding (Flux.1-schnell, SD3.5)":
        _schnell_with_guidance,
    "`quantization: fp8` where training runs without an fp8 GPU":
        lambda c: ["config", _flux_config(c, quantization="fp8")],
    "`resolution` not divisible by 16 for Flux or SD3.5":
        lambda c: ["config", _flux_config(c, resolution=72)],
}
