"""Optimizers and LR schedules (lora_kernel.training.optimizers): each optimizer trains, its
state checkpoints pickle-free, and an interrupted + resumed run equals an uninterrupted one bit
for bit on CPU; optimizer_args reach the optimizer; min_lr floors a schedule; unknown or
unshipped optimizers and arguments are refused by name."""
from __future__ import annotations

import pytest
import torch

from lora_kernel.common.errors import ConfigError, TrainingInterrupted
from lora_kernel.training.config import config_from_mapping
from lora_kernel.training.loop import run_loop
from lora_kernel.training.optimizers import build_optimizer, build_scheduler

OPTIMIZERS = ["adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor"]


class TinyTask:
    """A regression task of the loop's Task protocol: a frozen linear layer plus a trainable
    low-rank update (64x80: big enough for bitsandbytes' 8-bit state), noisy targets drawn
    from the loop's generator, dropout, four batches per epoch."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 80, generator=g)
        self.w = torch.randn(64, 80, generator=g)
        self.down = torch.nn.Parameter(torch.randn(8, 80, generator=g) * 0.1)
        self.up = torch.nn.Parameter(torch.zeros(64, 8))
        self.big = torch.nn.Parameter(torch.zeros(64, 80))
        self.drop = torch.nn.Dropout(0.1)

    def param_groups(self):
        return [{"params": [self.down, self.up], "lr": self.lr},
                {"params": [self.big], "lr": self.lr}]

    def named_trainable(self):
        return {"down": self.down, "up": self.up, "big": self.big}

    def epoch_batches(self, epoch):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(epoch)).tolist()
        return [perm[i:i + 4] for i in range(0, 16, 4)]

    def loss(self, batch, generator):
        x = self.drop(self.x[batch])
        target = x @ (self.w * 1.1).T + 0.01 * torch.randn(len(batch), 64, generator=generator)
        pred = x @ (self.w + self.up @ self.down + self.big).T
        return torch.nn.functional.mse_loss(pred, target)

    def batch_size_of(self, batch):
        return len(batch)

    def train_mode(self, enabled):
        self.drop.train(enabled)

    def eval_batches(self):
        return [list(range(16))]


def _cfg(name: str, out, **kw):
    lr = 1.0 if name == "prodigy" else 1e-3
    raw = {"base_model": "unused", "optimizer": name, "learning_rate": lr,
           "max_train_steps": 6, "output_dir": str(out), "lr_scheduler": "cosine",
           "lr_warmup_steps": 1, **kw}
    return config_from_mapping(raw)


def _train(name, out, **kw):
    task = TinyTask()
    cfg = _cfg(name, out)
    task.lr = cfg.learning_rate
    result = run_loop(cfg, task, output_dir=out, device=torch.device("cpu"), progress=False,
                      **kw)
    return result, {k: v.detach().clone() for k, v in task.named_trainable().items()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resumed_run_equals_uninterrupted_bit_for_bit(name, tmp_path):
    whole, weights = _train(name, tmp_path / "whole")
    assert whole.losses[-1] < whole.losses[0], whole.losses  # it trains
    with pytest.raises(TrainingInterrupted):
        _train(name, tmp_path / "split", interrupt_at_step=3)
    ckpt = tmp_path / "split" / "checkpoints" / "checkpoint-3"
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json", ".safetensors",
                                                         ".safetensors", ".safetensors"]
    resumed, resumed_weights = _train(name, tmp_path / "split", resume=True)
    assert resumed.losses == whole.losses  # exactly
    for key, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[key]), key


def test_8bit_state_is_checkpointed_quantized(tmp_path):
    with pytest.raises(TrainingInterrupted):
        _train("adamw8bit", tmp_path, interrupt_at_step=2)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.safetensors"))
    # the 64x80 parameter (id 2) has 8-bit state; the small ones keep 32-bit state
    assert state["2.__bnb_optimizer_quant_state__/state1"].dtype == torch.uint8
    assert state["2.__bnb_optimizer_quant_state__/absmax1"].dtype == torch.float32


def test_optimizer_args_reach_the_optimizer_kohya_list_or_mapping():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = config_from_mapping({"base_model": "x", "optimizer": "Prodigy", "learning_rate": 1.0,
                               "optimizer_args": ["d_coef=2", "use_bias_correction=True",
                                                  "betas=0.9,0.99"]})
    assert cfg.optimizer == "prodigy"
    opt = build_optimizer(cfg, [{"params": [p], "lr": 1.0}])
    group = opt.param_groups[0]
    assert group["d_coef"] == 2 and group["use_bias_correction"] is True
    assert tuple(group["betas"]) == (0.9, 0.99)
    cfg = config_from_mapping({"base_model": "x", "optimizer": "lion",
                               "optimizer_args": {"betas": [0.95, 0.98]}})
    assert tuple(build_optimizer(cfg, [{"params": [p], "lr": 1e-4}])
                 .param_groups[0]["betas"]) == (0.95, 0.98)


def test_an_argument_the_optimizer_does_not_take_is_refused_by_name():
    cfg = config_from_mapping({"base_model": "x", "optimizer": "lion",
                               "optimizer_args": ["d_coef=2"]})
    with pytest.raises(ConfigError, match="lion takes no argument 'd_coef'") as exc:
        build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4}])
    assert exc.value.key == "optimizer_args"


@pytest.mark.parametrize("name, match", [
    ("DAdaptAdam", "needs dadaptation, which this platform does not ship; fix: use prodigy"),
    ("sgdfoo", "unknown optimizer 'sgdfoo'"),
])
def test_unshipped_or_unknown_optimizer_is_refused(name, match):
    with pytest.raises(ConfigError, match=match) as exc:
        config_from_mapping({"base_model": "x", "optimizer": name})
    assert exc.value.key == "optimizer"


def _lrs(**kw):
    cfg = config_from_mapping({"base_model": "x", "learning_rate": 1e-3, **kw})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = build_scheduler(cfg, opt, 10)
    out = []
    for _ in range(10):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_min_lr_floors_cosine_and_num_cycles_restarts():
    plain = _lrs(lr_scheduler="cosine")
    floored = _lrs(lr_scheduler="cosine", min_lr=1e-4)
    assert min(plain) < 1e-4 <= min(floored)
    assert floored[0] == pytest.approx(1e-3)
    restarts = _lrs(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert restarts[5] > restarts[4]  # restarted
    poly = _lrs(lr_scheduler="polynomial", lr_scheduler_power=2.0)
    assert poly[5] < _lrs(lr_scheduler="polynomial")[5]


def test_min_lr_must_be_below_learning_rate():
    with pytest.raises(ConfigError, match="min_lr"):
        config_from_mapping({"base_model": "x", "learning_rate": 1e-4, "min_lr": 1e-3})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prodigy", "adamw8bit"])
def test_image_run_with_kohya_optimizer_resumes_bit_identically(name, demo_home, demo_subset,
                                                                tmp_path):
    """The demo image LoRA (UNet and text encoder) with Prodigy / AdamW8bit on 8 of the demo
    images (2 batches an epoch): interrupted at step 2 and resumed, it ends with the very
    losses and adapter of an uninterrupted run."""
    from safetensors.torch import load_file

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.train import train

    over = {"optimizer": name, "learning_rate": 1.0 if name == "prodigy" else 3e-3,
            "max_train_steps": 4, "save_steps": 0, "train_text_encoder": True,
            "lr_scheduler": "cosine", "shuffle_caption": True, **demo_subset(8)}

    def run(out, **kw):
        cfg = load_config(demo_home / "demo" / "image_lora.yaml",
                          {**over, "output_dir": str(out)})
        return train(cfg, progress=False, home=demo_home, samples=False, log=lambda m: None,
                     **kw)

    whole = run(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "split", interrupt_at_step=2)
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.losses == whole.losses
    a, b = (load_file(r.adapter_files["diffusers"]) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
