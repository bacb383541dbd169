"""Flux.1 as one ``.safetensors`` file: Black Forest Labs' transformer layout
(``double_blocks.``, ``single_blocks.``, fused q/k/v; bare as in ``flux1-dev.safetensors`` or
under ComfyUI's ``model.diffusion_model.``), and ComfyUI's all-in-one checkpoint that adds
CLIP-L (``text_encoders.clip_l.transformer.``, Hugging Face names), T5-XXL
(``text_encoders.t5xxl.transformer.``) and the VAE (``vae.``, the original autoencoder's
names). Only an all-in-one file trains: a transformer-only file lacks the T5 and the VAE,
and is refused naming what is missing (:func:`missing_parts`).

Configs come from ``lora_kernel/training/configs`` (``tiny-flux``, ``flux-dev``,
``flux-schnell``, picked by the transformer's width and its guidance embedding) or
``config=``; tokenizers from the bundle (the tiny one) or ``tokenizer/`` and ``tokenizer_2/``
folders next to the file (T5's and CLIP's vocabularies cannot be written offline).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from pathlib import Path

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.model_safety import check_model_path, read_safetensors_header

COMFY = "model.diffusion_model."
CLIP_L = "text_encoders.clip_l.transformer."
T5XXL = "text_encoders.t5xxl.transformer."
VAE = "vae."
CONFIGS = Path(__file__).resolve().parent / "configs"


def _transformer_prefix(keys) -> str | None:
    for prefix in (COMFY, ""):
        if any(k.startswith(prefix + "double_blocks.") for k in keys):
            return prefix
    return None


def missing_parts(header: dict) -> list[str]:
    """What a Flux single file lacks for training (``transformer``, ``T5-XXL``, ``CLIP-L``,
    ``VAE``), from its safetensors header."""
    keys = [k for k in header if k != "__metadata__"]
    found = {"transformer": _transformer_prefix(keys) is not None,
             "CLIP-L (text_encoders.clip_l.)": any(k.startswith(CLIP_L) for k in keys),
             "T5-XXL (text_encoders.t5xxl.)": any(k.startswith(T5XXL) for k in keys),
             "VAE (vae.)": any(k.startswith(VAE) for k in keys)}
    return [name for name, ok in found.items() if not ok]


def bundled_flux_config(header: dict) -> Path:
    """The bundled config set of a Flux file: ``tiny-flux`` (width 32), ``flux-dev`` (width
    3072 with ``guidance_in``) or ``flux-schnell`` (without)."""
    prefix = _transformer_prefix(header) or ""
    shape = (header.get(prefix + "img_in.weight") or {}).get("shape")
    guidance = any(k.startswith(prefix + "guidance_in.") for k in header)
    name = {32: "tiny-flux", 3072: "flux-dev" if guidance else "flux-schnell"}.get(
        shape[0] if shape else None)
    if name is None:
        raise ConfigError(f"unknown Flux transformer width {shape}; bundled configs: tiny-flux, "
                          f"flux-dev, flux-schnell; fix: pass config=<a diffusers folder with "
                          f"this model's configs>", key="base_model")
    return CONFIGS / name


def _tokenizer_dir(ckpt: Path, cfg_dir: Path, name: str) -> Path:
    for cand in (ckpt.parent / name, cfg_dir / name):
        if any((cand / f).is_file() for f in ("vocab.json", "tokenizer.json", "spiece.model")):
            return cand
    raise ConfigError(f"{ckpt}: no {name} found (looked in {ckpt.parent / name} and "
                      f"{cfg_dir / name}); the bundled '{cfg_dir.name}' configs cannot include "
                      f"the vocabularies offline; fix: copy the {name}/ folder of the model's "
                      f"diffusers release next to the checkpoint", key="base_model")


def load_flux_single_file(family, p: Path, *, dtype, vae_dtype=None, config=None) -> dict:
    """Transformer, VAE, text encoders and tokenizers of the all-in-one Flux file ``p``, as
    :func:`lora_kernel.training.flow_models.load_flow_parts` returns them."""
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from lora_kernel.training.flux_layout import from_bfl_state_dict
    from lora_kernel.training.single_file import fit_clip_keys

    header = read_safetensors_header(p)
    missing = missing_parts(header)
    if missing:
        raise missing_error(p, missing)
    cfg_dir = check_model_path(config) if config else bundled_flux_config(header)
    checkpoint = load_file(str(p))
    prefix = _transformer_prefix(checkpoint) or ""
    transformer = FluxTransformer2DModel.from_config(
        FluxTransformer2DModel.load_config(cfg_dir / "transformer"))
    bfl = {k[len(prefix):]: v for k, v in checkpoint.items()
           if k.startswith(prefix) and not k.startswith(("text_encoders.", VAE))}
    sd = from_bfl_state_dict(bfl, list(transformer.state_dict()), dict(transformer.config))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir / "vae"))
    vae_sd = convert_ldm_vae_checkpoint({k[len(VAE):]: v for k, v in checkpoint.items()
                                         if k.startswith(VAE)}, dict(vae.config))
    named = [("transformer", transformer, sd), ("vae", vae, vae_sd)]
    texts, toks = [], []
    for part, pre in zip(family.text_encoder_parts, (CLIP_L, T5XXL), strict=True):
        cls = getattr(transformers, part.model_class)
        model = cls(cls.config_class.from_pretrained(str(cfg_dir / part.name)))
        part_sd = {k[len(pre):]: v for k, v in checkpoint.items() if k.startswith(pre)}
        if part.ldm_format == "clip":
            part_sd = fit_clip_keys(part_sd, model)
        part_sd = {k: v for k, v in part_sd.items() if not k.endswith("position_ids")}
        named.append((part.name, model, part_sd))
        texts.append(model)
        tok_dir = _tokenizer_dir(p, cfg_dir, part.name.replace("text_encoder", "tokenizer"))
        check_model_path(tok_dir)
        toks.append(getattr(transformers, part.tokenizer_class).from_pretrained(
            str(tok_dir), local_files_only=True))
    for name, model, weights in named:
        result = model.load_state_dict(weights, strict=False)
        bad = [k for k in result.missing_keys if k != "encoder.embed_tokens.weight"]
        if bad or result.unexpected_keys:
            raise ConfigError(
                f"{p}: the {name} weights do not match the configs in {cfg_dir} (missing "
                f"{len(bad)}, e.g. {bad[:3]}; unexpected {len(result.unexpected_keys)}, e.g. "
                f"{result.unexpected_keys[:3]}); fix: pass config= with this model's configs",
                key="base_model")
    for model in texts:
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # T5's encoder embedding is the shared one
    for model, want in ((transformer, dtype), (vae, vae_dtype or dtype),
                        *((t, dtype) for t in texts)):
        if next(model.parameters()).dtype != want:
            model.to(dtype=want)
    out = {"unet": transformer, "vae": vae, "config_path": cfg_dir}
    for name, te, tok in zip(("text_encoder", "text_encoder_2"), texts, toks, strict=True):
        out[name] = te
        out[name.replace("text_encoder", "tokenizer")] = tok
    return out


def missing_error(p: Path, missing: list[str]) -> ConfigError:
    """The refusal of a Flux file without the parts training needs."""
    return ConfigError(
        f"{p} holds no {', '.join(missing)}: a Flux single file that holds the transformer "
        f"only (as flux1-dev.safetensors does) cannot encode prompts or images; fix: point "
        f"base_model at the model's diffusers folder (transformer/, text_encoder_2/, vae/, "
        f"...) or at an all-in-one checkpoint that holds the text encoders and the VAE",
        key="base_model")


def write_flux_single_file(folder: Path, out: Path) -> Path:
    """Write the diffusers Flux folder ``folder`` as one all-in-one ``.safetensors`` in
    ComfyUI's layout (keys sorted: same folder, same bytes)."""
    from safetensors.torch import load_file, save_file

    from lora_kernel.training.families.detect import read_json
    from lora_kernel.training.flux_layout import to_bfl_state_dict
    from lora_kernel.training.single_file import vae_key_to_ldm

    tconf = read_json(folder / "transformer" / "config.json")
    vconf = read_json(folder / "vae" / "config.json")
    sd = {COMFY + k: v for k, v in to_bfl_state_dict(
        load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
        tconf).items()}
    n_up = len(vconf["up_block_types"])
    for k, v in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_key_to_ldm(k, n_up)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE's attention uses 1x1 convolutions
        sd[VAE + name] = v
    for name, pre in (("text_encoder", CLIP_L), ("text_encoder_2", T5XXL)):
        for k, v in load_file(folder / name / "model.safetensors").items():
            sd[pre + k] = v
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: sd[k].contiguous() for k in sorted(sd)}, str(out), metadata={"format": "pt"})
    return out
