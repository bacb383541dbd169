"""``lora config --from-kohya``: a kohya sd-scripts / lora-scripts training TOML (and the
dataset TOML its ``dataset_config`` names) as our YAML config.

Every kohya key is accounted for in one of three lists of a :class:`Conversion`: ``mapped``
(kohya key -> our key), ``unmapped`` (no equivalent here yet: the key and why, e.g.
``network_module = lycoris.kohya`` and the LyCORIS algorithm it needs) and ``ignored`` (no
effect on what is trained here, e.g. ``xformers``: PyTorch's SDPA is always used). A Hugging
Face model id as the base model is refused: nothing is downloaded here.

kohya resolves relative paths against the folder it runs in (sd-scripts' or lora-scripts'
root), so :func:`convert_kohya` does the same against ``root`` (default: the current folder)
and writes absolute paths.

Runs as: the user (the CLI).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.habits import NOT_SHIPPED, OPTIMIZERS, canonical_optimizer

# kohya key -> our key, value taken as it is.
SAME = {
    "network_dim": "lora_rank", "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout", "train_batch_size": "batch_size",
    "max_train_epochs": "epochs", "max_train_steps": "max_train_steps",
    "learning_rate": "learning_rate", "text_encoder_lr": "text_encoder_lr",
    "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps",
    "lr_scheduler_num_cycles": "lr_scheduler_num_cycles",
    "lr_scheduler_power": "lr_scheduler_power", "enable_bucket": "enable_bucket",
    "shuffle_caption": "shuffle_caption", "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator", "caption_separator": "caption_separator",
    "caption_extension": "caption_extension", "caption_dropout_rate": "caption_dropout_rate",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "save_every_n_steps": "save_steps", "mixed_precision": "mixed_precision",
    "noise_offset": "noise_offset", "seed": "seed", "output_name": "output_name",
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "max_grad_norm", "flip_aug": "random_flip",
    "cache_latents": "cache_latents", "sample_steps": "sample_steps",
    "save_every_n_epochs": "save_every_n_epochs",
    "min_snr_gamma": "min_snr_gamma", "debiased_estimation_loss": "debiased_estimation_loss",
    "clip_skip": "clip_skip",
    "multires_noise_iterations": "multires_noise_iterations",
    "multires_noise_discount": "multires_noise_discount",
    "zero_terminal_snr": "zero_terminal_snr",
    "sample_every_n_steps": "sample_every_n_steps",
    "sample_every_n_epochs": "sample_every_n_epochs",
    "prior_loss_weight": "prior_loss_weight",
    "validation_split": "validation_split", "validate_every_n_steps": "eval_steps",
    "lr_scheduler_min_lr_ratio": None,  # handled with learning_rate (min_lr)
}
PATHS = {"pretrained_model_name_or_path": "base_model", "train_data_dir": "train_data_dir",
         "output_dir": "output_dir", "network_weights": "init", "reg_data_dir": "reg_data_dir"}

# Keys with no effect on what is trained here: why.
IGNORED = {
    "xformers": "attention runs through PyTorch's scaled_dot_product_attention here",
    "sdpa": "PyTorch's scaled_dot_product_attention is always used here",
    "mem_eff_attn": "PyTorch's scaled_dot_product_attention is always used here",
    "cache_latents_to_disk": "latents are always cached on disk (cache_latents)",
    "persistent_data_loader_workers": "no data-loader worker processes here",
    "max_data_loader_n_workers": "no data-loader worker processes here",
    "lowram": "models load once, on the device",
    "log_with": "TensorBoard logs always go to <output_dir>/tb",
    "logging_dir": "TensorBoard logs always go to <output_dir>/tb",
    "log_prefix": "TensorBoard logs always go to <output_dir>/tb",
    "save_model_as": "adapters are always written as .safetensors (kohya and diffusers format)",
    "model_train_type": "the model family is read from the base model itself",
    "v2": "SD2 models are detected from the base model itself",
    "sdxl": "SDXL models are detected from the base model itself",
    "network_module": "networks.lora is what LoRA training here is",
    "enable_preview": "a lora-scripts GUI setting",
    "cache_text_encoder_outputs": "text-encoder outputs are cached whenever they can be",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached whenever they can be",
    "sample_sampler": "samples use the model's own scheduler",
    "bucket_no_upscale": "buckets here always cover the bucket by resizing",
    "save_state": "resumable checkpoints are always written every save_steps",
    "save_last_n_epochs": "use keep_checkpoints (newest N resume states)",
    "sample_at_first": "the sample grid shows the base model next to the LoRA",
    "ui_custom_params": "a lora-scripts GUI setting",
}

# Keys we cannot map (yet): why, and what to do.
UNMAPPED = {
    "network_args": "network arguments of networks.lora (conv_dim, conv_alpha for LoCon) "
                    "are read with network_module = lycoris.kohya here; fix: network_module = "
                    "\"lycoris.kohya\" with algo=locon",
    "network_train_text_encoder_only": "training the text encoder alone is not offered",
    "v_parameterization": "the prediction type is read from the base model's scheduler",
    "scale_v_pred_loss_like_noise_pred": "v-prediction loss scaling is not offered here",
    "min_bucket_reso": "buckets here span aspect ratios up to 2:1 at `resolution`",
    "max_bucket_reso": "buckets here span aspect ratios up to 2:1 at `resolution`",
    "bucket_reso_steps": "bucket sides here are multiples of 8",
    "max_token_length": "captions are cut at the text encoder's 77 tokens",
    "save_precision": "adapters are saved in float32 (the LoRA weights' dtype)",
    "full_fp16": "full-fp16 training is not offered; mixed_precision keeps the LoRA in fp32",
    "full_bf16": "full-bf16 training is not offered; mixed_precision keeps the LoRA in fp32",
    "color_aug": "color augmentation is not offered",
    "random_crop": "crops are random only without center_crop (set center_crop: false)",
    "caption_dropout_every_n_epochs": "whole-epoch caption dropout is not offered; use "
                                      "caption_dropout_rate",
    "vae": "a separate VAE file is not loaded; the base model's VAE is used",
    "resume": "kohya resume states do not load here; use `lora train --resume`",
    "training_comment": "put notes in the run record (lora run) instead",
    "weighted_captions": "weighted captions are not parsed here",
    "noise_offset_random_strength": "noise offset is a fixed value here",
    "ip_noise_gamma": "input-perturbation noise is not offered",
    "dim_from_weights": "lora_rank is always set in the config",
    "scale_weight_norms": "max-norm regularization is not offered",
    "network_dropout_rank": "rank dropout is not offered",
    "huber_c": "Huber loss is not offered; the loss is MSE",
    "loss_type": "the loss here is MSE",
    "validation_seed": "the run's seed chooses the held-out images and their noise",
    "validate_every_n_epochs": "held-out loss is measured every eval_steps (steps)",
}
LYCORIS_NEEDS = ("network_module = lycoris.kohya with algo {algo}: this platform trains "
                 "LyCORIS algo lora, locon, loha and lokr (network_type); fix: algo=locon, "
                 "loha or lokr")
# LyCORIS network_args -> our keys (algo: network_type; dora_wd: use_dora)
LYCORIS_ARGS = {"conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "factor": "lokr_factor",
                "algo": "network_type", "dora_wd": "use_dora"}
LYCORIS_IGNORED = {"preset": "targets here: target_modules (attention projections) and, with "
                             "conv_dim, the ResNet / sampler convolutions",
                   "use_tucker": "Tucker decomposition is not offered",
                   "use_scalar": "the trainable scalar is not offered",
                   "rank_dropout": "rank dropout is not offered",
                   "module_dropout": "module dropout is not offered",
                   "train_norm": "norm layers are not trained here"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Conversion:
    """A kohya config as ours: the YAML mapping, and what became of every kohya key."""

    source: str
    config: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (kohya key, our key)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (kohya key, why)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (kohya key, why)

    def report(self) -> list[str]:
        """One line per kohya key: ``mapped``, ``not mapped`` (with why) or ``ignored``."""
        lines = [f"mapped: {k} -> {o}" for k, o in self.mapped]
        lines += [f"not mapped: {k}: {why}" for k, why in self.unmapped]
        lines += [f"ignored: {k}: {why}" for k, why in self.ignored]
        return lines

    def to_yaml(self) -> str:
        """Our YAML config, headed by comments naming the source and each unmapped key."""
        import yaml

        head = [f"# Converted by `lora config --from-kohya` from {self.source}."]
        if self.unmapped:
            head.append("# Not mapped (no equivalent here yet):")
            head += [f"#   {k}: {why}" for k, why in self.unmapped]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.config, sort_keys=False,
                                                        allow_unicode=True)


def _read_toml(path: Path, source: str, key: str | None = None) -> dict:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}; fix: give the path of the kohya TOML",
                          file=source, key=key)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"is not TOML ({exc}); fix: give the training TOML that lora-scripts "
                          f"or sd-scripts wrote", file=path, key=key) from None


def convert_kohya(path: str | Path, *, root: str | Path | None = None) -> Conversion:
    """The kohya training TOML at ``path`` as a :class:`Conversion` (relative paths resolved
    against ``root``, default the current folder, as kohya does)."""
    path = Path(path)
    raw = _read_toml(path, str(path))
    base = Path(root) if root is not None else Path.cwd()
    conv = Conversion(source=str(path))
    # sd-scripts' own TOML may group keys in tables ([model_arguments], ...): flatten them
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key != "optimizer_args":
            flat.update(value)
        else:
            flat[key] = value
    out = conv.config
    out["task"] = "image"
    for key, value in flat.items():
        _convert_key(conv, key, value, flat, base, path)
    if "dataset_config" in flat:
        _convert_dataset(conv, _abs(flat["dataset_config"], base), str(path), base)
    if "unet_lr" in flat:  # kohya: unet_lr, when set, is the UNet's LR over learning_rate
        out["learning_rate"] = flat["unet_lr"]
    # kohya trains the text encoder too unless network_train_unet_only (or its LR is 0)
    te_lr = flat.get("text_encoder_lr")
    out["train_text_encoder"] = (not flat.get("network_train_unet_only", False)
                                 and te_lr not in (0, 0.0))
    if not out["train_text_encoder"]:
        out.pop("text_encoder_lr", None)
    if "prior_loss_weight" in out and "reg_data_dir" not in out:  # lora-scripts always writes it
        out.pop("prior_loss_weight")
        conv.mapped.remove(("prior_loss_weight", "prior_loss_weight"))
        conv.ignored.append(("prior_loss_weight", "no regularization images (reg_data_dir or "
                                                  "an is_reg subset): it weights nothing"))
    ratio = flat.get("lr_scheduler_min_lr_ratio")
    if ratio:
        out["min_lr"] = float(ratio) * float(out.get("learning_rate", 1e-4))
    return conv


def _abs(value: Any, base: Path) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _convert_key(conv: Conversion, key: str, value: Any, flat: dict, base: Path,
                 path: Path) -> None:
    out = conv.config
    if key in SAME:
        if SAME[key] is not None:
            out[SAME[key]] = value
            conv.mapped.append((key, SAME[key]))
        else:
            conv.mapped.append((key, "min_lr"))
    elif key in PATHS:
        if key == "pretrained_model_name_or_path":
            _refuse_hub_id(str(value), base, path)
        out[PATHS[key]] = _abs(value, base)
        conv.mapped.append((key, PATHS[key]))
    elif key == "unet_lr":
        out["learning_rate"] = value
        conv.mapped.append((key, "learning_rate"))
    elif key == "resolution":
        out["resolution"] = _resolution(value, conv)
        conv.mapped.append((key, "resolution"))
    elif key == "network_train_unet_only":
        conv.mapped.append((key, "train_text_encoder"))
    elif key == "optimizer_type":
        _convert_optimizer(conv, str(value))
    elif key == "optimizer_args":
        out["optimizer_args"] = (list(value) if isinstance(value, list)
                                 else str(value).split())
        conv.mapped.append((key, "optimizer_args"))
    elif key == "sample_prompts":
        _convert_prompts(conv, value, base)
    elif key in ("positive_prompts", "prompt"):  # lora-scripts' inline sample prompt
        out.setdefault("sample_prompts", []).extend(
            [p.strip() for p in str(value).splitlines() if p.strip()])
        conv.mapped.append((key, "sample_prompts"))
    elif key == "sample_seed":
        out["sample_seeds"] = [int(value)]
        conv.mapped.append((key, "sample_seeds"))
    elif key == "network_module":
        _convert_network(conv, str(value), flat)
    elif key == "network_args" and str(flat.get("network_module", "")).startswith("lycoris"):
        pass  # read with network_module
    elif key == "dataset_config":
        conv.mapped.append((key, "train_data_dir (its subsets)"))
    elif key in IGNORED:
        conv.ignored.append((key, IGNORED[key]))
    elif key in UNMAPPED:
        conv.unmapped.append((key, UNMAPPED[key]))
    else:
        conv.unmapped.append((key, "not a key this converter knows"))


def _convert_network(conv: Conversion, module: str, flat: dict) -> None:
    """``network_module`` (and, for ``lycoris.kohya``, its ``network_args``) as our
    ``network_type``, ``conv_dim``, ``conv_alpha``, ``lokr_factor``, ``use_dora``."""
    if module == "networks.lora":
        conv.ignored.append(("network_module", IGNORED["network_module"]))
        return
    if module == "networks.dylora":
        conv.unmapped.append(("network_module", "networks.dylora (DyLoRA: a LoRA trained at "
                                                "every rank up to network_dim) is not trained "
                                                "here; fix: remove network_module (plain "
                                                "LoRA), then `lora resize` to pick a rank"))
        return
    if module != "lycoris.kohya":
        conv.unmapped.append(("network_module", f"network_module = {module} is not trained "
                                                f"here; fix: remove it"))
        return
    args = {}
    raw = flat.get("network_args", [])
    for item in (raw.split() if isinstance(raw, str) else raw):
        k, _, v = str(item).partition("=")
        args[k.strip()] = v.strip()
    algo = args.get("algo", "lycoris").lower()
    if algo not in ("lora", "locon", "loha", "lokr"):
        conv.unmapped.append(("network_module", LYCORIS_NEEDS.format(algo=algo)))
        return
    conv.config["network_type"] = algo
    conv.mapped.append(("network_module", "network_type"))
    for k, v in args.items():
        name = f"network_args.{k}"
        if k in LYCORIS_ARGS:
            ours = LYCORIS_ARGS[k]
            if ours == "network_type":
                continue
            value: Any = v.lower() == "true" if ours == "use_dora" else (
                float(v) if ours == "conv_alpha" else int(float(v)))
            conv.config[ours] = value
            conv.mapped.append((name, ours))
        elif k in LYCORIS_IGNORED:
            conv.unmapped.append((name, LYCORIS_IGNORED[k]))
        else:
            conv.unmapped.append((name, "not a LyCORIS argument this converter knows"))
    if algo == "lora" and "conv_dim" in conv.config:  # LyCORIS' lora with convs is LoCon
        conv.config["network_type"] = "locon"
    if algo == "locon" and "conv_dim" not in conv.config:  # LyCORIS' default conv rank
        conv.config["network_type"] = "lora"
        conv.unmapped.append(("network_args.conv_dim", "locon without conv_dim trains the "
                                                       "linear layers only: plain LoRA here"))


def _refuse_hub_id(value: str, base: Path, path: Path) -> None:
    local = Path(value).expanduser()
    if not (local if local.is_absolute() else base / local).exists() and HUB_ID.match(value):
        raise ConfigError(f"{value!r} is a Hugging Face model id; nothing is downloaded here; "
                          f"fix: set a local path: download the model where that is allowed, "
                          f"copy it in, and set pretrained_model_name_or_path to its folder or "
                          f".safetensors file", file=path, key="pretrained_model_name_or_path")


def _resolution(value: Any, conv: Conversion) -> int:
    """kohya's ``"512,768"`` (width,height) or ``512``: our square training size."""
    parts = [int(float(p)) for p in str(value).replace("x", ",").split(",") if p.strip()]
    if len(parts) == 2 and parts[0] != parts[1]:
        conv.unmapped.append(("resolution", f"{value!r} is not square: trained at "
                                            f"{max(parts)} (with enable_bucket, buckets of "
                                            f"that area)"))
    return max(parts)


def _convert_optimizer(conv: Conversion, value: str) -> None:
    name = canonical_optimizer(value)
    if name in OPTIMIZERS:
        conv.config["optimizer"] = name
        conv.mapped.append(("optimizer_type", "optimizer"))
    elif name in NOT_SHIPPED:
        conv.unmapped.append(("optimizer_type", f"{value} needs {NOT_SHIPPED[name]}, not "
                                                f"shipped here; converted to prodigy"))
        conv.config["optimizer"] = "prodigy"
    else:
        conv.unmapped.append(("optimizer_type", f"{value} is not offered; adamw is used"))


SAMPLE_OPTION = re.compile(r"\s--(\w+)\s+([^-][^\s]*|-?\d[\w.]*)")


def _convert_prompts(conv: Conversion, value: Any, base: Path) -> None:
    """kohya's ``sample_prompts``: a .txt file of prompts, one a line, with options ``--n``
    (negative), ``--d`` (seed), ``--s`` (steps), ``--w``/``--h``, ``--l`` (CFG)."""
    p = Path(_abs(value, base))
    if p.suffix.lower() != ".txt" or not p.is_file():
        conv.unmapped.append(("sample_prompts", f"{p} is not a readable .txt prompt file "
                                                f"(.toml / .json prompt files are not read)"))
        return
    prompts, seeds, steps, dropped = [], [], None, set()
    for line in p.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text = (" " + line).split(" --", 1)[0].strip()
        for opt, val in SAMPLE_OPTION.findall(" " + line):
            if opt == "d" and val.lstrip("-").isdigit():
                seeds.append(int(val))
            elif opt == "s" and val.isdigit():
                steps = int(val)
            else:
                dropped.add(f"--{opt}")
        prompts.append(text)
    conv.config["sample_prompts"] = prompts
    if seeds:
        conv.config["sample_seeds"] = sorted(set(seeds))
    if steps:
        conv.config["sample_steps"] = steps
    conv.mapped.append(("sample_prompts", "sample_prompts"))
    if dropped:
        conv.unmapped.append(("sample_prompts", f"prompt options {', '.join(sorted(dropped))} "
                                                f"are not used (samples use resolution and a "
                                                f"fixed guidance)"))


def _convert_dataset(conv: Conversion, path_text: str, source: str, base: Path) -> None:
    """The dataset TOML's ``[[datasets]]`` / ``[[datasets.subsets]]``: one training folder
    (a subset's ``image_dir``; relative to ``base``, as kohya reads it)."""
    path = Path(path_text)
    raw = _read_toml(path, source, key="dataset_config")
    general = raw.get("general", {})
    for key, value in general.items():
        _dataset_key(conv, key, value, "general")
    subsets = []
    for ds in raw.get("datasets", []):
        for key, value in ds.items():
            if key != "subsets":
                _dataset_key(conv, key, value, "datasets")
        subsets.extend(ds.get("subsets", []))
    train = [s for s in subsets if not s.get("is_reg")]
    _convert_reg_subsets(conv, [s for s in subsets if s.get("is_reg")], base)
    if len(train) == 1:
        sub = train[0]
        conv.config["train_data_dir"] = _abs(sub["image_dir"], base)
        conv.mapped.append(("datasets.subsets.image_dir", "train_data_dir"))
        for key, value in sub.items():
            if key in ("image_dir", "is_reg"):
                continue
            if key == "num_repeats" and int(value) != 1:
                conv.unmapped.append(("datasets.subsets.num_repeats",
                                      f"{value}: repeats come from N_concept folder names "
                                      f"here; fix: name the folder {value}_<concept>"))
            elif key == "class_tokens":
                conv.unmapped.append(("datasets.subsets.class_tokens",
                                      "images without a caption file take their N_concept "
                                      "folder name as caption here"))
            elif key != "num_repeats":
                _dataset_key(conv, key, value, "datasets.subsets")
    elif len(train) > 1:
        conv.unmapped.append(("datasets.subsets", f"{len(train)} training subsets; this "
                                                  f"platform trains one folder; fix: put "
                                                  f"them as N_concept sub-folders of one "
                                                  f"train_data_dir"))


def _convert_reg_subsets(conv: Conversion, reg: list[dict], base: Path) -> None:
    """The dataset TOML's ``is_reg = true`` subsets: one is ``reg_data_dir`` (its repeats
    come from N_class folder names, as for the training folder)."""
    if len(reg) > 1:
        conv.unmapped.append(("datasets.subsets.is_reg", f"{len(reg)} regularization "
                                                         f"subsets; fix: put them as N_class "
                                                         f"sub-folders of one reg_data_dir"))
        return
    if not reg:
        return
    folder = Path(_abs(reg[0]["image_dir"], base))
    # an N_class folder: its parent is kohya's reg_data_dir (the class name is the caption)
    from lora_kernel.training.data import REPEAT_FOLDER
    conv.config["reg_data_dir"] = str(folder.parent if REPEAT_FOLDER.match(folder.name)
                                      else folder)
    conv.mapped.append(("datasets.subsets.is_reg", "reg_data_dir"))
    value = reg[0].get("num_repeats", 1)
    if int(value) != 1:
        conv.unmapped.append(("datasets.subsets.num_repeats (is_reg)",
                              f"{value}: repeats come from N_class folder names here; fix: "
                              f"name the folder {value}_<class>"))
    if "class_tokens" in reg[0]:
        conv.unmapped.append(("datasets.subsets.class_tokens (is_reg)",
                              "reg images without a caption file take their N_class folder "
                              "name as caption here"))


def _dataset_key(conv: Conversion, key: str, value: Any, table: str) -> None:
    name = f"{table}.{key}"
    if key == "resolution":
        conv.config["resolution"] = _resolution(value, conv)
        conv.mapped.append((name, "resolution"))
    elif key == "batch_size":
        conv.config["batch_size"] = value
        conv.mapped.append((name, "batch_size"))
    elif key in SAME and SAME[key]:
        conv.config[SAME[key]] = value
        conv.mapped.append((name, SAME[key]))
    elif key in IGNORED:
        conv.ignored.append((name, IGNORED[key]))
    else:
        conv.unmapped.append((name, UNMAPPED.get(key, "not a key this converter knows")))
