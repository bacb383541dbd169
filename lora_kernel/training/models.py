"""Safe, local model loading.

Every model loads from a local path, never the network (``local_files_only=True``), from
safetensors only (``use_safetensors=True``), and never with custom code
(``trust_remote_code=False``). Before any library sees a path,
:func:`lora_kernel.training.model_safety.check_model_path` refuses what could run code when
loaded (the validator calls the same function: one refusal path, one exit code).

Image base models are a diffusers folder or one ``.safetensors`` file, in the LDM/A1111 key
layout or prefixed diffusers layout (:mod:`lora_kernel.training.single_file`). A single file carries
weights only; its configs come from ``config=`` (a diffusers folder without weights) or from
the configs bundled in ``lora_kernel/configs/`` (``tiny-sd``; ``sd15`` for SD1.x), picked by
the checkpoint's shapes. The bundled ``sd15`` has no tokenizer (CLIP's vocabulary cannot be
written offline): put the CLIP tokenizer folder (``vocab.json``, ``merges.txt``) next to the
checkpoint as ``tokenizer/`` or pass ``tokenizer=``.

Before anything loads, :func:`estimate_training_memory` sizes a training run from the
safetensors headers and configs alone (the validator compares it with the free memory), and
:func:`check_target_modules` checks that ``target_modules`` names modules of the loaded model
before LoRA is attached.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import difflib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_kernel.common.contract import BASE_MODEL_DIGEST_FILE_ENV
from lora_kernel.common.digests import path_sha256
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.families.detect import read_json as _read_json
from lora_kernel.training.model_safety import check_model_path, read_safetensors_header
from lora_kernel.training.precision import bytes_per_param, vae_dtype_name, weight_dtype_name
from lora_kernel.training.single_file import LDM_VAE

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


# -- digests ------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple, str] = {}
BASE_MODEL_DIGEST_ENV = "LORA_BASE_MODEL_DIGEST"
# A pre-started run's kernel gets the same JSON in a file of its work folder, named by
# BASE_MODEL_DIGEST_FILE_ENV (its environment was fixed before the pin step answered;
# lora_kernel.steps.executor writes it).


def model_sha256(path: str | os.PathLike) -> str:
    """The digest of a model: a file's sha256, or for a folder the sha256 over the sorted
    lines ``<relative posix path>\\0<file sha256>\\n`` of every file in it.

    Cached in memory per path and the (size, mtime) of every file, so a changed file is
    always re-hashed. In a ``lora run`` the runner passes the pin step's digest and stat key
    (``$LORA_BASE_MODEL_DIGEST``): while the model's stat key is the same, that digest is
    used instead of hashing the model a second time.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ConfigError(f"model not found: {p}", key="base_model")
    pinned = _pinned_digest(p)
    if pinned is not None:
        return pinned
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stamp = tuple((f.as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (p.as_posix(), stamp)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    digest = path_sha256(p)
    _SHA_CACHE[key] = digest
    return digest


def _pinned_digest(p: Path) -> str | None:
    """The digest from ``$LORA_BASE_MODEL_DIGEST`` (or the file ``$LORA_BASE_MODEL_DIGEST_FILE``)
    when its stat key is ``p``'s, else None. Only a hint: the stat key is checked here."""
    from lora_kernel.common.digests import stat_key

    raw = os.environ.get(BASE_MODEL_DIGEST_ENV)
    if not raw and os.environ.get(BASE_MODEL_DIGEST_FILE_ENV):
        try:
            raw = Path(os.environ[BASE_MODEL_DIGEST_FILE_ENV]).read_text(encoding="utf-8")[:4096]
        except (OSError, UnicodeDecodeError):
            return None
    if not raw:
        return None
    try:
        known = json.loads(raw)
        if known.get("key") == stat_key(p) and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (ValueError, AttributeError, OSError):
        pass
    return None


# -- Stable Diffusion ---------------------------------------------------------------------
@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that LoRA training and sampling need
    (``text_encoder_2`` / ``tokenizer_2``: the second text encoder of SDXL, Flux's T5 and
    SD3.5's CLIP-G, else None; ``text_encoder_3`` / ``tokenizer_3``: SD3.5's T5).
    ``unet`` is the denoiser: the UNet, or the transformer of a flow-matching family."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler, for training
    sample_scheduler: Any  # the model's own scheduler class (DDIM, PNDM, ...), for sampling
    source_path: Path
    sha256: str
    config_path: Path | None = None  # where the configs came from (a single file's bundle)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: Any = None  # the ModelFamily (lora_kernel.training.families)
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    clip_skip: int = 1  # text-encoder layer from the end whose output conditions (SD 1.x/2.x)

    @property
    def text_encoders(self) -> list:
        """Every text encoder, in the family's order."""
        return [te for te in (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
                if te is not None]

    @property
    def tokenizers(self) -> list:
        """Every tokenizer, one per text encoder."""
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3)
                if t is not None]


def _schedulers(config_dir: Path):
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cfg_file = config_dir / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} not found; fix: add the scheduler config",
                          key="base_model")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDIMScheduler
    return DDPMScheduler.from_config(cfg), cls.from_config(cfg)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _tokenizer_name(text_encoder_name: str) -> str:
    """``text_encoder`` -> ``tokenizer``, ``text_encoder_2`` -> ``tokenizer_2``."""
    return text_encoder_name.replace("text_encoder", "tokenizer")


def load_sd_components(path: str | os.PathLike, *, dtype=None, vae_dtype=None,
                       config: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None,
                       quantization: str = "none") -> SDComponents:
    """Load a Stable Diffusion model (any family :mod:`lora_kernel.training.families` trains)
    from a diffusers folder or a single ``.safetensors``.

    The family is read from the folder's ``model_index.json`` or the file's keys first; a
    family not trained here is refused before anything loads. ``config`` (single file only):
    a diffusers folder with the configs (weights not needed); default: the bundled config
    matching the checkpoint. ``tokenizer``: a CLIP tokenizer folder overriding the model's
    (first) tokenizer. All modules are returned in eval mode on CPU in ``dtype`` (default
    float32), the VAE in ``vae_dtype`` (default ``dtype``). ``quantization`` (``nf4``,
    ``int8``; flow-matching families): the frozen transformer's Linear layers in bitsandbytes
    form (:mod:`lora_kernel.training.flow_models`).
    """
    from lora_kernel.training.families import family_of
    from lora_kernel.training.families.detect import refuse_unsupported

    refuse_unsupported(path)  # a family not trained here is named first
    p = check_model_path(path, "image")  # refuse before any ML library is even imported
    return load_family_components(family_of(p), p, dtype=dtype, vae_dtype=vae_dtype,
                                  config=config, tokenizer=tokenizer, quantization=quantization)


def load_family_components(family, p: Path, *, dtype=None, vae_dtype=None, config=None,
                           tokenizer=None, quantization: str = "none") -> SDComponents:
    """:func:`load_sd_components` for a known ``family``: its ``text_encoder_parts`` say
    which text encoders (transformers class, folder name, single-file prefix and format)
    to load, its ``bundled_configs`` which configs a single file uses; a transformer family
    (Flux, SD3.5) loads through :func:`lora_kernel.training.flow_models.load_flow_parts`."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = dtype or torch.float32
    if family.denoiser == "transformer":
        from lora_kernel.training.flow_models import load_flow_parts
        parts_kw = load_flow_parts(family, p, dtype=dtype, vae_dtype=vae_dtype,
                                   tokenizer=tokenizer, quantization=quantization,
                                   config=config)
        return SDComponents(**parts_kw, source_path=p, sha256=model_sha256(p), family=family)
    parts = family.text_encoder_parts
    if p.is_dir():  # loaded in their dtypes: a half-precision model never exists in float32
        kw = dict(local_files_only=True, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(p, subfolder="vae", torch_dtype=vae_dtype or dtype,
                                            **kw)
        texts = [getattr(transformers, t.model_class).from_pretrained(
            p, subfolder=t.name, dtype=dtype, trust_remote_code=False, **kw) for t in parts]
        tok_dirs = [p / _tokenizer_name(t.name) for t in parts]
        cfg_dir = p
    else:
        unet, vae, texts, cfg_dir = _load_single_file(p, config, family)
        tok_dirs = [_find_tokenizer(p, cfg_dir, _tokenizer_name(t.name)) for t in parts]
    if tokenizer:
        tok_dirs[0] = Path(tokenizer)
    tokenizers = []
    for tok_dir in tok_dirs:
        if not (tok_dir / "vocab.json").is_file() and not (tok_dir / "tokenizer.json").is_file():
            raise ConfigError(f"no CLIP tokenizer in {tok_dir}; fix: copy the model's tokenizer "
                              f"folder (vocab.json, merges.txt) there", key="base_model")
        check_model_path(tok_dir)
        tokenizers.append(_load_tokenizer(tok_dir))
    noise_scheduler, sample_scheduler = _schedulers(cfg_dir)
    for m, want in ((unet, dtype), (vae, vae_dtype or dtype), *((t, dtype) for t in texts)):
        if next(m.parameters()).dtype != want:
            m.to(dtype=want)
        m.eval()
    return SDComponents(unet=unet, vae=vae, text_encoder=texts[0], tokenizer=tokenizers[0],
                        text_encoder_2=texts[1] if len(texts) > 1 else None,
                        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
                        noise_scheduler=noise_scheduler, sample_scheduler=sample_scheduler,
                        source_path=p, sha256=model_sha256(p), config_path=cfg_dir,
                        family=family)


def bundled_config(name: str) -> Path:
    """The folder of a bundled config set (``tiny-sd``, ``sd15``, ``tiny-sdxl``, ``sdxl``)."""
    folder = BUNDLED_CONFIGS / name
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"no bundled config {name!r} (have: "
                          f"{', '.join(sorted(d.name for d in BUNDLED_CONFIGS.iterdir()))})",
                          key="base_model")
    return folder


def detect_bundled_config(path: str | os.PathLike, family=None) -> Path:
    """Pick the bundled config for a single-file checkpoint of ``family`` (default: the one
    its keys say) from its tensor shapes (read from the safetensors header; no tensor is
    loaded)."""
    from lora_kernel.training.families import family_of
    from lora_kernel.training.single_file import LDM_UNET

    family = family or family_of(path)
    header = read_safetensors_header(path)  # no torch import, no tensor read
    shapes = {}
    for key in (LDM_UNET + "input_blocks.0.0.weight", "unet.conv_in.weight"):
        if key in header:
            shapes["conv_in"] = tuple(header[key]["shape"])
    for key in sorted(header):
        if key.endswith("attn2.to_k.weight"):
            shapes["cross"] = tuple(header[key]["shape"])
            break
    known = family.bundled_configs
    arch = (shapes.get("conv_in"), (shapes.get("cross") or (0, 0))[1])
    if arch not in known:
        have = ", ".join(sorted(known.values())) or "none"
        raise ConfigError(
            f"{path}: unknown architecture (UNet conv_in {arch[0]}, cross-attention width "
            f"{arch[1]}) for the {family.title} family; bundled configs for it: {have}; fix: "
            f"pass config=<a diffusers folder with this model's configs>", key="base_model")
    return bundled_config(known[arch])


def _find_tokenizer(ckpt: Path, cfg_dir: Path, name: str = "tokenizer") -> Path:
    for cand in (ckpt.parent / name, ckpt.with_suffix("") / name, cfg_dir / name):
        if (cand / "vocab.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    raise ConfigError(
        f"{ckpt}: no CLIP tokenizer found (looked in {ckpt.parent / name} and "
        f"{cfg_dir / name}); the bundled '{cfg_dir.name}' configs cannot include "
        f"CLIP's vocabulary offline; fix: copy the model's {name} folder (vocab.json, "
        f"merges.txt, from a diffusers model of the same family) next to the checkpoint as "
        f"'{name}/', or pass a config folder that has one", key="base_model")


def _load_single_file(p: Path, config, family):
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    from lora_kernel.training.single_file import fit_clip_keys, split_checkpoint

    cfg_dir = check_model_path(config) if config else detect_bundled_config(p, family)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir / "vae"))
    parts = family.text_encoder_parts
    texts = [getattr(transformers, t.model_class)(CLIPTextConfig.from_pretrained(
        str(cfg_dir / t.name), local_files_only=True)) for t in parts]
    checkpoint = load_file(str(p))
    unet_sd, vae_sd, *te_sds = split_checkpoint(
        checkpoint, unet.config, vae.config,
        tuple((t.name, t.ldm_prefix, t.ldm_format) for t in parts), tuple(texts))
    named = [("unet", unet, unet_sd), ("vae", vae, vae_sd)]
    for part, model, sd in zip(parts, texts, te_sds, strict=True):
        sd = {k: v for k, v in fit_clip_keys(sd, model).items()
              if not k.endswith("position_ids")}
        named.append((part.name, model, sd))
    for name, model, sd in named:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{p}: the {name} weights do not match the configs in {cfg_dir} (missing "
                f"{len(missing)}, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. "
                f"{unexpected[:3]}); fix: pass config= with this model's configs",
                key="base_model")
    return unet, vae, texts, cfg_dir


# -- causal LM ----------------------------------------------------------------------------
def load_causal_lm(path: str | os.PathLike, *, dtype=None, quantization_config=None,
                   device=None):
    """``(model, tokenizer)`` of a local Hugging Face causal-LM folder (safetensors only, no
    custom code). If the tokenizer has no pad token, its eos token is used for padding.
    With ``quantization_config`` (a ``BitsAndBytesConfig``) the model is quantized while it
    loads, straight onto ``device`` (:mod:`lora_kernel.training.text_quant`)."""
    p = check_model_path(path, "text")  # refuse before any ML library is even imported
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise ConfigError(f"{p} is a {archs} model (model_type {config.model_type!r}), which "
                          f"is not a causal language model; fix: point base_model at a "
                          f"causal-LM folder (e.g. LlamaForCausalLM), or set task: image for a "
                          f"Stable Diffusion model", key="base_model")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                              trust_remote_code=False)
    dtype = dtype or torch.float32
    quant = {}
    if quantization_config is not None:
        quant = {"quantization_config": quantization_config,
                 "device_map": {"": str(device or "cpu")}}
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype,
                                                 use_safetensors=True, trust_remote_code=False,
                                                 **quant)
    if quantization_config is None and next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# -- LoRA targets ---------------------------------------------------------------------------
def check_target_modules(model, targets: list[str], *, what: str, file: str | None = None,
                         key: str = "target_modules", default: list[str] | None = None) -> None:
    """Refuse (:class:`ConfigError` naming ``key``) target names that match no module of
    ``model``, or only modules LoRA cannot wrap, before peft attaches anything.

    A name matches the way peft matches a list of names: a module's full dotted name equals
    it or ends with ``"." + name``. The message lists the closest existing names (difflib on
    the last one and two parts of the model's Linear module names) and ``what`` the model is.
    """
    import torch

    wrappable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                 torch.nn.Conv3d, torch.nn.MultiheadAttention)
    modules = [(n, m) for n, m in model.named_modules() if n]
    linear = [n for n, m in modules if isinstance(m, torch.nn.Linear)]
    suffixes = Counter()
    for name in linear:
        parts = name.split(".")
        suffixes.update({parts[-1], ".".join(parts[-2:])} if len(parts) > 1 else {parts[-1]})
    leaves = [n for n, _ in Counter(n.rsplit(".", 1)[-1] for n in linear
                                    if not n.rsplit(".", 1)[-1].isdigit()).most_common(8)]
    source = file or "<config>"
    for target in targets:
        hits = [(n, m) for n, m in modules if n == target or n.endswith("." + target)]
        if hits and any(isinstance(m, wrappable) or type(m).__name__ == "Conv1D"
                        for _, m in hits):
            continue
        close = difflib.get_close_matches(target, sorted(suffixes), n=5, cutoff=0.5)
        hint = f"closest names: {', '.join(close)}" if close else (
            f"its Linear layers are named e.g. {', '.join(sorted(leaves))}")
        if hits:
            kinds = sorted({type(m).__name__ for _, m in hits})
            problem = (f"{target!r} names {len(hits)} {'/'.join(kinds)} module(s) of the {what} "
                       f"(e.g. {hits[0][0]}), which LoRA cannot wrap (it attaches to Linear, "
                       f"Conv and Embedding layers)")
        else:
            problem = f"{target!r} names no module of the {what}"
        fix = (f"set {key} to names of its Linear layers" if key == "target_modules"
               else f"set {key}: false")
        if key == "target_modules" and default:
            fix += f", or remove the key for the default ({', '.join(default)})"
        raise ConfigError(f"{problem}; {hint}; fix: {fix}", file=source, key=key)


# -- memory estimate ------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs (see :func:`estimate_training_memory`)."""

    weights: int  # model parameters, float32
    activations: int  # what the backward pass keeps, for one micro-batch
    data: int  # preprocessed dataset kept in host memory (image pixels)

    @property
    def device(self) -> int:
        """On the training device: weights and activations."""
        return self.weights + self.activations

    @property
    def host_with_cuda(self) -> int:
        """In host memory when training on CUDA (weights load there first, pixels stay)."""
        return max(self.weights, self.data)

    @property
    def total(self) -> int:
        """Everything, when the device is the CPU."""
        return self.weights + self.activations + self.data


def _weight_files(folder: Path) -> list[Path]:
    """The weight files a loader reads from ``folder``: those named by a
    ``*.safetensors.index.json``, else the standard single file, else every non-variant
    ``*.safetensors`` (``x.fp16.safetensors`` variants are not counted twice)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        return [folder / n for n in sorted(names) if (folder / n).is_file()]
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(f for f in folder.glob("*.safetensors") if f.name.count(".") == 1)


def _param_count(files: list[Path], skip: tuple[str, ...] = (),
                 only: tuple[str, ...] = ("",)) -> int:
    """Parameters in safetensors files, from their headers only: tensors whose names start
    with one of ``only`` and none of ``skip``."""
    n = 0
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name == "__metadata__" or name.startswith(skip) or not name.startswith(only):
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            n += count
    return n


def _unet_config(path: Path) -> dict:
    if path.is_dir():
        return _read_json(path / "unet" / "config.json")
    try:
        return _read_json(detect_bundled_config(path) / "unet" / "config.json")
    except ConfigError:  # unknown architecture: the loader says so; estimate weights only
        return {}


def estimate_training_memory(cfg) -> MemoryEstimate:
    """Estimate the memory a training run of ``cfg`` needs, before anything loads.

    Read from the safetensors headers and configs only (no tensor is loaded)::

        weights     = w x parameters                (w: bytes per frozen weight)
        activations = a x B x sum over levels i of  T_i x C_i x n_i x m_i
        data        = N x 3 x R^2 x 4 B             (image: preprocessed pixels stay in RAM)

    Image (UNet): B = batch_size, R = resolution, level i of the UNet has
    T_i = (R / 8 / 2^i)^2 latent positions, C_i = block_out_channels[i] channels and
    n_i = 2 x layers_per_block + 1 layers (down and up path); m_i = 36 feature maps of
    width C_i kept per layer where the level has cross-attention (resnet 6 + transformer
    block 30), else 6. With gradient_checkpointing only layer inputs are kept (m_i = 1) plus
    one layer recomputed at a time (max_i T_i x C_i x m_i). N = dataset rows.

    Image (transformer: Flux.1, SD3.5): :func:`lora_kernel.training.flow_memory.flow_memory`
    (quantized transformer weights, the text encoders, tokens x width per block).

    Text (causal LM): one level, T = max_seq_length, C = hidden_size, n = num_hidden_layers,
    m = 18 (attention 6 + MLP 12), the same rule for gradient_checkpointing, plus the logits
    and their gradient: 2 x B x T x vocab_size x 4 B.

    w = 2 bytes with mixed_precision fp16/bf16 (the frozen weights are loaded in that dtype;
    the VAE's own bytes follow ``vae_dtype``), else 4. With ``quantization`` (text) the
    decoder layers' Linear weights cost what bitsandbytes stores per weight (nf4/fp4 about
    0.52 bytes with double quantization, int8 1 byte), the rest w
    (:func:`lora_kernel.training.text_quant.quantized_model_bytes`).
    a = 2 bytes with mixed_precision fp16/bf16 (autocast), else 4. LoRA weights, their
    gradients and AdamW states (well under 1% of the weights) and the attention score
    matrices (fused attention kernels do not keep them) are left out: the estimate is a lower
    bound of what training needs, so a run it refuses could not fit.
    """
    p = Path(cfg.base_model)
    a = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    b = cfg.batch_size
    levels: list[tuple[int, int, int, int]] = []  # (positions T, channels C, layers n, maps m)
    extra = 0
    w = bytes_per_param(weight_dtype_name(cfg))
    if cfg.task == "image" and (p / "transformer").is_dir():  # Flux, SD3.5
        from lora_kernel.training.data import read_image_rows
        from lora_kernel.training.flow_memory import flow_memory
        weights, activations = flow_memory(cfg, p, weight_bytes=w,
                                           vae_bytes=bytes_per_param(vae_dtype_name(cfg)))
        data = len(read_image_rows(cfg)) * 3 * cfg.resolution ** 2 * 4
        return MemoryEstimate(weights=weights, activations=activations, data=data)
    if cfg.task == "image":
        w_vae = bytes_per_param(vae_dtype_name(cfg))
        if p.is_dir():
            weights = sum(w * _param_count(_weight_files(p / part))
                          for part in ("unet", "text_encoder"))
            weights += w_vae * _param_count(_weight_files(p / "vae"))
        else:
            vae = _param_count([p], only=(LDM_VAE, "vae."))
            weights = w * (_param_count([p], skip=("model_ema.",)) - vae) + w_vae * vae
        unet = _unet_config(p)
        side = cfg.resolution / 8
        per_block = int(unet.get("layers_per_block", 2))
        types = unet.get("down_block_types") or []
        for i, c in enumerate(unet.get("block_out_channels") or []):
            attn = i < len(types) and "CrossAttn" in str(types[i])
            levels.append((int((side / 2 ** i) ** 2), int(c), 2 * per_block + 1,
                           36 if attn else 6))
        from lora_kernel.training.data import read_image_rows
        data = len(read_image_rows(cfg)) * 3 * cfg.resolution ** 2 * 4
    else:
        tensors = [(name, info["shape"]) for f in _weight_files(p)
                   for name, info in read_safetensors_header(f).items()
                   if name != "__metadata__"]
        return estimate_text_memory(cfg, tensors, _read_json(p / "config.json"))
    kept = _kept_maps(levels, cfg.gradient_checkpointing)
    return MemoryEstimate(weights=weights, activations=a * b * kept + extra, data=data)


def _kept_maps(levels: list[tuple[int, int, int, int]], checkpointing: bool) -> int:
    """Activation values the backward pass keeps over ``levels`` (T, C, n, m); see
    :func:`estimate_training_memory`."""
    if checkpointing:
        return (sum(t * c * n for t, c, n, _ in levels)
                + max((t * c * m for t, c, _, m in levels), default=0))
    return sum(t * c * n * m for t, c, n, m in levels)


def estimate_text_memory(cfg, tensors, conf: dict) -> MemoryEstimate:
    """The causal-LM rule of :func:`estimate_training_memory` from the checkpoint's
    ``(name, shape)`` pairs and its ``config.json`` values, so that a full-size layout built
    on the meta device is estimated the same way (``bench/llm_memory.py``)."""
    b = cfg.batch_size
    a = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    if getattr(cfg, "quantization", "none") != "none":
        from lora_kernel.training.text_quant import quantized_model_bytes
        weights = quantized_model_bytes(cfg, tensors)
    else:
        w = bytes_per_param(weight_dtype_name(cfg))
        weights = w * sum(math.prod(int(d) for d in shape) for _, shape in tensors)
    levels = []
    hidden, layers = conf.get("hidden_size"), conf.get("num_hidden_layers")
    if isinstance(hidden, int) and isinstance(layers, int):
        levels.append((cfg.max_seq_length, hidden, layers, 18))
    vocab = conf.get("vocab_size")
    extra = 2 * b * cfg.max_seq_length * vocab * 4 if isinstance(vocab, int) else 0
    kept = _kept_maps(levels, cfg.gradient_checkpointing)
    return MemoryEstimate(weights=weights, activations=a * b * kept + extra, data=0)
