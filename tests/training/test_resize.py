"""``lora resize`` (lora_kernel.training.resize, cli/posttrain.py): kohya's SVD resize keeps
the best rank-R approximation of each module's update at the same scale and reports the energy
kept; its output is a sealed derived record pinning the source file that lineage finds; a file
that is not a kohya LoRA is refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.resize import resize_lora


def _delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * float(sd[f"{name}.alpha"]) / r


@pytest.fixture
def kohya_file(tmp_path):
    """A rank-8 kohya LoRA whose linear module's update has true rank 2, plus a 3x3 conv
    module of full rank 8."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 32, generator=g), torch.randn(24, 2, generator=g)
    mix = torch.randn(8, 2, generator=g)
    sd = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": mix @ a,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": b @ torch.linalg.pinv(mix),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight":
            torch.randn(8, 6, 3, 3, generator=g),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight":
            torch.randn(10, 8, 1, 1, generator=g),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(8.0),
    }
    path = tmp_path / "style_kohya.safetensors"
    save_file(sd, str(path), metadata={"ss_network_dim": "8"})
    return path


def test_resize_keeps_the_best_rank_r_update_at_the_same_scale(kohya_file, tmp_path):
    before = load_file(str(kohya_file))
    report = resize_lora(kohya_file, tmp_path / "r2.safetensors", 2)
    after = load_file(str(tmp_path / "r2.safetensors"))
    lin = "lora_unet_mid_block_attentions_0_proj_in"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert after[f"{lin}.lora_down.weight"].shape == (2, 32)
    assert after[f"{conv}.lora_down.weight"].shape == (2, 6, 3, 3)
    assert after[f"{conv}.lora_up.weight"].shape == (10, 2, 1, 1)
    # the rank-2 update survives exactly: all its energy kept
    torch.testing.assert_close(_delta(after, lin), _delta(before, lin), atol=1e-4, rtol=1e-4)
    assert report.modules[lin]["energy_kept"] == pytest.approx(1.0, abs=1e-5)
    # the full-rank conv update becomes its best rank-2 approximation (Eckart-Young)
    u, s, vh = torch.linalg.svd(_delta(before, conv))
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    torch.testing.assert_close(_delta(after, conv), best, atol=1e-4, rtol=1e-4)
    kept = float(torch.sqrt((s[:2] ** 2).sum() / (s ** 2).sum()))
    assert report.modules[conv]["energy_kept"] == pytest.approx(kept, rel=1e-4)
    assert report.min_module_energy == pytest.approx(kept, rel=1e-4) and kept < 0.99
    assert kept < report.energy_kept < 1.0


def test_a_file_that_is_not_a_kohya_lora_is_refused(tmp_path):
    path = tmp_path / "peft.safetensors"
    save_file({"unet.to_q.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(ConfigError, match="not a kohya-format LoRA"):
        resize_lora(path, tmp_path / "out.safetensors", 1)
    assert not (tmp_path / "out.safetensors").exists()


def test_lora_resize_of_a_file_is_a_derived_record_lineage_finds(kohya_file, tmp_path,
                                                                   state_tmp, capsys):
    from lora_kernel.cli import main as cli
    from lora_kernel.provenance.audit import lineage
    from lora_kernel.provenance.records import load_manifest, summary, verify_record

    copy = tmp_path / "r1.safetensors"
    assert cli.main(["resize", str(kohya_file), "--rank", "1", "-o", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "energy kept 0." in out
    record = next(p for p in (state_tmp / "runs").iterdir() if p.name != ".staging")
    assert verify_record(record) == []
    s = summary(load_manifest(record))
    assert s["kind"] == "derived"
    assert s["adapter_files"] == ["adapter/style-r1_kohya.safetensors"]
    assert load_file(str(copy)).keys() == load_file(str(record / s["adapter_files"][0])).keys()
    assert record.name in {h["run_id"] for h in lineage(str(kohya_file), state=state_tmp)}
