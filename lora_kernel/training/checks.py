"""The checking config loader — the one config validator, shared by the CLI, the notebooks and
the studio widgets — and the input checks it runs before any model loads. Runs as the user.

:func:`load_config` reads a YAML file, applies overrides and calls :func:`validate_config`:
the schema (:func:`lora_kernel.training.config.config_from_mapping`), then the inputs: the base
model (its kind, its safety), the output folder, the memory a run will need, and every dataset
file (encoding, rows, paths inside ``train_data_dir``, image headers). Every refusal is a
:class:`ConfigError` (or :class:`~lora_kernel.common.errors.UnsafeModelError`) naming the file,
row or key and the fix.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import load_yaml
from lora_kernel.training.config import TrainConfig, config_from_mapping
from lora_kernel.training.families.detect import refuse_unsupported
from lora_kernel.training.model_safety import check_model_path


def validate_config(raw: Mapping[str, Any], *, source: str | os.PathLike | None = None,
                    base_dir: str | os.PathLike | None = None,
                    check_paths: bool = True) -> TrainConfig:
    """Validate a mapping of config keys and return a :class:`TrainConfig`.

    Unknown keys, wrong types, out-of-range values, missing paths and empty datasets
    raise :class:`ConfigError`. Relative paths resolve against ``base_dir`` (the config
    file's folder). Nothing is loaded but small metadata files. ``check_paths=False``: the
    schema only (:func:`~lora_kernel.training.config.config_from_mapping`).
    """
    cfg = config_from_mapping(raw, source=source, base_dir=base_dir)
    if check_paths:
        check_inputs(cfg)
        from lora_kernel.training.distributed_checks import check_distributed_env
        check_distributed_env(cfg)  # GPUs given, rendezvous port (num_processes, fsdp)
    return cfg


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
    try:
        return validate_config(raw, source=path, base_dir=path.resolve().parent,
                               check_paths=check_paths)
    except ConfigError as exc:
        raise _from_override(exc, path, overrides or {}) from None


def _from_override(exc: ConfigError, path: Path, overrides: Mapping[str, Any]) -> ConfigError:
    """``exc`` naming the override (``-p KEY VALUE``, the studio's fields) when the faulty
    value came from one rather than from the file, so the user fixes the right place."""
    key = (exc.key or "").split("[")[0].split(".")[0]
    if key not in overrides or exc.file != str(path):
        return exc
    shown = json.dumps(overrides[key], default=str)
    return ConfigError(exc.detail, file=f"override -p {key} {shown} (over {path.name})",
                       key=exc.key)


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
        # corrupt/empty .safetensors or a model of the wrong kind is a ConfigError (2); a
        # family not trained here (SD3, Flux, ...) is named before anything else is said
        if cfg.task == "image":
            refuse_unsupported(model)
        check_model_path(model, cfg.task)
    except ConfigError as exc:  # e.g. an unsupported file type: name the config too
        raise ConfigError(exc.detail, file=file, key=exc.key or "base_model") from None
    if cfg.task == "image":
        _check_family(cfg, file)
        _check_image_dataset(cfg, file)
    else:
        _check_quantization(cfg, file)
        from lora_kernel.training.text_adapter import check_init_adapter
        check_init_adapter(cfg, file)
        _check_text_dataset(cfg, file)
        from lora_kernel.training.text_data import check_eval_path
        check_eval_path(cfg, file)
    _check_output_dir(cfg, file)
    _check_memory(cfg, file)


# The down-projection weights of a LoRA file, in diffusers' and peft's names.
_LORA_DOWN = (".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight")


def _check_init(cfg: TrainConfig, family, file: str) -> None:
    """``init`` must be a LoRA file (header read only) of ``family`` with ``lora_rank``:
    diffusers format, or for SD 1.x/2.x kohya format too (kohya's ``network_weights``); an
    adapter of another family or rank could not load into this run's LoRA layers."""
    from lora_kernel.training.model_safety import read_safetensors_header

    path = Path(cfg.init or "")
    fix = (f"fix: point init at a <output_name>.safetensors adapter trained on a "
           f"{family.title} model with lora_rank {cfg.lora_rank}, or remove init")
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(f"{path} is not a .safetensors adapter file; {fix}", file=file,
                          key="init")
    check_model_path(path)
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    keys = [k for k in header if k != "__metadata__"]
    kohya_file = any(k.startswith("lora_unet_") for k in keys)
    if kohya_file and (family.name not in ("sd15", "sd2")
                       or any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)):
        raise ConfigError(f"{path} is a kohya-format file; for {family.title} init takes the "
                          f"diffusers-format adapter exported next to it; {fix}", file=file,
                          key="init")
    downs = [k for k in keys if k.endswith(_LORA_DOWN + (".lora_down.weight",))]
    if not any(k.startswith((f"{family.denoiser}.", "lora_unet_")) for k in downs):
        raise ConfigError(f"{path} holds no {family.denoiser} LoRA weights "
                          f"({family.denoiser}.*.lora.down.*); {fix}", file=file, key="init")
    from lora_kernel.training.families import FAMILIES
    kohya = {f.kohya_base_version: f.name for f in FAMILIES.values()}  # adapters of others
    found = meta.get("lora_enclave.model_family") or kohya.get(
        meta.get("ss_base_model_version", ""))
    if found != family.name:
        what = f"a LoRA for {found}" if found else "a LoRA of unknown family"
        raise ConfigError(f"{path} is {what}, but {cfg.base_model} is {family.title} "
                          f"({family.name}); its layers have other names and shapes; {fix}",
                          file=file, key="init")
    ranks = {header[k]["shape"][0] for k in downs}
    if ranks != {cfg.lora_rank}:
        raise ConfigError(f"{path} has LoRA rank {sorted(ranks)}, the config lora_rank "
                          f"{cfg.lora_rank}; {fix}", file=file, key="init")


# Config keys that name one text encoder each, in text-encoder order.
TEXT_ENCODER_KEYS = ("text_encoder_lr", "text_encoder_2_lr")


def _check_family(cfg: TrainConfig, file: str) -> None:
    """Record the base model's family (``cfg.model_family``; refused families never get
    here: :func:`check_model_path` refused them), refuse settings for a text encoder the
    family does not have, and warn when ``resolution`` is below the model's own."""
    from lora_kernel.training.families import family_of
    from lora_kernel.training.models import _unet_config

    family = family_of(cfg.base_model)
    cfg.model_family = family.name
    family.check_config(cfg, file)
    have = {t.lr_key for t in family.text_encoder_parts}
    for key in TEXT_ENCODER_KEYS:
        if getattr(cfg, key) is not None and key not in have:
            raise ConfigError(
                f"{cfg.base_model} is {family.title} ({family.name}), which has "
                f"{len(family.text_encoder_parts)} text encoder(s): there is no encoder for "
                f"{key}; fix: remove {key} (text_encoder_lr sets the rate of every text "
                f"encoder)", file=file, key=key)
    if cfg.init:
        _check_init(cfg, family, file)
    unet = _unet_config(Path(cfg.base_model))
    native = family.native_resolution(unet) if unet else None
    if native and cfg.resolution < native:
        cfg.model_warnings.append(
            f"{family.title} ({family.name}) was trained at {native} px, this config trains "
            f"at resolution {cfg.resolution}: expect blurry, low-detail results; fix: "
            f"resolution: {native} (with gradient_checkpointing: true, mixed_precision: bf16 "
            f"if memory is short)")


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
    from lora_kernel.training.data import (
        ImageTooLarge,
        animated_message,
        frame_count,
        image_layout,
        is_inside,
        kohya_entries,
        metadata_rows,
        open_image,
    )
    if not cfg.train_data_dir:
        raise ConfigError("is required for task: image; fix: set it to the image folder",
                          file=file, key="train_data_dir")
    data = Path(cfg.train_data_dir)
    if not data.is_dir():
        raise ConfigError(f"folder not found: {data}; fix: create it or correct the path",
                          file=file, key="train_data_dir")
    layout = image_layout(cfg)
    # (where, name as written, image path, caption) of every entry
    entries: list[tuple[str, str, Path, str]] = []
    if layout == "kohya":
        found = kohya_entries(data, source=file, caption_extension=cfg.caption_extension)
        if not found:
            raise ConfigError(
                f"dataset is empty: {data} has no metadata.csv and no images (PNG/JPEG/WebP) "
                f"directly in it or in N_concept folders; fix: write a metadata.csv with "
                f"columns {cfg.image_column},{cfg.caption_column}, or add images with .txt "
                f"captions", file=file, key="train_data_dir")
        for e in found:
            rel = e["image"].relative_to(data).as_posix()
            entries.append((str(e["caption_file"] or e["image"]), rel, e["image"],
                            e["caption"]))
    else:
        meta = Path(cfg.metadata_path)
        if layout == "csv" and not meta.is_file():
            raise ConfigError(f"captions file not found: {meta}; fix: write a metadata.csv "
                              f"with columns {cfg.image_column},{cfg.caption_column}",
                              file=file, key="metadata_path")
        meta, cols, rows = metadata_rows(cfg)
        for col, key in ((cfg.image_column, "image_column"), (cfg.caption_column,
                                                               "caption_column")):
            if col not in cols and (layout == "csv" or rows):
                raise ConfigError(f"column {col!r} not in {meta} (columns: {cols}); fix: set "
                                  f"{key} to one of them", file=file, key=key)
        if not rows:
            raise ConfigError(f"dataset is empty: {meta} has no rows; fix: add one row per "
                              f"image", file=file, key="metadata_path")
        for i, row in rows:
            if not row.get(cfg.image_column):
                raise ConfigError(f"line {i} of {meta} has no {cfg.image_column!r} value; fix: "
                                  f"name the image file or remove the row", file=file,
                                  key="metadata_path")
            entries.append((f"line {i} of {meta}", row[cfg.image_column],
                            data / row[cfg.image_column], row.get(cfg.caption_column) or ""))
    warnings: list[str] = []
    first_line: dict[Path, str] = {}
    for where, name, img, caption in entries:
        if not img.is_file():
            raise ConfigError(f"{where} names {name!r}, which is not in {data}; fix: add the "
                              f"image or remove the row", file=file, key="metadata_path")
        if not cfg.allow_outside_dataset and not is_inside(img, data):
            raise ConfigError(f"{where} names {name!r}, which resolves to {img.resolve()}, "
                              f"outside {data}; {_outside_fix(data)}",
                              file=file, key="metadata_path")
        try:  # reads the header only: cheap, and catches truncated or non-image files
            with open_image(img, cfg.max_image_pixels) as im:
                size, frames = im.size, frame_count(im)
                im.verify()
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            raise ConfigError(f"{where} names {name!r}: "
                              f"{getattr(exc, 'detail', exc)}, a possible decompression bomb; "
                              f"fix: downscale the image or remove the row, or raise "
                              f"max_image_pixels if you trust the file",
                              file=file, key="max_image_pixels") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ConfigError(f"{where} names {name!r}, which is "
                              f"not a readable image ({exc}); fix: re-export it as PNG/JPEG or "
                              f"remove the row", file=file, key="metadata_path") from None
        if frames > 1:
            raise ConfigError(animated_message(where, name, frames), file=file,
                              key="metadata_path")
        if not caption.strip():
            warnings.append(f"{where}: the caption of {name!r} is empty (it "
                            f"trains unconditioned)")
        if size == (1, 1):
            warnings.append(f"{where}: {name!r} is 1x1 pixels (a placeholder?)")
        first = first_line.setdefault(img.resolve(), where)
        if first != where:
            first_at = first.split(" of ")[0]
            warnings.append(f"{where}: {name!r} is listed again (first at {first_at}); it "
                            f"trains twice per epoch")
    from lora_kernel.training.captions import keep_tokens_warnings
    warnings += keep_tokens_warnings(cfg, [(w, n, c) for w, n, _, c in entries])
    from lora_kernel.training.image_eval import check_validation_dir
    check_validation_dir(cfg, file)  # held-out images (image_eval.py)
    if cfg.reg_data_dir:  # regularization images: a second kohya-layout set (reg.py)
        from lora_kernel.training.reg import check_reg_folder
        check_reg_folder(cfg, file)
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
        if out == path:  # never suggest `cmd FILE > FILE`: the shell empties FILE first
            out = path.with_name(f"{path.stem}.lines.jsonl")
        raise ConfigError(
            f"{path} holds one JSON array ({len(value)} items), not JSON Lines; fix: write one "
            f"JSON object per line, e.g. python3 -c 'import json,sys; [print(json.dumps(r)) for "
            f"r in json.load(open(sys.argv[1]))]' {path} > {out} and use {out.name}",
            file=file, key="metadata_path")


def _check_quantization(cfg: TrainConfig, file: str) -> None:
    """``quantization`` other than none needs a working bitsandbytes."""
    if cfg.quantization == "none":
        return
    from lora_kernel.training.text_quant import bitsandbytes_problem
    problem = bitsandbytes_problem()
    if problem:
        raise ConfigError(f"quantization: {cfg.quantization} loads the model through "
                          f"bitsandbytes, but {problem}; fix: install the pinned bitsandbytes "
                          f"(requirements.lock.txt), or set quantization: none (and "
                          f"mixed_precision: bf16 to halve the weights)", file=file,
                          key="quantization")


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
    from lora_kernel.training.text_data import CHAT_FORMATS, check_chat_dataset, resolve_format
    for path in files:
        _refuse_json_array(path, file)
    fmt = resolve_format(cfg)  # dataset_format, or auto: from the first line
    if fmt == "preference" or cfg.objective != "sft":  # chosen/rejected pairs (DPO, ORPO)
        from lora_kernel.training.text_pref import check_preference_dataset
        if fmt != "preference":
            raise ConfigError(f"objective: {cfg.objective} trains on preference pairs, but "
                              f"the dataset is {fmt}; fix: one {{\"prompt\", \"chosen\", "
                              f"\"rejected\"}} object per line, or objective: sft", file=file,
                              key="objective")
        check_preference_dataset(cfg, file)
        return
    if fmt in CHAT_FORMATS:  # conversations: roles, turns, the chat template
        check_chat_dataset(cfg, file, fmt)
        return
    for path in files:
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
