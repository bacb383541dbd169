"""Feedback during training (lora_kernel.training.snapshots): loadable adapters per epoch in
both formats, listed with sha256; sample grids during training into samples/step-N/ and
TensorBoard; and none of it changes what is trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kernel.common.digests import sha256_file
from lora_kernel.training.checks import load_config
from lora_kernel.training.train import train

pytestmark = pytest.mark.slow

# 8 demo images in batches of 4: 2 steps per epoch, 2 epochs
FEEDBACK = {"epochs": 2, "max_train_steps": None, "save_steps": 0, "save_every_n_epochs": 1,
            "sample_every_n_steps": 2, "sample_steps": 1, "sample_seeds": [0],
            "sample_prompts": ["a red circle in enclave style"]}


def _train(demo_home, out: Path, data: dict, **kw):
    cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                      {**FEEDBACK, **data, **kw, "output_dir": str(out)})
    return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None)


@pytest.fixture(scope="module")
def feedback_run(demo_home, demo_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("feedback")
    return out, _train(demo_home, out, demo_subset(8))


def test_each_epoch_leaves_a_loadable_adapter_listed_with_its_sha256(feedback_run):
    out, res = feedback_run
    assert res.steps == 4
    index = json.loads((out / "snapshots" / "snapshots.json").read_text())["snapshots"]
    assert [(e["step"], e["epoch"], e["by"]) for e in index] == [(2, 1, "epoch"),
                                                                (4, 2, "epoch")]
    assert res.snapshots == index
    for entry in index:
        for fmt in ("diffusers", "kohya"):
            f = entry["files"][fmt]
            assert sha256_file(out / "snapshots" / f["name"]) == f["sha256"]
    assert index[0]["files"]["kohya"]["name"] == "enclave_style-e0001_kohya.safetensors"
    # epoch 2 ended the run: its snapshot is the final adapter; epoch 1's is not
    final = load_file(res.adapter_files["diffusers"])
    last = load_file(str(out / "snapshots" / index[1]["files"]["diffusers"]["name"]))
    first = load_file(str(out / "snapshots" / index[0]["files"]["diffusers"]["name"]))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], first[k]) for k in final)


def test_an_epoch_snapshot_loads_in_diffusers_in_kohya_format(feedback_run, demo_home):
    from diffusers import StableDiffusionPipeline
    out, res = feedback_run
    model = str(demo_home / "demo" / "models" / "tiny-sd")

    def unet_out(pipe):
        g = torch.Generator().manual_seed(0)
        c = pipe.unet.config
        x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
        ctx = torch.randn(1, 77, c.cross_attention_dim, generator=g)
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), ctx).sample

    base = StableDiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                   safety_checker=None)
    ref = unet_out(base)
    base.load_lora_weights(str(out / "snapshots"),
                           weight_name="enclave_style-e0001_kohya.safetensors", adapter_name="e1")
    assert (unet_out(base) - ref).abs().mean() > 1e-5


def test_samples_during_training_go_to_their_step_folder_and_tensorboard(feedback_run):
    out, _ = feedback_run
    for step in (2, 4):
        info = json.loads((out / "samples" / f"step-{step:06d}" / "samples.json").read_text())
        assert Path(info["grid"]).is_file() and info["seeds"] == [0]
    events = b"".join(p.read_bytes() for p in (out / "tb").glob("events.out.tfevents*"))
    assert events.count(b"samples/grid") >= 2


def test_snapshots_and_samples_do_not_change_what_is_trained(feedback_run, demo_home,
                                                            demo_subset, tmp_path):
    _, res = feedback_run
    plain = _train(demo_home, tmp_path, demo_subset(8), save_every_n_epochs=0,
                   sample_every_n_steps=0)
    assert plain.losses == res.losses
    a, b = load_file(plain.adapter_files["diffusers"]), load_file(res.adapter_files["diffusers"])
    assert all(torch.equal(a[k], b[k]) for k in a)
