"""Data-parallel training (lora_kernel.training.distributed, distributed_checks): which slice
of each batch a rank trains, the config keys' refusals and their accepted twins, and the
proof that 2 processes x batch B train the adapter 1 process x batch 2B trains (same seed).

Equality tolerance: max abs difference of every adapter tensor < 1e-5 (the losses < 1e-5 too).
Not bit-identical: each rank's gradient is a partial sum of the batch, and the all-reduce adds
two partial sums where one process adds all terms in one reduction: float32 rounding differs
in the last bits (about 1e-7 relative), and AdamW's normalised steps carry that on.
"""
from __future__ import annotations

import json
import socket

import pytest
import torch
from democonfig import write_config
from safetensors.torch import load_file

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.distributed import Shard

TOL = 1e-5


# -- which examples a rank trains ------------------------------------------------------------

def test_the_ranks_slices_cover_every_example_of_a_batch_once():
    for world in (1, 2, 3, 4):
        for n in range(1, 10):
            parts = [Shard(r, world).part(n) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            # the weighted slice means average to the global mean: sum_r w_r * size_r/size_r
            weights = [Shard(r, world).weight(n) for r in range(world)]
            assert sum(weights) / world == pytest.approx(1.0)


def test_an_even_batch_gives_each_rank_its_contiguous_half():
    assert Shard(0, 2).part(8) == slice(0, 4) and Shard(1, 2).part(8) == slice(4, 8)
    assert Shard(1, 2).weight(8) == 1.0
    assert Shard(1, 4).size(3) == 1 and Shard(3, 4).size(3) == 0  # a short last batch


def test_a_family_slices_the_per_example_tensors_of_a_noisy_batch_only():
    from lora_kernel.training.families import family_named
    from lora_kernel.training.families.base import NoisyBatch
    batch = NoisyBatch(noisy=torch.arange(24.).view(4, 6), timesteps=torch.arange(4),
                       target=torch.ones(4, 6), weights=None,
                       extra={"guidance": 3.5, "per": torch.arange(4), "cfg": object()})
    cut = family_named("sd15").shard_batch(batch, slice(2, 4), 4)
    assert torch.equal(cut.noisy, batch.noisy[2:]) and cut.timesteps.tolist() == [2, 3]
    assert cut.extra["per"].tolist() == [2, 3] and cut.extra["guidance"] == 3.5
    assert cut.extra["cfg"] is batch.extra["cfg"] and cut.weights is None


# -- the keys: refused, and the accepted twin of each refusal -------------------------------

def test_num_processes_must_be_auto_or_a_positive_number(demo_home, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for bad in ("two", 0, -1):
        with pytest.raises(ConfigError, match="num_processes") as info:
            load_config(write_config(demo_home, tmp_path, "image_lora.yaml",
                                     num_processes=bad))
        assert "fix:" in str(info.value)
    cfg = load_config(write_config(demo_home, tmp_path, "image_lora.yaml", num_processes=2))
    assert cfg.num_processes == "2"  # on CPU: gloo, an explicit number
    from lora_kernel.training.distributed_checks import resolve_num_processes
    auto = load_config(write_config(demo_home, tmp_path, "image_lora.yaml"))
    assert auto.num_processes == "auto" and resolve_num_processes(auto) == 1  # CPU


def test_more_processes_than_gpus_given_is_refused(demo_home, tmp_path, monkeypatch):
    path = write_config(demo_home, tmp_path, "image_lora.yaml", num_processes=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the run was given one GPU
    with pytest.raises(ConfigError, match=r"num_processes 2 but the run was given 1 GPU") as e:
        load_config(path)
    assert "--gpus 2" in str(e.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert load_config(path).num_processes == "2"


def test_fsdp_is_refused_for_an_image_run_and_off_is_accepted(demo_home, tmp_path):
    with pytest.raises(ConfigError, match="fsdp shards a text model") as info:
        load_config(write_config(demo_home, tmp_path, "image_lora.yaml", fsdp=True))
    assert info.value.key == "fsdp"
    assert load_config(write_config(demo_home, tmp_path, "image_lora.yaml",
                                    fsdp=False)).fsdp is False
    with pytest.raises(ConfigError, match="fsdp: true is not built"):  # text: said, not faked
        load_config(write_config(demo_home, tmp_path, "text_lora.yaml", fsdp=True))


def test_a_rendezvous_port_in_use_is_refused_a_free_one_accepted(demo_home, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(demo_home, tmp_path, "image_lora.yaml", num_processes=2,
                            rendezvous_port=port)
        with pytest.raises(ConfigError, match=f"rendezvous_port {port} on 127.0.0.1 is in use"):
            load_config(path)
    assert load_config(path).rendezvous_port == port  # closed: free again


def test_preference_objectives_are_refused_on_several_processes(demo_home, tmp_path):
    from lora_kernel.training.distributed_checks import check_distributed_keys
    cfg = load_config(write_config(demo_home, tmp_path, "text_lora.yaml", num_processes=2))
    check_distributed_keys(cfg)  # sft: fine
    cfg.objective = "dpo"
    with pytest.raises(ConfigError, match="objective dpo"):
        check_distributed_keys(cfg)


# -- the proof: 2 x B == 1 x 2B ----------------------------------------------------------------

FAST_IMAGE = {"max_train_steps": 3, "save_steps": 0, "sample_prompts": [],
              "lora_dropout": 0.0}


@pytest.mark.slow
def test_two_ranks_train_the_image_adapter_of_one_rank_with_double_batch(
        demo_home, tmp_path, capsys):
    """Through ``lora train``: 2 processes x batch 2 against 1 process x batch 4, the 2-rank
    run stopped after step 2 (its checkpoint) and resumed on 2 ranks to step 3."""
    from lora_kernel.cli import main as cli
    outs = {}
    for n, batch in ((2, 2), (1, 4)):
        out = tmp_path / f"out{n}"
        cfg = write_config(demo_home, tmp_path, "image_lora.yaml", num_processes=n,
                           batch_size=batch, output_dir=str(out), **FAST_IMAGE)
        if n == 2:  # 2 steps, checkpoint, then --resume to the 3rd
            assert cli.main(["train", "--config", str(cfg), "--quiet", "--no-samples",
                             "-p", "max_train_steps", "2", "-p", "save_steps", "2"]) == 0
            assert (out / "checkpoints" / "checkpoint-2" / "state.json").is_file()
            assert cli.main(["train", "--config", str(cfg), "--quiet", "--no-samples",
                             "-p", "save_steps", "2", "--resume"]) == 0
        else:
            assert cli.main(["train", "--config", str(cfg), "--quiet", "--no-samples"]) == 0
        outs[n] = out
    printed = capsys.readouterr().out
    assert "rank 0/2: pid" in printed and "rank 1/2: pid" in printed
    assert "resumed from" in printed
    two, one = (load_file(str(outs[n] / "enclave_style.safetensors")) for n in (2, 1))
    assert two.keys() == one.keys() and len(one) > 0
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff < TOL, diff
    moved = max((one[k]).abs().max().item() for k in one)
    assert moved > 100 * TOL  # the adapters are not equal because nothing trained
    s2, s1 = (json.loads((outs[n] / "training_summary.json").read_text()) for n in (2, 1))
    assert s2["losses"] == pytest.approx(s1["losses"], abs=TOL)
    dist = s2["distributed"]
    assert dist["num_processes"] == 2 and dist["backend"] == "gloo"
    assert dist["effective_batch_size"] == 4 and dist["batch_size_per_rank"] == 2
    assert dist["learning_rate"] == s1["config"]["learning_rate"]
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert all(r["exit_code"] == 0 and r["pid"] > 0 for r in dist["ranks"])
    assert s1.get("distributed") in ({}, None)
    # rank 0 alone wrote TensorBoard: one event file per run (two: the run and its resume),
    # each named with a rank 0's pid
    import re
    zero = set(re.findall(r"rank 0/2: pid (\d+)", printed))
    writers = {p.name.split(".")[-2] for p in (outs[2] / "tb").glob("events.*")}
    assert len(zero) == 2 and writers == zero, (writers, printed)


def test_the_gpus_a_run_is_given_become_its_processes(monkeypatch):
    """``lora run --hub --gpus N`` / the spawner: the runs service gives the run N GPUs
    (hub.gpus.cuda_env), and ``num_processes: auto`` resolves to N; none given: 1."""
    from hub.gpus import cuda_env
    from lora_kernel.training.config import config_from_mapping
    from lora_kernel.training.distributed_checks import resolve_num_processes
    cfg = config_from_mapping({"base_model": "x", "task": "image"})
    for devices, want in ((["0", "1"], 2), (["2", "3", "5", "7"], 4), ([], 1)):
        for key, value in cuda_env(devices).items():
            monkeypatch.setenv(key, value)
        assert resolve_num_processes(cfg) == want


def test_progress_lines_show_the_global_step_and_the_ranks_throughput():
    import io

    from lora_kernel.user.progress import ProgressView
    out = io.StringIO()
    view = ProgressView(out, live=False)
    recs = [{"event": "train_start", "step": 0, "total": 2, "task": "image"},
            {"event": "step", "step": 2, "total": 2, "start": 0, "loss": 0.5, "lr": 1e-3,
             "elapsed": 1.0, "ranks": 2, "examples_per_second": 8.0}]
    view.feed(b"".join(json.dumps(r).encode() + b"\n" for r in recs))
    view.close()
    assert "step 2/2 (100%)  loss 0.5000  2.00 it/s  2 ranks 8.0 examples/s" in out.getvalue()
