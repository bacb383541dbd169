"""The adapter types image users trade (issue 24): ``network_type`` lora, locon (LoRA on the
UNet's convolutions too: ``conv_dim`` / ``conv_alpha``), loha (Hadamard product) and lokr
(Kronecker product, ``lokr_factor``), each with or without DoRA (``use_dora``; lora and locon),
trained through peft's LoRA / LoHa / LoKr layers on the UNet, and exported (besides one
peft-format file, :func:`save_peft_unet`) in the LyCORIS /
kohya key names that A1111/Forge and ComfyUI load (``lora_unet_<module>.lora_down/up``,
``.hada_w1_a``..., ``.lokr_w1``..., ``.dora_scale``, ``.alpha``).

Which layers: the linear ``target_modules`` (default the attention projections) with
``lora_rank`` / ``lora_alpha``; with ``conv_dim`` also every convolution of the UNet's ResNet
blocks and down/up samplers (kohya's LoCon targets, ``ResBlock``/``Downsample``/``Upsample``):
3x3 ones at ``conv_dim`` / ``conv_alpha``, 1x1 ones at ``lora_rank`` / ``lora_alpha`` (as
kohya does).

The exported numbers equal what peft trained, in LyCORIS's conventions: each module's update
is ``alpha / rank`` times the product of its factors (LyCORIS's and ComfyUI's rule); a LoKr
module whose two factors are both full matrices is read with scale 1 by those loaders, so its
``alpha / rank`` is multiplied into ``lokr_w1``. DoRA's magnitude (peft: one per output
channel) is ``dora_scale`` of shape (out, 1, ...), LyCORIS's ``wd_on_out`` layout, which
ComfyUI reads too; A1111's own loader assumes the input-channel layout.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lora_kernel.common.errors import ConfigError

NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
CONV_PARENTS = (".resnets.", ".downsamplers.", ".upsamplers.")
# peft's parameter names of each layer type -> LyCORIS's (kohya's) names
LYCORIS_NAMES = {
    "lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(" + "|".join(LYCORIS_NAMES)
                       + r")(?:\.default)?(?:\.weight)?$")


def check_adapter_keys(cfg) -> None:
    """Schema checks of ``network_type``, ``conv_dim``, ``conv_alpha``, ``lokr_factor`` and
    image ``use_dora`` (nothing read from disk); each refusal names its key and the fix."""
    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=cfg.source or "<config>", key=key)

    kind = cfg.network_type
    if kind not in NETWORK_TYPES:
        raise err("network_type", f"must be one of {', '.join(NETWORK_TYPES)}, got {kind!r}; "
                                  f"fix: network_type: lora")
    if cfg.task != "image":
        for key, default in (("network_type", "lora"), ("conv_dim", None),
                             ("conv_alpha", None), ("lokr_factor", -1)):
            if getattr(cfg, key) != default:
                raise err(key, "applies to task: image; fix: remove it")
        return
    if cfg.conv_dim is not None and cfg.conv_dim < 1:
        raise err("conv_dim", f"must be >= 1, got {cfg.conv_dim}")
    if cfg.conv_alpha is not None and not cfg.conv_alpha > 0:
        raise err("conv_alpha", f"must be > 0, got {cfg.conv_alpha}")
    if cfg.conv_alpha is not None and cfg.conv_dim is None:
        raise err("conv_alpha", "scales the convolution layers, and conv_dim is not set; fix: "
                                "set conv_dim (e.g. 4) or remove conv_alpha")
    if kind == "lora" and cfg.conv_dim is not None:
        raise err("conv_dim", "trains the UNet's convolutions, which network_type: lora does "
                              "not; fix: network_type: locon (or loha / lokr)")
    if kind == "locon" and cfg.conv_dim is None:
        raise err("network_type", "locon is LoRA on the convolutions too, and conv_dim is not "
                                  "set; fix: set conv_dim (kohya's typical: 4 .. 16), or "
                                  "network_type: lora")
    if cfg.lokr_factor != -1 and (kind != "lokr" or cfg.lokr_factor < 1):
        raise err("lokr_factor", f"is the Kronecker factor of network_type: lokr (-1: "
                                 f"automatic, else >= 1), got {cfg.lokr_factor} with "
                                 f"network_type {kind}; fix: remove it or use lokr")
    if cfg.use_dora and kind not in ("lora", "locon"):
        raise err("use_dora", f"DoRA applies to network_type lora or locon here, not {kind}; "
                              f"fix: remove use_dora or network_type: lora")
    if getattr(cfg, "init", None) and (kind != "lora" or cfg.use_dora):
        raise err("init", f"continues a plain LoRA; network_type {kind}"
                          f"{' with use_dora' if cfg.use_dora else ''} starts fresh here; fix: "
                          f"remove init or train network_type: lora")


def is_plain_lora(cfg) -> bool:
    """Whether ``cfg`` trains the plain LoRA of before (attention projections, no DoRA)."""
    return getattr(cfg, "network_type", "lora") == "lora" and not getattr(cfg, "use_dora",
                                                                         False)


def conv_modules(unet) -> dict[str, torch.nn.Conv2d]:
    """The convolutions kohya's LoCon trains: every Conv2d of a ResNet block or a down/up
    sampler, by full module name."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d) and ".lora_" not in name
            and any(p in f".{name}." for p in CONV_PARENTS)}


def unet_adapter_config(cfg, unet):
    """The peft config training attaches to the UNet for ``cfg.network_type``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    targets = list(cfg.targets)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if cfg.conv_dim is not None:
        for name, conv in conv_modules(unet).items():
            targets.append(name)
            if conv.kernel_size != (1, 1):  # 1x1 convs take the linear rank, as in kohya
                rank_pattern[re.escape(name)] = int(cfg.conv_dim)
                alpha_pattern[re.escape(name)] = float(cfg.conv_alpha or cfg.conv_dim)
    common = {"r": cfg.lora_rank, "target_modules": targets, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    if cfg.network_type == "loha":
        return LoHaConfig(alpha=cfg.alpha, **common)
    if cfg.network_type == "lokr":
        return LoKrConfig(alpha=cfg.alpha, decompose_factor=cfg.lokr_factor, **common)
    return LoraConfig(lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                      init_lora_weights="gaussian", use_dora=bool(cfg.use_dora), **common)


def _module_rank_alpha(config, module: str) -> tuple[int, float]:
    """``(rank, alpha)`` peft gave ``module`` (its rank/alpha patterns, else the defaults)."""
    from peft.utils.other import get_pattern_key
    alpha_default = getattr(config, "lora_alpha", None) or config.alpha
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module),
                                   config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module),
                                     alpha_default)
    return int(rank), float(alpha)


def lycoris_state_dict(unet_sd: dict, config, unet, *, family=None) -> dict:
    """The UNet's peft state dict (LoRA / LoHa / LoKr, DoRA) in LyCORIS / kohya names, each
    module with its ``alpha`` (see the module docstring); ``family`` names the modules
    (SDXL: the original layout's)."""
    from lora_kernel.training.export import KOHYA_UNET_PREFIX, _kohya_name
    from lora_kernel.training.families import family_named
    family = family or family_named("sd15")
    unet_config = dict(unet.config)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in unet_sd.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ValueError(f"unexpected adapter key {key!r}: cannot convert to LyCORIS names")
        module, part = match.groups()
        grouped.setdefault(module, {})[part] = tensor.detach().float().cpu()
    out: dict[str, torch.Tensor] = {}
    for module, parts in grouped.items():
        name = _kohya_name(KOHYA_UNET_PREFIX, family.kohya_unet_name(module, unet_config))
        rank, alpha = _module_rank_alpha(config, module)
        if "lokr_w1" in parts and "lokr_w2" in parts:  # both full: loaders use scale 1
            parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)
        if "lora_magnitude_vector" in parts:
            base = unet.get_submodule(module)
            weight = getattr(base, "base_layer", base).weight
            parts["lora_magnitude_vector"] = parts["lora_magnitude_vector"].reshape(
                weight.shape[0], *[1] * (weight.dim() - 1))
        for part, tensor in parts.items():
            out[f"{name}.{LYCORIS_NAMES[part]}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def network_metadata(cfg) -> dict[str, str]:
    """kohya's header entries naming the network (``ss_network_module``, ``ss_network_args``)
    as LyCORIS trainers write them."""
    args = {"algo": {"lora": "lora", "locon": "locon", "loha": "loha",
                     "lokr": "lokr"}[cfg.network_type]}
    if cfg.conv_dim is not None:
        args.update(conv_dim=str(cfg.conv_dim), conv_alpha=str(cfg.conv_alpha or cfg.conv_dim))
    if cfg.use_dora:
        args["dora_wd"] = "True"
    if cfg.network_type == "lokr":
        args["factor"] = str(cfg.lokr_factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
            "lora_enclave.network_type": cfg.network_type}


def save_lycoris(path: Path, cfg, unet, config, text_encoder, metadata: dict[str, str], *,
                 text_encoder_2=None, family=None) -> Path:
    """Write the LyCORIS / kohya-format file of a non-plain adapter (the text encoders' LoRA,
    when trained, in kohya's ``lora_te`` names)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_kernel.common.atomic import atomic_path
    from lora_kernel.training.export import kohya_state_dict, text_encoder_state_dict
    tensors = lycoris_state_dict(get_peft_model_state_dict(unet), config, unet, family=family)
    te_sd, te2_sd = text_encoder_state_dict(text_encoder), text_encoder_state_dict(
        text_encoder_2)
    if te_sd or te2_sd:
        tensors.update(kohya_state_dict({}, te_sd, cfg.alpha, te2_sd=te2_sd, family=family,
                                        unet_config=dict(unet.config)))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, **network_metadata(cfg),
                                               "format": "pt"})
    return Path(path)


PEFT_CONFIG_KEY = "lora_enclave.peft_config"


def save_peft_unet(path: Path, unet, config, metadata: dict[str, str]) -> Path:
    """The UNet adapter in peft's own names as one ``.safetensors`` file, its peft config
    (JSON) in the header under :data:`PEFT_CONFIG_KEY` (one file, as diffusers' LoRA files
    carry theirs, so a snapshot is one file with one sha256): the loadable format of LoHa /
    LoKr, which diffusers' ``load_lora_weights`` does not read. :func:`load_peft_unet` loads
    it with peft."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_kernel.common.atomic import atomic_path
    conf = config.to_dict()
    conf["target_modules"] = sorted(conf["target_modules"] or [])
    conf["peft_type"] = str(getattr(conf["peft_type"], "value", conf["peft_type"]))
    tensors = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt",
                                               PEFT_CONFIG_KEY: json.dumps(conf, default=str)})
    return Path(path)


def load_peft_unet(path: str | Path, unet) -> None:
    """Attach the adapter of a :func:`save_peft_unet` file to ``unet`` with peft
    (``inject_adapter_in_model`` + ``set_peft_model_state_dict``); a weight without a layer
    (another model's file) is a :class:`ConfigError`."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.config import PeftConfig
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as fh:
        conf = json.loads((fh.metadata() or {}).get(PEFT_CONFIG_KEY, "null") or "null")
    if not isinstance(conf, dict):
        raise ConfigError(f"has no {PEFT_CONFIG_KEY} header: not a PEFT adapter file this "
                          f"platform wrote", file=path)
    inject_adapter_in_model(PeftConfig.from_peft_type(**conf), unet)
    result = set_peft_model_state_dict(unet, load_file(str(path)))
    if result.unexpected_keys:
        raise ConfigError(f"does not fit this UNet ({len(result.unexpected_keys)} weights "
                          f"without a layer, e.g. {result.unexpected_keys[0]})", file=path)
