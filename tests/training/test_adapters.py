"""Adapter types (lora_kernel.training.adapters): LoCon, LoHa, LoKr and DoRA on the UNet, their
LyCORIS / kohya exports mapped key by key onto the full-size SD1.5 layout (meta device), a
two-step training per type whose export LyCORIS' own loader rebuilds into the same UNet output
as peft's (and a changed one), the peft-format file reloading in peft, per-epoch snapshots
of both, and the refusals each paired
with the config that works."""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.adapters import lycoris_state_dict, unet_adapter_config

TYPES = [("lora", True), ("locon", False), ("locon", True), ("loha", False), ("lokr", False)]
IDS = ["dora", "locon", "locon-dora", "loha", "lokr"]


def _cfg(kind: str, dora: bool, rank: int = 4) -> SimpleNamespace:
    return SimpleNamespace(network_type=kind, use_dora=dora, lora_rank=rank, alpha=2.0,
                           lora_dropout=0.0, targets=["to_q", "to_k", "to_v", "to_out.0"],
                           conv_dim=None if kind == "lora" else 8,
                           conv_alpha=None if kind == "lora" else 1.0, lokr_factor=-1)


@pytest.fixture(scope="module")
def sd15_meta_unet():
    """The full-size SD1.5 UNet (bundled config) on the meta device: no memory."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lora_kernel.training.models import bundled_config
    with init_empty_weights():
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            bundled_config("sd15") / "unet"))


def _delta_shape(parts: dict) -> tuple[int, int]:
    """(out, in x kernel) of the update a LyCORIS module's factors make."""
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        assert down.shape[0] == up.shape[1] and up.shape[2:] in ((), (1, 1))
        return up.shape[0], down[0].numel()
    if "hada_w1_a" in parts:
        assert parts["hada_w1_a"].shape == parts["hada_w2_a"].shape
        assert parts["hada_w1_b"].shape == parts["hada_w2_b"].shape
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]

    def factor(i: int) -> torch.Tensor:
        if f"lokr_w{i}" in parts:
            return parts[f"lokr_w{i}"]
        return parts[f"lokr_w{i}_a"] @ parts[f"lokr_w{i}_b"]
    w1, w2 = factor(1), factor(2)
    return w1.shape[0] * w2.shape[0], w1.shape[1] * w2[0].numel()


@pytest.mark.parametrize(("kind", "dora"), TYPES, ids=IDS)
def test_every_exported_key_maps_onto_the_full_size_sd15_layout(sd15_meta_unet, kind, dora):
    from peft import get_peft_model_state_dict

    from lora_kernel.training.export import kohya_module_names
    from lora_kernel.training.single_file import unet_key_to_ldm
    unet = copy.deepcopy(sd15_meta_unet)
    config = unet_adapter_config(_cfg(kind, dora), unet)
    unet.add_adapter(config)
    sd = {k: torch.zeros(tuple(v.shape)) for k, v in get_peft_model_state_dict(unet).items()}
    exported = lycoris_state_dict(sd, config, unet)
    modules = kohya_module_names(unet)
    by_module: dict[str, dict] = {}
    for key, tensor in exported.items():
        name, part = key.split(".", 1)
        by_module.setdefault(name, {})[part] = tensor
    n_conv = 0
    ldm_prefixes = set()
    for name, parts in by_module.items():
        mod = modules[name]  # a lora_unet_ name of a real module of the SD1.5 UNet
        base = getattr(mod, "base_layer", mod)
        weight = base.weight
        assert _delta_shape(parts) == (weight.shape[0], weight[0].numel()), name
        assert parts["alpha"].ndim == 0
        if dora:
            assert parts["dora_scale"].shape == (weight.shape[0], *[1] * (weight.dim() - 1))
        dotted = next(n for n, m in unet.named_modules() if m is mod)
        ldm = unet_key_to_ldm(dotted + ".weight", unet.config.layers_per_block,
                              list(unet.config.up_block_types))
        assert ldm.startswith(("input_blocks.", "middle_block.", "output_blocks.")), ldm
        ldm_prefixes.add(re.sub(r"\.\d+", ".N", ldm).rsplit(".", 1)[0])
        if isinstance(base, torch.nn.Conv2d):
            n_conv += 1
            wanted = 8 if base.kernel_size != (1, 1) else 4  # conv_dim / lora_rank
            rank = (parts.get("lora_down.weight", parts.get("hada_w1_b"))
                    if kind != "lokr" else None)
            if rank is not None:
                assert rank.shape[0] == wanted
            assert float(parts["alpha"]) == (1.0 if base.kernel_size != (1, 1) else 2.0)
    attn = 128  # 16 transformer blocks x 2 attentions x 4 projections
    if kind == "lora":
        assert len(by_module) == attn and n_conv == 0
    else:  # 22 ResNet blocks x (conv1, conv2) + 14 shortcuts + 3 downsamplers + 3 upsamplers
        assert n_conv == 22 * 2 + 14 + 3 + 3 and len(by_module) == attn + n_conv
        assert {"input_blocks.N.N.in_layers.N", "output_blocks.N.N.skip_connection",
                "input_blocks.N.N.op", "output_blocks.N.N.conv"} <= ldm_prefixes


@pytest.fixture(scope="module")
def tiny_unet(demo_home):
    """The demo's tiny SD UNet, loaded once (the base the exports are applied to)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(str(demo_home / "demo" / "models" / "tiny-sd"),
                                                subfolder="unet").eval()


@pytest.fixture(scope="module")
def four_images(demo_home, tmp_path_factory):
    """A 4-image copy of the demo dataset (one batch: the loop's evaluation passes stay one
    forward each) and a working home whose latent cache the trainings share."""
    import csv
    import shutil
    root = tmp_path_factory.mktemp("adapters")
    src = demo_home / "demo" / "datasets" / "image"
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[::6][:4]
    data = root / "data"
    data.mkdir()
    with open(data / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
        writer.writeheader()
        for row in rows:
            shutil.copy(src / row["file_name"], data / row["file_name"])
            writer.writerow({"file_name": row["file_name"], "text": row["text"]})
    return data, root / "home"


def _lycoris_apply(unet, weights: dict) -> int:
    """Rebuild ``weights`` (LyCORIS / kohya names) with LyCORIS' own loader on ``unet`` (what
    its kohya network does per module); returns the modules applied."""
    from lycoris.modules import get_module, make_module
    by = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    names = sorted({k.split(".")[0] for k in weights})
    mods = []
    for name in names:
        kind, params = get_module(weights, name)
        mods.append(make_module(kind, params, name, by[name]))
    for m in mods:
        m.apply_to()
    return len(mods)


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, ctx).sample


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dora"), [t for t in TYPES if t != ("locon", True)],
                         ids=[i for i in IDS if i != "locon-dora"])
def test_each_type_trains_and_its_export_reloads(demo_home, tmp_path, tiny_unet, four_images,
                                                 kind, dora):
    from safetensors.torch import load_file

    from lora_kernel.training.adapters import load_peft_unet
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.export import read_metadata
    from lora_kernel.training.train import train
    overrides = {"output_dir": str(tmp_path), "max_train_steps": 2, "save_steps": 0,
                 "network_type": kind, "use_dora": dora, "lora_rank": 4, "lora_alpha": 2,
                 "learning_rate": 0.01, "train_data_dir": str(four_images[0]),
                 "metadata_path": str(four_images[0] / "metadata.csv")}
    if kind != "lora":
        overrides.update(conv_dim=4, conv_alpha=1)
    if kind == "lokr":  # one batch per epoch: two epochs, two loadable snapshots
        overrides["save_every_n_epochs"] = 1
    cfg = load_config(demo_home / "demo" / "image_lora.yaml", overrides)
    res = train(cfg, progress=False, home=four_images[1], samples=False, log=lambda m: None)
    assert set(res.adapter_files) == {"peft", "kohya"}
    trained = _unet_out(res.live["components"].unet)
    base = _unet_out(tiny_unet)
    assert (trained - base).abs().max() > 1e-4  # two steps changed the UNet's output
    kohya = load_file(res.adapter_files["kohya"])
    meta = read_metadata(res.adapter_files["kohya"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == kind
    fresh = copy.deepcopy(tiny_unet)
    assert _lycoris_apply(fresh, kohya) == len({k.split(".")[0] for k in kohya})
    torch.testing.assert_close(_unet_out(fresh), trained, atol=1e-4, rtol=1e-4)
    # the PEFT file reloads in peft onto the base UNet with the same output
    again = copy.deepcopy(tiny_unet)
    load_peft_unet(res.adapter_files["peft"], again)
    torch.testing.assert_close(_unet_out(again), trained, atol=1e-5, rtol=1e-5)
    if kind == "lokr":
        from lora_kernel.common.digests import sha256_file
        index = json.loads((tmp_path / "snapshots" / "snapshots.json").read_text())
        assert [e["epoch"] for e in index["snapshots"]] == [1, 2]
        last = index["snapshots"][-1]["files"]
        assert set(last) == {"peft", "kohya"}
        for f in last.values():  # each listed with the sha256 of the file written
            assert f["sha256"] == sha256_file(tmp_path / "snapshots" / f["name"])
        assert load_file(tmp_path / "snapshots" / last["kohya"]["name"]).keys() == kohya.keys()


@pytest.mark.parametrize(("changes", "key"), [
    ({"network_type": "lycoris"}, "network_type"),
    ({"network_type": "locon"}, "network_type"),  # no conv_dim
    ({"conv_dim": 4}, "conv_dim"),  # plain lora
    ({"network_type": "loha", "use_dora": True, "conv_dim": 4}, "use_dora"),
    ({"network_type": "lora", "lokr_factor": 4}, "lokr_factor"),
    ({"network_type": "locon", "conv_alpha": 1}, "conv_alpha"),
], ids=["unknown", "locon-without-conv-dim", "conv-dim-on-lora", "dora-on-loha",
        "factor-without-lokr", "conv-alpha-without-dim"])
def test_adapter_keys_out_of_place_are_refused(changes, key):
    from lora_kernel.training.config import config_from_mapping
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"base_model": "x", **changes})
    assert info.value.key == key and "fix:" in str(info.value)


def test_adapter_keys_in_place_are_accepted():
    from lora_kernel.training.config import config_from_mapping
    for changes in ({"network_type": "locon", "conv_dim": 8, "conv_alpha": 4,
                     "use_dora": True}, {"network_type": "lokr", "lokr_factor": 4},
                    {"network_type": "loha", "conv_dim": 4}, {"use_dora": True}):
        cfg = config_from_mapping({"base_model": "x", **changes})
        assert cfg.network_type == changes.get("network_type", "lora")


@pytest.mark.parametrize(("kind", "dora"), [("locon", True), ("lokr", False)],
                         ids=["locon-dora", "lokr"])
def test_sdxl_exports_name_modules_of_the_sdxl_layout(kind, dora):
    """SDXL files name the UNet's modules in its original layout (``input_blocks_4_1_...``,
    sd-scripts' SDXL names): every exported module, convolutions included, is a real module
    there, with the shapes of its weight."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model_state_dict

    from lora_kernel.training.export import kohya_module_names
    from lora_kernel.training.families import family_named
    from lora_kernel.training.models import bundled_config
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            bundled_config("sdxl") / "unet"))
    config = unet_adapter_config(_cfg(kind, dora), unet)
    unet.add_adapter(config)
    sdxl = family_named("sdxl")
    sd = {k: torch.zeros(tuple(v.shape)) for k, v in get_peft_model_state_dict(unet).items()}
    exported = lycoris_state_dict(sd, config, unet, family=sdxl)
    modules = kohya_module_names(unet, family=sdxl)
    names = {k.split(".")[0] for k in exported}
    assert names <= set(modules)
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", n)
               for n in names)
    assert any("_in_layers_2" in n for n in names)  # a ResNet 3x3 convolution, LDM-named
    for name in names:
        parts = {k.split(".", 1)[1]: v for k, v in exported.items() if k.startswith(name + ".")}
        weight = getattr(modules[name], "base_layer", modules[name]).weight
        assert _delta_shape(parts) == (weight.shape[0], weight[0].numel()), name
