"""The one config validator, shared by the CLI, the notebooks and the studio widgets.

A training config is a flat YAML mapping. The seed's keys (``train_data_dir``,
``metadata_path``, ``base_model``, ``lora_rank``, ``batch_size``, ``epochs``,
``learning_rate``, ``output_dir``, ``save_steps``) keep their meaning; the rest follow
kohya sd-scripts / diffusers naming. Relative paths resolve against the config file.

Validation happens before any model loads. Every error is a :class:`ConfigError`
naming the file, the key, what is wrong and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import load_yaml, parse_yaml
from lora_kernel.training.data import MAX_IMAGE_PIXELS
from lora_kernel.training.model_safety import check_model_path

TASKS = ("image", "text")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine",
    "cosine_with_restarts", "polynomial",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The keys whose values are filesystem paths, resolved against the config's folder.
PATH_KEYS = ("train_data_dir", "metadata_path", "base_model", "output_dir")
DEFAULT_IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_TARGETS = ["q_proj", "v_proj"]


def _h(text: str, **kw):
    """A dataclass field carrying its help text (shown by ``lora config --help-keys``)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """A validated training configuration (image or text LoRA)."""

    # -- the seed's keys --------------------------------------------------
    train_data_dir: str | None = _h(
        "Folder with the training images (image) or .jsonl files (text).", default=None)
    metadata_path: str | None = _h(
        "Captions CSV (image: file_name,<caption_column>) or the .jsonl file (text). "
        "Default: <train_data_dir>/metadata.csv (image).", default=None)
    base_model: str = _h(
        "Local base model: a diffusers folder or single-file .safetensors (image), "
        "a Hugging Face folder (text).", default="")
    lora_rank: int = _h("LoRA rank r (kohya: network_dim).", default=8)
    batch_size: int = _h("Samples per optimizer micro-step.", default=1)
    epochs: int = _h("Passes over the dataset (ignored when max_train_steps is set).", default=1)
    learning_rate: float = _h("Peak learning rate for the LoRA weights.", default=1e-4)
    output_dir: str = _h("Where adapters, checkpoints, samples and TensorBoard logs go.",
                         default="output")
    save_steps: int = _h("Save a resumable checkpoint every N optimizer steps (0: never).",
                         default=0)
    # -- what kohya / diffusers users expect --------------------------------
    task: str = _h("'image' (Stable Diffusion family) or 'text' (causal LM).", default="image")
    output_name: str = _h("File stem of the exported adapter.", default="lora")
    lora_alpha: float | None = _h("LoRA alpha (kohya: network_alpha). Default: lora_rank.",
                                  default=None)
    lora_dropout: float = _h("Dropout on the LoRA branch, in [0, 1).", default=0.0)
    target_modules: list[str] | None = _h(
        "Module names LoRA attaches to. Default: UNet attention projections "
        "to_q,to_k,to_v,to_out.0 (image); q_proj,v_proj (text).", default=None)
    resolution: int = _h("Training resolution in pixels (image; multiple of 8).", default=512)
    center_crop: bool = _h("Center-crop to a square instead of random crop (image).",
                           default=True)
    enable_bucket: bool = _h("Aspect-ratio buckets at `resolution` instead of square crops.",
                             default=False)
    random_flip: bool = _h("Randomly flip images horizontally (image).", default=False)
    caption_column: str = _h("Caption column in metadata.csv (image).", default="text")
    image_column: str = _h("Image file column in metadata.csv (image).", default="file_name")
    max_image_pixels: int = _h(
        "Largest image (width x height, read from its header) accepted; larger ones are "
        "refused as possible decompression bombs (image). Default: PIL's limit.",
        default=MAX_IMAGE_PIXELS)
    text_column: str = _h("Field holding plain text in the .jsonl (text).", default="text")
    prompt_column: str = _h("Field holding the prompt (text; loss masked).", default="prompt")
    response_column: str = _h("Field holding the response (text; loss on it only).",
                              default="response")
    max_seq_length: int = _h("Tokens per training sequence (text).", default=256)
    packing: bool = _h("Pack several examples into one sequence (text).", default=True)
    seed: int = _h("Random seed: data order, LoRA init, noise, sampling.", default=42)
    mixed_precision: str = _h("'no', 'fp16' or 'bf16' (autocast; fp16 needs a GPU).",
                              default="no")
    gradient_checkpointing: bool = _h("Trade compute for memory.", default=False)
    gradient_accumulation_steps: int = _h("Micro-batches per optimizer step.", default=1)
    lr_scheduler: str = _h("One of: " + ", ".join(LR_SCHEDULERS) + ".", default="constant")
    lr_warmup_steps: int = _h("Warm-up steps of the LR schedule.", default=0)
    max_train_steps: int | None = _h("Stop after this many optimizer steps (overrides epochs).",
                                     default=None)
    max_grad_norm: float = _h("Gradient clipping norm (0: off).", default=1.0)
    weight_decay: float = _h("AdamW weight decay.", default=1e-2)
    train_text_encoder: bool = _h("Also train a LoRA on the CLIP text encoder (image).",
                                  default=False)
    text_encoder_lr: float | None = _h("Text-encoder LR. Default: learning_rate.", default=None)
    noise_offset: float = _h("Noise offset (image; 0 disables).", default=0.0)
    cache_latents: bool = _h("Cache VAE latents and text embeddings on disk (image).",
                             default=True)
    sample_prompts: list[str] = _h("Prompts for the final sample grid / completions.",
                                   default_factory=list)
    sample_steps: int = _h("Denoising steps of sample images.", default=20)
    sample_seeds: list[int] = _h("Fixed seeds of sample images.", default_factory=lambda: [0, 1])
    max_new_tokens: int = _h("Tokens generated per text sample.", default=24)
    record_dataset_paths: bool = _h(
        "Record dataset file paths in adapter metadata (off: only digests).", default=False)
    allow_outside_dataset: bool = _h(
        "Accept dataset entries outside train_data_dir (.., absolute paths, symlinks); they "
        "are then recorded as outside in the manifest.", default=False)
    logging_steps: int = _h("Log loss to TensorBoard every N steps.", default=1)
    keep_checkpoints: int = _h(
        "Keep only the newest N checkpoints (older ones are deleted after each save; "
        "0: keep all).", default=0)

    # Where this config came from (not a user key).
    source: str | None = field(default=None, repr=False, compare=False,
                               metadata={"internal": True})
    # What validation noticed in the dataset but accepts (empty captions, duplicate rows,
    # 1x1 images), one message each naming its row; printed as ``warning: ...`` (not a key).
    dataset_warnings: list[str] = field(default_factory=list, repr=False, compare=False,
                                        metadata={"internal": True})

    def __post_init__(self):
        self._check()

    # -- validation --------------------------------------------------------
    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=self.source or "<config>", key=key)

    def _check(self):
        if self.task not in TASKS:
            raise self._err("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}; "
                                    f"fix: set task: image or task: text")
        positive = ["lora_rank", "batch_size", "epochs", "gradient_accumulation_steps",
                    "resolution", "max_seq_length", "sample_steps", "max_new_tokens",
                    "logging_steps", "max_image_pixels"]
        for key in positive:
            if getattr(self, key) < 1:
                raise self._err(key, f"must be >= 1, got {getattr(self, key)}; fix: use a "
                                     f"positive integer")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise self._err("max_train_steps", f"must be >= 1 or omitted, got "
                                               f"{self.max_train_steps}")
        for key in ("save_steps", "lr_warmup_steps", "max_grad_norm", "weight_decay",
                    "noise_offset", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise self._err(key, f"must be >= 0, got {getattr(self, key)}")
        if not (0 < self.learning_rate < 1) or not math.isfinite(self.learning_rate):
            raise self._err("learning_rate", f"must be in (0, 1), got {self.learning_rate}; "
                                             f"typical LoRA values are 1e-5 .. 1e-3")
        if self.text_encoder_lr is not None and not (0 < self.text_encoder_lr < 1):
            raise self._err("text_encoder_lr", f"must be in (0, 1), got {self.text_encoder_lr}")
        if not (0 <= self.lora_dropout < 1):
            raise self._err("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise self._err("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if self.lora_rank > 1024:
            raise self._err("lora_rank", f"must be <= 1024, got {self.lora_rank}")
        if self.task == "image" and self.resolution % 8:
            raise self._err("resolution", f"must be a multiple of 8 (VAE downsampling), got "
                                          f"{self.resolution}; fix: use e.g. "
                                          f"{self.resolution // 8 * 8 or 8}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise self._err("mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}, "
                                               f"got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            hint = _did_you_mean(str(self.lr_scheduler), LR_SCHEDULERS)
            raise self._err("lr_scheduler", f"unknown scheduler {self.lr_scheduler!r}{hint}; "
                                            f"choose one of {', '.join(LR_SCHEDULERS)}")
        if not self.base_model:
            raise self._err("base_model", "is required; fix: point it at a local model folder "
                                          "or .safetensors file (see `lora demo-assets`)")
        if self.target_modules is not None and not self.target_modules:
            raise self._err("target_modules", "must list at least one module name or be omitted")
        if not self.output_name or any(c in self.output_name for c in "/\\"):
            raise self._err("output_name", f"must be a plain file stem, got {self.output_name!r}")

    # -- derived values ----------------------------------------------------
    @property
    def alpha(self) -> float:
        """The effective LoRA alpha (defaults to the rank, i.e. scale 1)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def targets(self) -> list[str]:
        """The effective target modules."""
        if self.target_modules:
            return list(self.target_modules)
        return list(DEFAULT_IMAGE_TARGETS if self.task == "image" else DEFAULT_TEXT_TARGETS)

    def to_dict(self) -> dict:
        """The resolved config as plain data (what manifests and adapter metadata record)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            out[f.name] = getattr(self, f.name)
        out["lora_alpha"] = self.alpha
        out["target_modules"] = self.targets
        return out

    def dataset_files(self) -> list[Path]:
        """Every file of the dataset this config trains on (sorted), used for versioning."""
        from lora_kernel.training.data import dataset_files
        return dataset_files(self)


def config_keys() -> dict[str, str]:
    """Every user key with its help text."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)
            if not f.metadata.get("internal")}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_TYPES = {}


def _field_types() -> dict[str, tuple[type, ...]]:
    """Allowed Python types per key, derived from the dataclass annotations."""
    if _TYPES:
        return _TYPES
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("internal"):
            continue
        ann = str(f.type)
        if ann.startswith("int"):
            types = (int,)
        elif ann.startswith("float"):
            types = (int, float)
        elif ann.startswith("bool"):
            types = (bool,)
        elif ann.startswith("list[str]"):
            types = (list,)
        elif ann.startswith("list[int]"):
            types = (list,)
        else:
            types = (str,)
        _TYPES[f.name] = (types, "None" in ann, ann)
    return _TYPES


def _coerce(key: str, value: Any, file: str):
    types, nullable, ann = _field_types()[key]
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"must not be empty; fix: give a value of type {ann.split(' ')[0]}",
                          file=file, key=key)
    if key == "target_modules" and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if key == "sample_prompts" and isinstance(value, str):
        value = [value]
    if bool in types:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {type(value).__name__} {value!r}; "
                              f"fix: use true or false (yes/no/on/off are read as text), e.g. "
                              f"{key}: {_example(key)}", file=file, key=key)
        return value
    if isinstance(value, bool) or not isinstance(value, types):
        want = {int: "an integer", float: "a number", str: "a string", list: "a list"}
        raise ConfigError(f"must be {want[types[-1]]}, got {type(value).__name__} {value!r}; "
                          f"fix: e.g. {key}: {_example(key)}", file=file, key=key)
    if float in types:
        return float(value)
    if list in types:
        inner = int if "int" in ann else str
        for item in value:
            if isinstance(item, bool) or not isinstance(item, inner):
                raise ConfigError(f"every item must be {inner.__name__}, got {item!r}",
                                  file=file, key=key)
    return value


def _example(key: str) -> str:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[key]
    if f.default is not dataclasses.MISSING and f.default not in (None, ""):
        return json.dumps(f.default)
    return {"base_model": "models/tiny-sd", "lora_alpha": "8",
            "max_train_steps": "100"}.get(key, "...")


def parse_value(text: str) -> Any:
    """Parse a ``-p key value`` override with the config files' own YAML loader, so ``-p`` and
    files agree (``1e-4`` -> float, ``no`` -> "no"); text that is not YAML stays text."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def validate_config(raw: Mapping[str, Any], *, source: str | os.PathLike | None = None,
                    base_dir: str | os.PathLike | None = None,
                    check_paths: bool = True) -> TrainConfig:
    """Validate a mapping of config keys and return a :class:`TrainConfig`.

    Unknown keys, wrong types, out-of-range values, missing paths and empty datasets
    raise :class:`ConfigError`. Relative paths resolve against ``base_dir`` (the config
    file's folder). Nothing is loaded but small metadata files.
    """
    file = str(source) if source is not None else "<config>"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a YAML mapping of key: value, got {type(raw).__name__}; "
                          f"fix: start from templates/image_lora.yaml", file=file)
    keys = config_keys()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            hint = _did_you_mean(str(key), keys)
            raise ConfigError(f"unknown key{hint}; fix: remove it or use one of the keys "
                              f"listed by `lora config --keys`", file=file, key=str(key))
        values[key] = _coerce(key, value, file)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    task = values.get("task", "image")
    if task == "image" and values.get("train_data_dir") and not values.get("metadata_path"):
        values["metadata_path"] = str(Path(values["train_data_dir"]) / "metadata.csv")
    for key in PATH_KEYS:
        if values.get(key):
            p = Path(os.path.expanduser(values[key]))
            values[key] = str(p if p.is_absolute() else (base / p).resolve())
    cfg = TrainConfig(**values, source=file)
    if check_paths:
        check_inputs(cfg)
    return cfg


def check_inputs(cfg: TrainConfig) -> None:
    """Check that the base model and dataset exist, can be read by this user, and the dataset
    is not empty. A path this user may not read is a :class:`ConfigError` naming it (Linux
    permissions on other people's data hold: the kernel runs as the user)."""
    try:
        _check_inputs(cfg, cfg.source or "<config>")
    except PermissionError as exc:
        raise ConfigError(f"permission denied reading {exc.filename}; fix: train on data and "
                          "models you may read (ask the owner for access, or copy them into "
                          "your working home)", file=cfg.source or "<config>") from None


def _check_inputs(cfg: TrainConfig, file: str) -> None:
    model = Path(cfg.base_model)
    if not model.exists():
        raise ConfigError(f"base model not found at {model}; fix: point base_model at a local "
                          f"model (run `lora demo-assets` for a tiny one)", file=file,
                          key="base_model")
    try:  # the loaders' own refusal: pickles are UnsafeModelError (3), and with the task a
        # corrupt/empty .safetensors or a model of the wrong kind is a ConfigError (2)
        check_model_path(model, cfg.task)
    except ConfigError as exc:  # e.g. an unsupported file type: name the config too
        raise ConfigError(exc.detail, file=file, key=exc.key or "base_model") from None
    if cfg.task == "image":
        _check_image_dataset(cfg, file)
    else:
        _check_text_dataset(cfg, file)
    _check_output_dir(cfg, file)
    _check_memory(cfg, file)


def _check_output_dir(cfg: TrainConfig, file: str) -> None:
    """``output_dir`` must be a folder this user can create or write: not a file, not under a
    file, not read-only (mode, ownership or a read-only mount). Nothing is created here."""
    out = Path(cfg.output_dir)
    fix = ("fix: set output_dir to a folder you can write, e.g. one under your working home "
           "($LORA_HOME)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; {fix}", file=file, key="output_dir")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{out} is under {existing}, which is a file, so the folder cannot be "
                          f"created; {fix}", file=file, key="output_dir")
    effective = os.access in os.supports_effective_ids
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
        what = "it" if existing == out else f"its nearest existing parent {existing}"
        raise ConfigError(f"{out} is not writable by you ({what} is read-only for this user); "
                          f"{fix}", file=file, key="output_dir")


def _check_memory(cfg: TrainConfig, file: str) -> None:
    """Refuse a run whose memory estimate
    (:func:`lora_kernel.training.models.estimate_training_memory`, a lower bound) exceeds the
    memory available by more than ``MEMORY_MARGIN``: on the CUDA device when training will use
    it (weights + activations) and in host memory (pixels, weights while loading), else in
    host memory alone (everything)."""
    from lora_kernel.training.models import estimate_training_memory
    est = estimate_training_memory(cfg)
    checks = []
    free_cuda = _cuda_free_bytes()
    if free_cuda is not None:
        checks.append(("the GPU", est.device, free_cuda))
        checks.append(("host memory", est.host_with_cuda, _host_available_bytes()))
    else:
        checks.append(("host memory (training on the CPU)", est.total, _host_available_bytes()))
    for where, need, free in checks:
        if need > MEMORY_MARGIN * free:
            key = "resolution" if cfg.task == "image" else "max_seq_length"
            fixes = ("lower resolution" if cfg.task == "image" else "lower max_seq_length")
            fixes += ", lower batch_size"
            if not cfg.gradient_checkpointing:
                fixes += ", set gradient_checkpointing: true"
            if cfg.mixed_precision == "no" and free_cuda is not None:
                fixes += ", set mixed_precision: bf16 (or fp16)"
            if est.weights > MEMORY_MARGIN * free:
                key, fixes = "base_model", "use a smaller base model"
            raise ConfigError(
                f"training needs about {_gib(need)} (estimate: weights {_gib(est.weights)} + "
                f"activations {_gib(est.activations)} at {_shape(cfg)}"
                + (f" + dataset pixels {_gib(est.data)}" if est.data else "")
                + f"), but {where} has {_gib(free)} available; fix: {fixes}, or train on a "
                  f"machine with more memory", file=file, key=key)


# Refuse only when the (lower-bound) estimate exceeds what is free by this factor.
MEMORY_MARGIN = 1.5


def _shape(cfg: TrainConfig) -> str:
    """The shape a memory estimate depends on, for messages."""
    if cfg.task == "image":
        return f"resolution {cfg.resolution}, batch_size {cfg.batch_size}"
    return f"max_seq_length {cfg.max_seq_length}, batch_size {cfg.batch_size}"


def _gib(n: int) -> str:
    """``n`` bytes in GiB (or MiB below 1 GiB)."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _host_available_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def _cuda_free_bytes() -> int | None:
    """Free memory of the CUDA device training will use, or None when it will run on the CPU
    (no NVIDIA driver: torch is not even imported)."""
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl")):
        return None
    import torch
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _check_image_dataset(cfg: TrainConfig, file: str) -> None:
    from lora_kernel.training.data import ImageTooLarge, is_inside, open_image, read_csv_rows
    if not cfg.train_data_dir:
        raise ConfigError("is required for task: image; fix: set it to the image folder",
                          file=file, key="train_data_dir")
    data = Path(cfg.train_data_dir)
    if not data.is_dir():
        raise ConfigError(f"folder not found: {data}; fix: create it or correct the path",
                          file=file, key="train_data_dir")
    meta = Path(cfg.metadata_path)
    if not meta.is_file():
        raise ConfigError(f"captions file not found: {meta}; fix: write a metadata.csv with "
                          f"columns {cfg.image_column},{cfg.caption_column}", file=file,
                          key="metadata_path")
    cols, rows = read_csv_rows(meta, source=file)
    for col, key in ((cfg.image_column, "image_column"), (cfg.caption_column,
                                                           "caption_column")):
        if col not in cols:
            raise ConfigError(f"column {col!r} not in {meta} (columns: {cols}); fix: set "
                              f"{key} to one of them", file=file, key=key)
    if not rows:
        raise ConfigError(f"dataset is empty: {meta} has no rows; fix: add one row per image",
                          file=file, key="metadata_path")
    warnings: list[str] = []
    first_line: dict[Path, int] = {}
    for i, row in rows:
        if not row[cfg.image_column]:
            raise ConfigError(f"line {i} of {meta} has no {cfg.image_column!r} value; fix: name "
                              f"the image file or remove the row", file=file, key="metadata_path")
        img = data / row[cfg.image_column]
        if not img.is_file():
            raise ConfigError(f"line {i} of {meta} names {row[cfg.image_column]!r}, which is "
                              f"not in {data}; fix: add the image or remove the row", file=file,
                              key="metadata_path")
        if not cfg.allow_outside_dataset and not is_inside(img, data):
            raise ConfigError(f"line {i} of {meta} names {row[cfg.image_column]!r}, which "
                              f"resolves to {img.resolve()}, outside {data}; {_outside_fix(data)}",
                              file=file, key="metadata_path")
        try:  # reads the header only: cheap, and catches truncated or non-image files
            with open_image(img, cfg.max_image_pixels) as im:
                size = im.size
                im.verify()
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            raise ConfigError(f"line {i} of {meta} names {row[cfg.image_column]!r}: "
                              f"{getattr(exc, 'detail', exc)}, a possible decompression bomb; "
                              f"fix: downscale the image or remove the row, or raise "
                              f"max_image_pixels if you trust the file",
                              file=file, key="max_image_pixels") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ConfigError(f"line {i} of {meta} names {row[cfg.image_column]!r}, which is "
                              f"not a readable image ({exc}); fix: re-export it as PNG/JPEG or "
                              f"remove the row", file=file, key="metadata_path") from None
        where = f"line {i} of {meta}"
        if not (row[cfg.caption_column] or "").strip():
            warnings.append(f"{where}: the caption of {row[cfg.image_column]!r} is empty (it "
                            f"trains unconditioned)")
        if size == (1, 1):
            warnings.append(f"{where}: {row[cfg.image_column]!r} is 1x1 pixels (a placeholder?)")
        first = first_line.setdefault(img.resolve(), i)
        if first != i:
            warnings.append(f"{where}: {row[cfg.image_column]!r} is listed again (first at line "
                            f"{first}); it trains twice per epoch")
    cfg.dataset_warnings = warnings


def _outside_fix(data: Path) -> str:
    return f"fix: move the file into {data}, or set allow_outside_dataset: true"


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in words ("null", "a number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _refuse_json_array(path: Path, file: str) -> None:
    """A ``.json`` file holding one array, given where JSON Lines is expected, is refused with
    the conversion to run (its first line alone would only say "not JSON")."""
    with open(path, "rb") as fh:
        if not fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return
    try:
        value = json.loads(path.read_bytes())
    except ValueError:  # not one JSON document (or not UTF-8): the line checks name the line
        return
    if isinstance(value, list):
        out = path.with_suffix(".jsonl")
        raise ConfigError(
            f"{path} holds one JSON array ({len(value)} items), not JSON Lines; fix: write one "
            f"JSON object per line, e.g. python3 -c 'import json,sys; [print(json.dumps(r)) for "
            f"r in json.load(open(sys.argv[1]))]' {path} > {out} and use {out.name}",
            file=file, key="metadata_path")


def _check_text_dataset(cfg: TrainConfig, file: str) -> None:
    from lora_kernel.training.data import is_inside, jsonl_lines, text_files
    files = text_files(cfg)
    if not files:
        raise ConfigError("no .jsonl file given; fix: set metadata_path to a .jsonl file or "
                          "train_data_dir to a folder holding some", file=file,
                          key="metadata_path" if cfg.metadata_path else "train_data_dir")
    n = 0
    for path in files:
        if not path.is_file():
            raise ConfigError(f"file not found: {path}", file=file, key="metadata_path")
    if cfg.train_data_dir and not cfg.allow_outside_dataset:
        data = Path(cfg.train_data_dir)
        for path in files:
            if not is_inside(path, data):
                raise ConfigError(f"dataset file {path} resolves to {path.resolve()}, outside "
                                  f"{data}; {_outside_fix(data)}", file=file,
                                  key="metadata_path" if cfg.metadata_path else "train_data_dir")
    for path in files:
        _refuse_json_array(path, file)
        for lineno, line in jsonl_lines(path, source=file):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {lineno} is not JSON ({exc.msg}); fix: one "
                                  f"JSON object per line", file=file,
                                  key="metadata_path") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path} line {lineno} is {_json_kind(rec)}, not a JSON "
                                  f"object; fix: one object per line, e.g. "
                                  f"{{\"{cfg.text_column}\": \"...\"}}", file=file,
                                  key="metadata_path")
            if cfg.prompt_column in rec and cfg.response_column in rec:
                used = (cfg.prompt_column, cfg.response_column)  # what training reads first
            elif cfg.text_column in rec:
                used = (cfg.text_column,)
            else:
                raise ConfigError(
                    f"{path} line {lineno} has neither {cfg.text_column!r} nor "
                    f"{cfg.prompt_column!r}+{cfg.response_column!r}; fix: set "
                    f"text_column / prompt_column / response_column", file=file,
                    key="text_column")
            for name in used:
                if not isinstance(rec[name], str):
                    raise ConfigError(f"{path} line {lineno}: field {name!r} is "
                                      f"{_json_kind(rec[name])}, not a string; fix: give it "
                                      f"text or remove the line", file=file,
                                      key="metadata_path")
            n += 1
    if n == 0:
        raise ConfigError(f"dataset is empty: {', '.join(map(str, files))} has no records; "
                          f"fix: add one JSON object per line", file=file, key="metadata_path")


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                *, check_paths: bool = True) -> TrainConfig:
    """Read a YAML config file, apply ``overrides`` and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; fix: copy templates/image_lora.yaml "
                          f"or templates/text_lora.yaml", file=path)
    raw = load_yaml(path, what="config")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("must be a YAML mapping of key: value; fix: start from "
                          "templates/image_lora.yaml", file=path)
    raw = dict(raw)
    for key, value in (overrides or {}).items():
        raw[key] = value
    return validate_config(raw, source=path, base_dir=path.resolve().parent,
                           check_paths=check_paths)
