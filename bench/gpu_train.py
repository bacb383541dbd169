"""GPU training benchmark (issue 13): ``lora train`` eager and compiled against a bare-loop
ceiling and, for text, Hugging Face ``transformers.Trainer`` + peft, on full-size models.

Everything is built here, on the machine that runs the benchmark; nothing is downloaded:

* image: an SD1.5-architecture diffusers folder (UNet, VAE and CLIP text encoder from the
  bundled SD1.x configs in ``lora_kernel.training.demo_assets.SD15_CONFIGS``, random
  weights; the demo's locally built CLIP tokenizer) and 32 procedurally drawn 512 px images
  (the demo's ``draw_image``, scaled up) with captions;
* text: a 0.95B-parameter Llama-architecture causal LM (hidden 2048, 16 layers, 16 heads,
  intermediate 5632, vocab 32000, random weights; the demo's locally built BPE tokenizer) and
  64 plain-text records of at least 512 tokens each (built from the demo's text records);
* sdxl (issue 22): an SDXL-base-architecture diffusers folder (UNet, VAE and both text
  encoders from the bundled SDXL configs, ``lora_kernel.training.demo_sdxl.SDXL_CONFIGS``,
  random weights built on the device; the demo tokenizers) and 16 demo-style 1024 px images:
  batch 4, bf16, rank 16. Its variants: ``lora train eager``, ``lora train gc batch 1``
  (gradient checkpointing at batch 1; target: peak GPU memory <= 16 GiB), the ``bare loop``
  and ``diffusers+peft``, the per-step work of diffusers' ``train_dreambooth_lora_sdxl.py``
  (VAE and both text encoders every step, ``add_time_ids``, no caching; target: lora train
  >= 2x).
* flux (issue 25): a Flux.1-dev-architecture diffusers folder (12B transformer, T5-XXL,
  CLIP-L and the 16-channel VAE from the bundled configs,
  ``lora_kernel.training.demo_flux.FLUX_CONFIGS``, random weights built on the device; the
  demo tokenizers) and 8 demo-style 1024 px images: batch 1, bf16, rank 16 on
  to_q,to_k,to_v,to_out.0. Its variants: ``lora train`` (bf16 frozen weights, an 80 GB
  card), ``lora train nf4 gc`` (the transformer in NF4 through bitsandbytes, gradient
  checkpointing; target: peak GPU memory <= 22 GiB, a 24 GB card) and ``diffusers+peft``,
  the per-step work of diffusers' ``train_dreambooth_lora_flux.py`` (VAE, CLIP and T5 every
  step, packed latents, guidance, no caching; target: lora train >= 1.5x).

Variants, each in its own child process (so the peak memory is that variant's), with the
same model, data, batch, sequence length / resolution, LoRA rank and targets, precision and
learning rate:

* ``lora train eager``    -- the real entry point (``load_config`` + ``prepare_output_dir`` +
  ``lora_kernel.training.train.train``, what ``lora train --config ... -q --no-samples``
  runs) with ``compile: false``;
* ``lora train compiled`` -- the same with ``compile: true``;
* ``lora train fp32 weights`` -- image only: eager, with the frozen weights kept in float32
  under the same autocast (the loop before issue 22, which loads them in the training
  precision): the gain of half-precision frozen weights;
* ``bare loop``           -- the ceiling: the model + peft LoRA, forward / backward / clip /
  (fused on CUDA) AdamW step on random inputs (image: random latents and text states; text:
  random token ids), nothing else;
* ``Trainer+peft``        -- text only: ``transformers.Trainer`` with a peft LoRA model on
  the very sequences ``lora train`` trains on (its defaults otherwise: fused AdamW);
* issue 23, text only: ``lora train nf4`` (``quantization: nf4``: bitsandbytes 4-bit
  NormalFloat, double quantization, bf16 compute), ``Trainer+peft bf16 weights`` (the frozen
  model loaded in bf16, as LLaMA-Factory does) and ``Trainer+peft nf4`` (``BitsAndBytesConfig``
  + ``prepare_model_for_kbit_training``, the peft QLoRA recipe). Targets (GPU run): lora train
  nf4 >= 1.3x Trainer+peft nf4 tokens/s, and its peak memory <= 40% of lora train eager's
  (bf16 on the GPU).

Each variant runs ``--warmup`` steps (the first includes any compilation; reported
separately) and then ``--steps`` measured steps: steady steps/s = measured steps / their
wall time. Images/s = steps/s x batch; tokens/s = steps/s x batch x sequence length. MFU
(issue 13's formulas, bf16 dense peak from :data:`PEAK_FLOPS` by GPU name):

* image: steps/s x batch x 3 x UNet forward FLOPs per image (counted with
  ``torch.utils.flop_counter`` on the meta device, without LoRA) / peak,
* text: 6 x parameters (without LoRA) x tokens/s / peak;

"n/a" on CPU or an unknown GPU (``--peak-tflops`` sets one). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` of the child, on CPU the child's max RSS.

``--tiny`` (automatic without CUDA) uses the demo's tiny SD, SDXL and Llama, 8 images / 16
sequences, small batches, 1 warm-up + 4 measured steps, fp32 (what CI runs: well under a
minute on 2 CPU cores, most of it compiling the tiny UNet). On CPU it runs one torch thread
per child (see ``--threads``) and compiles with the ``eager`` backend, dynamo graph capture
only (``aot_eager`` took ~20 s more for the tiny UNet on a loaded 2-core machine,
inductor's C++ codegen minutes; ``--compile-backend`` overrides it). Its numbers say that
every path works, not how fast anything is.

    .venv/bin/python bench/gpu_train.py                  # one GPU (sized for < 8 min on an
                                                         # H100/H200; not yet run on one)
    .venv/bin/python bench/gpu_train.py --tiny           # CPU smoke run (under a minute)
    .venv/bin/python bench/gpu_train.py --write-docs     # and update docs/benchmarks.md

``--write-docs`` rewrites only this benchmark's section of ``docs/benchmarks.md``: a real GPU
run (CUDA, not ``--tiny``) replaces the "GPU results" block, any other run only the
"tiny smoke run" block, so a CPU run can never overwrite GPU numbers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## GPU training benchmark (bench/gpu_train.py)"
GPU_BLOCK = ("<!-- gpu_train.py: gpu results start -->", "<!-- gpu_train.py: gpu results end -->")
TINY_BLOCK = ("<!-- gpu_train.py: tiny results start -->",
              "<!-- gpu_train.py: tiny results end -->")

# Dense bf16 peak FLOP/s by GPU name (first substring match wins; no sparsity).
PEAK_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))

# Full size (the default on CUDA) and --tiny.
SIZES = {
    "gpu": {
        "image": {"resolution": 512, "batch": 8, "rank": 16, "images": 32},
        "text": {"seq": 512, "batch": 8, "rank": 16, "records": 64,
                 "llama": {"hidden_size": 2048, "intermediate_size": 5632,
                           "num_hidden_layers": 16, "num_attention_heads": 16,
                           "num_key_value_heads": 16, "vocab_size": 32000}},
        "sdxl": {"resolution": 1024, "batch": 4, "rank": 16, "images": 16},
        "flux": {"resolution": 1024, "batch": 1, "rank": 16, "images": 8},
        "warmup": 5, "steps": 30, "precision": "bf16", "timeout": 420,
    },
    "tiny": {
        "image": {"resolution": 64, "batch": 4, "rank": 8, "images": 8},  # 64: the demo images
        "text": {"seq": 64, "batch": 8, "rank": 8, "records": 16, "llama": None},
        "sdxl": {"resolution": 64, "batch": 4, "rank": 8, "images": 8},  # the tiny SDXL's 64 px
        "flux": {"resolution": 64, "batch": 1, "rank": 8, "images": 8},  # the tiny Flux's
        "warmup": 1, "steps": 4, "precision": "no", "timeout": 240,
    },
}
IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2  # lora train's default, used by every variant
SEED = 42
PRELOAD = [  # imported once by the fork server, so that each variant's child starts at once
    "torch", "numpy", "PIL.Image", "safetensors.torch", "peft",
    "diffusers", "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl", "diffusers.optimization",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "transformers", "transformers.models.llama.modeling_llama",
    "transformers.models.clip.modeling_clip", "transformers.trainer",
    "torch.utils.tensorboard", "lora_kernel.training.train", "lora_kernel.training.loop",
    "lora_kernel.training.image", "lora_kernel.training.text", "lora_kernel.training.models",
    "lora_kernel.training.demo_assets",
]
IMAGE_VARIANTS = ("lora train eager", "lora train compiled", "lora train fp32 weights",
                  "bare loop", "diffusers+peft")
TEXT_VARIANTS = ("lora train eager", "lora train compiled", "bare loop", "Trainer+peft",
                 "lora train nf4", "Trainer+peft bf16 weights", "Trainer+peft nf4")
NF4 = {"quantization": "nf4"}  # issue 23: QLoRA rows (bitsandbytes; CPU kernels in --tiny)
SDXL_VARIANTS = ("lora train eager", "lora train gc batch 1", "bare loop", "diffusers+peft")
# The 16 GB-card configuration of issue 22: gradient checkpointing at batch 1.
GC_BATCH_1 = {"gradient_checkpointing": True, "batch_size": 1}
FLUX_VARIANTS = ("lora train", "lora train nf4 gc", "diffusers+peft")
# The 24 GB-card configuration of issue 25: the frozen transformer in NF4, checkpointing.
NF4_GC = {"quantization": "nf4", "gradient_checkpointing": True}
VARIANTS = {"image": IMAGE_VARIANTS, "text": TEXT_VARIANTS, "sdxl": SDXL_VARIANTS,
            "flux": FLUX_VARIANTS}
MODEL_DIRS = {"image": "sd", "text": "llama", "sdxl": "sdxl", "flux": "flux"}


# -- helpers shared by the children ----------------------------------------------------------
def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device, precision: str):
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device) -> dict:
    import resource

    import torch
    if device.type == "cuda":
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_mem_kind": "GPU max_memory_allocated"}
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_mem_kind": "max RSS", "torch_threads": torch.get_num_threads()}


def _timings(first_step_s: float, ends: list[float], warmup: int) -> dict:
    """``ends``: perf_counter at the end of each step (1..N); steady = steps after warm-up."""
    measured = len(ends) - warmup
    span = ends[-1] - ends[warmup - 1]
    return {"steps_total": len(ends), "warmup_steps": warmup, "measured_steps": measured,
            "first_step_s": first_step_s, "warmup_s": first_step_s + ends[warmup - 1] - ends[0],
            "steady_s": span, "steps_per_s": measured / span if span > 0 else float("nan")}


def _timed_loop(module, device, warmup: int, steps: int, loss_fn) -> dict:
    """The bare training step every baseline shares: ``loss_fn()`` (forward), backward,
    gradient clipping, AdamW (fused on CUDA) over ``module``'s trainable parameters, and a
    loss read-back per step (a sync, as lora train's loss logging); timed per step."""
    import torch
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                            **({"fused": True} if device.type == "cuda" else {}))
    ends: list[float] = []
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup + steps):
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
    out = _timings(ends[0] - t0, ends, warmup)
    out.update(_peak_memory(device))
    return out


# -- children ------------------------------------------------------------------------------
def child_probe(spec: dict) -> dict:
    """CUDA or not, the device's name and the library versions."""
    from importlib.metadata import version

    import torch
    cuda = torch.cuda.is_available()
    out = {"cuda": cuda, "device_name": torch.cuda.get_device_name(0) if cuda else
           f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "cuda_count": torch.cuda.device_count() if cuda else 0}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = "missing"
    return out


def _long_text_records(n: int) -> list[dict]:
    """``n`` plain-text records, each the demo's ``plain_records`` sentences (rotated by the
    record's index) repeated: deterministic, every word a known token of the demo tokenizer."""
    from lora_kernel.training.demo_assets import plain_records
    sentences = [r["text"] for r in plain_records()]
    out = []
    for i in range(n):
        k = i % len(sentences)
        rotated = sentences[k:] + sentences[:k]
        out.append({"text": " ".join(rotated * 3)})
    return out


def _tokenizer_corpus(records: list[dict]) -> list[str]:
    from lora_kernel.training.demo_assets import plain_records, text_records
    return ([r["prompt"] + r["response"] for r in text_records()]
            + [r["text"] for r in plain_records()] + [records[0]["text"]])


def _write_lm_tokenizer(folder: Path, corpus) -> None:
    """The demo LM tokenizer, saved as ``write_tiny_llama`` saves it."""
    from lora_kernel.training.demo_assets import _normalise_json_files, build_lm_tokenizer
    tok = build_lm_tokenizer(corpus)
    tok.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _normalise_json_files(folder)


def _write_llama(folder: Path, arch: dict, corpus, seed: int) -> None:
    """A Llama causal LM of ``arch`` with random weights (initialised on the GPU when there
    is one, saved as bf16 safetensors) and the demo tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_kernel.training.demo_assets import build_lm_tokenizer
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = build_lm_tokenizer(corpus)
    config = LlamaConfig(**arch, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    with torch.device(_device()):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    del model
    _write_lm_tokenizer(folder, corpus)


def _save_random(folder: Path, seed: int, builds) -> None:
    """Build each ``(name, build)`` component with random weights (seeded ``seed + k``,
    initialised on the GPU when there is one) and save it as bf16 safetensors in
    ``folder/name``."""
    import torch
    device = _device()
    for k, (name, build) in enumerate(builds):
        torch.manual_seed(seed + k)
        with torch.device(device):
            model = build()
        model.to(torch.bfloat16).save_pretrained(folder / name, safe_serialization=True)
        del model


def _write_sd15(folder: Path, seed: int) -> None:
    """An SD1.5-architecture diffusers folder with random weights: UNet, VAE and text
    encoder from the bundled SD1.x configs (the text encoder's vocabulary sized to the demo's
    CLIP tokenizer), the SD1.x scheduler, the demo tokenizer; weights saved as bf16."""
    import shutil

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_kernel.training.demo_assets import (
        SD15_CONFIGS,
        _normalise_json_files,
        _write_json,
        clip_vocab_and_merges,
        write_clip_tokenizer,
    )

    def plain(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab, _ = clip_vocab_and_merges()
    te_cfg = plain(SD15_CONFIGS["text_encoder/config.json"])
    te_cfg.pop("model_type", None)
    te_cfg.update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                  eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    _save_random(folder, seed, (
        ("unet", lambda: UNet2DConditionModel(**plain(SD15_CONFIGS["unet/config.json"]))),
        ("vae", lambda: AutoencoderKL(**plain(SD15_CONFIGS["vae/config.json"]))),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**te_cfg)))))
    PNDMScheduler.from_config(
        plain(SD15_CONFIGS["scheduler/scheduler_config.json"])).save_pretrained(
        folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    index = dict(SD15_CONFIGS["model_index.json"])
    _write_json(folder / "model_index.json", index)
    _normalise_json_files(folder)


def _write_image_dataset(folder: Path, n: int, size: int) -> None:
    """``n`` demo-style images (``draw_image``) scaled to ``size`` px, with metadata.csv."""
    import csv
    import io
    import shutil

    from PIL import Image

    from lora_kernel.training.demo_assets import COLORS, SHAPES, STYLE, draw_image
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    combos = [(s, c) for s in SHAPES for c in COLORS]
    rows = []
    for i in range(n):
        shape, color = combos[i % len(combos)]
        img = draw_image(color, shape, i)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        name = f"{i:03d}_{color}_{shape}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False, compress_level=1)
        (folder / name).write_bytes(buf.getvalue())
        rows.append((name, f"a {color} {shape} in {STYLE}"))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["file_name", "text"])
    w.writerows(rows)
    (folder / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")


def _added_cond(unet, batch: int, device=None) -> dict:
    """Random SDXL ``added_cond_kwargs`` (pooled text embeddings, time ids) for ``unet``;
    {} for a UNet without ``text_time`` conditioning."""
    import torch
    if unet.config.addition_embed_type != "text_time":
        return {}
    pooled = (unet.config.projection_class_embeddings_input_dim
              - 6 * unet.config.addition_time_embed_dim)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, device=device),
                                  "time_ids": torch.randn(batch, 6, device=device)}}


def _unet_forward_flops(unet_config: dict, latent: int) -> int:
    """FLOPs of one UNet forward for one image (no LoRA), counted on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        x = torch.randn(1, unet.config.in_channels, latent, latent)
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, torch.tensor([500]), hidden, **_added_cond(unet, 1))
    return int(counter.get_total_flops())


def _write_sdxl(folder: Path, seed: int) -> None:
    """An SDXL-base-architecture diffusers folder with random weights (initialised on the GPU
    when there is one, saved as bf16): UNet, VAE and both text encoders from the bundled SDXL
    configs (vocabularies sized to the demo's CLIP tokenizer), Euler, the demo tokenizers."""
    import shutil

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_kernel.training.demo_assets import (
        _normalise_json_files,
        _write_json,
        clip_vocab_and_merges,
        write_clip_tokenizer,
    )
    from lora_kernel.training.demo_sdxl import SDXL_CONFIGS

    def plain(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items()
                if not k.startswith("_") and k not in ("architectures", "model_type")}

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab, _ = clip_vocab_and_merges()
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
               eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    te1 = {**plain(SDXL_CONFIGS["text_encoder/config.json"]), **ids}
    te2 = {**plain(SDXL_CONFIGS["text_encoder_2/config.json"]), **ids}
    _save_random(folder, seed, (
        ("unet", lambda: UNet2DConditionModel(**plain(SDXL_CONFIGS["unet/config.json"]))),
        ("vae", lambda: AutoencoderKL(**plain(SDXL_CONFIGS["vae/config.json"]))),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**te1))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2)))))
    EulerDiscreteScheduler.from_config(
        plain(SDXL_CONFIGS["scheduler/scheduler_config.json"])).save_pretrained(
        folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    _write_json(folder / "model_index.json", dict(SDXL_CONFIGS["model_index.json"]))
    _normalise_json_files(folder)


def _write_flux(folder: Path, seed: int) -> None:
    """A Flux.1-dev-architecture diffusers folder with random weights (initialised on the GPU
    when there is one, saved as bf16): transformer, VAE, CLIP-L and T5-XXL from the bundled
    Flux configs (CLIP's vocabulary sized to the demo's CLIP tokenizer), the flow-matching
    scheduler, the demo tokenizers (the demo T5 vocabulary: ids well inside T5's)."""
    import shutil

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_kernel.training.demo_assets import (
        CLIP_WORDS,
        _normalise_json_files,
        _write_json,
        clip_vocab_and_merges,
        write_clip_tokenizer,
    )
    from lora_kernel.training.demo_flux import FLUX_CONFIGS, T5_MAX_LENGTH, write_t5_tokenizer

    def plain(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items()
                if not k.startswith("_") and k not in ("architectures", "model_type")}

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab, _ = clip_vocab_and_merges()
    clip = {**plain(FLUX_CONFIGS["text_encoder/config.json"]), "vocab_size": len(vocab),
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}
    t5 = plain(FLUX_CONFIGS["text_encoder_2/config.json"])
    _save_random(folder, seed, (
        ("transformer", lambda: FluxTransformer2DModel(
            **plain(FLUX_CONFIGS["transformer/config.json"]))),
        ("vae", lambda: AutoencoderKL(**plain(FLUX_CONFIGS["vae/config.json"]))),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**clip))),
        ("text_encoder_2", lambda: T5EncoderModel(T5Config(**t5)))))
    FlowMatchEulerDiscreteScheduler.from_config(
        plain(FLUX_CONFIGS["scheduler/scheduler_config.json"])).save_pretrained(
        folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2", CLIP_WORDS, max_length=T5_MAX_LENGTH)
    _write_json(folder / "model_index.json", dict(FLUX_CONFIGS["model_index.json"]))
    _normalise_json_files(folder)


def _image_config(model: Path, data: Path, sizes: dict, size: dict, out: Path) -> dict:
    """The ``lora train`` config of an image benchmark task."""
    return {"task": "image", "base_model": str(model), "train_data_dir": str(data),
            "metadata_path": str(data / "metadata.csv"), "resolution": size["resolution"],
            "lora_rank": size["rank"], "lora_alpha": size["rank"],
            "target_modules": IMAGE_TARGETS, "batch_size": size["batch"],
            "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
            "mixed_precision": sizes["precision"], "save_steps": 0,
            "cache_latents": True, "sample_prompts": [], "seed": SEED, "output_dir": str(out)}


def child_build(spec: dict) -> dict:
    """Build the models, datasets and both configs under ``<home>/gpu_train``."""
    import yaml

    from lora_kernel.training.demo_assets import IMAGE_SIZE, write_tiny_sd
    root = Path(spec["home"]) / "gpu_train"
    sizes, tiny = spec["sizes"], spec["tiny"]
    img, txt = sizes["image"], sizes["text"]
    t0 = time.perf_counter()
    out: dict = {"root": str(root)}
    if "image" in spec["tasks"]:
        model, data = root / "models" / "sd", root / "datasets" / "image"
        if tiny:
            write_tiny_sd(model, seed=0)
            _write_image_dataset(data, img["images"], IMAGE_SIZE)  # the demo's 64 px
        else:
            _write_sd15(model, seed=0)
            _write_image_dataset(data, img["images"], img["resolution"])
        unet_cfg = json.loads((model / "unet" / "config.json").read_text())
        vae_cfg = json.loads((model / "vae" / "config.json").read_text())
        latent = img["resolution"] // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        out["unet_forward_flops"] = _unet_forward_flops(unet_cfg, latent)
        out["latent"] = latent
        config = _image_config(model, data, sizes, img, root / "output" / "image")
        out["image_config"] = str(root / "image_lora.yaml")
        Path(out["image_config"]).write_text(yaml.safe_dump(config, sort_keys=False))
    if "sdxl" in spec["tasks"]:
        xl = sizes["sdxl"]
        model, data = root / "models" / "sdxl", root / "datasets" / "sdxl"
        if tiny:
            from lora_kernel.training.demo_assets import write_tiny_sdxl
            # speed rows: the weights' values do not matter, so no pre-training (~2 min)
            write_tiny_sdxl(model, seed=0, pretrain=False)
            _write_image_dataset(data, xl["images"], IMAGE_SIZE)
        else:
            _write_sdxl(model, seed=0)
            _write_image_dataset(data, xl["images"], xl["resolution"])
        unet_cfg = json.loads((model / "unet" / "config.json").read_text())
        vae_cfg = json.loads((model / "vae" / "config.json").read_text())
        out["sdxl_latent"] = xl["resolution"] // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        out["sdxl_unet_forward_flops"] = _unet_forward_flops(unet_cfg, out["sdxl_latent"])
        config = _image_config(model, data, sizes, xl, root / "output" / "sdxl")
        out["sdxl_config"] = str(root / "sdxl_lora.yaml")
        Path(out["sdxl_config"]).write_text(yaml.safe_dump(config, sort_keys=False))
    if "flux" in spec["tasks"]:
        fl = sizes["flux"]
        model, data = root / "models" / "flux", root / "datasets" / "flux"
        if tiny:
            from lora_kernel.training.demo_assets import (
                CLIP_WORDS,
                VAE_CONFIG,
                clip_vocab_and_merges,
                write_clip_tokenizer,
            )
            from lora_kernel.training.demo_flux import write_tiny_flux
            write_tiny_flux(model, seed=0, vocab=clip_vocab_and_merges()[0], words=CLIP_WORDS,
                            vae_config=VAE_CONFIG, clip_tokenizer=write_clip_tokenizer)
            _write_image_dataset(data, fl["images"], IMAGE_SIZE)
        else:
            _write_flux(model, seed=0)
            _write_image_dataset(data, fl["images"], fl["resolution"])
        config = _image_config(model, data, sizes, fl, root / "output" / "flux")
        out["flux_config"] = str(root / "flux_lora.yaml")
        Path(out["flux_config"]).write_text(yaml.safe_dump(config, sort_keys=False))
    if "text" in spec["tasks"]:
        model, data = root / "models" / "llama", root / "datasets" / "text"
        records = _long_text_records(txt["records"])
        corpus = _tokenizer_corpus(records)
        if tiny:
            from lora_kernel.training.demo_assets import write_tiny_llama
            write_tiny_llama(model, seed=0, corpus=corpus)
        else:
            _write_llama(model, txt["llama"], corpus, seed=3)
        data.mkdir(parents=True, exist_ok=True)
        (data / "train.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
        from transformers import AutoConfig, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        shortest = min(len(tok(r["text"]).input_ids) for r in records)
        if shortest < txt["seq"]:
            raise RuntimeError(f"text records too short: {shortest} < {txt['seq']} tokens")
        arch = AutoConfig.from_pretrained(str(model), local_files_only=True)
        out["llama_params"] = _llama_params(arch)
        config = {"task": "text", "base_model": str(model),
                  "metadata_path": str(data / "train.jsonl"), "text_column": "text",
                  "max_seq_length": txt["seq"], "packing": False,
                  "lora_rank": txt["rank"], "lora_alpha": 2 * txt["rank"],
                  "target_modules": TEXT_TARGETS, "batch_size": txt["batch"],
                  "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                  "mixed_precision": sizes["precision"], "save_steps": 0,
                  "sample_prompts": [], "seed": SEED,
                  "output_dir": str(root / "output" / "text")}
        out["text_config"] = str(root / "text_lora.yaml")
        Path(out["text_config"]).write_text(yaml.safe_dump(config, sort_keys=False))
    out["build_s"] = time.perf_counter() - t0
    return out


def _llama_params(config) -> int:
    """Parameters of the Llama (without LoRA), counted on the meta device."""
    import torch
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def child_lora_train(spec: dict) -> dict:
    """``lora train`` through its real entry point, timed per step (``on_step``), the first
    step from the loop's own progress records (``$LORA_PROGRESS_FILE``: elapsed since the
    loop started, compilation included)."""
    from lora_kernel.training.checks import load_config
    from lora_kernel.training.loop import COMPILE_BACKEND_ENV, PROGRESS_ENV
    from lora_kernel.training.train import prepare_output_dir, train
    out_dir = Path(spec["out"])
    progress = out_dir.with_name(out_dir.name + ".progress.jsonl")
    progress.unlink(missing_ok=True)  # a --home used again: this run's records only
    os.environ[PROGRESS_ENV] = str(progress)
    if spec.get("compile_backend"):
        os.environ[COMPILE_BACKEND_ENV] = spec["compile_backend"]
    if spec.get("fp32_weights"):  # the loop before issue 22: autocast over float32 weights
        from lora_kernel.training import precision
        from lora_kernel.training import train as train_module
        precision.weight_dtype_name = train_module.weight_dtype_name = (
            lambda cfg: "float32")
    overrides = {"compile": spec["compile"], "output_dir": str(out_dir),
                 "max_train_steps": spec["warmup"] + spec["steps"],
                 **spec.get("overrides", {})}
    cfg = load_config(spec["config"], overrides)
    prepare_output_dir(cfg, overwrite=True)
    ends: list[float] = []
    res = train(cfg, progress=False, home=spec["home"], samples=False, log=lambda m: None,
                on_step=lambda step, loss, lr: ends.append(time.perf_counter()))
    records = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    first = next(r["elapsed"] for r in records if r.get("event") == "step")
    if not ends:  # num_processes > 1: the ranks ran the loop; rank 0's records time it
        ends = [float(r["elapsed"]) for r in records if r.get("event") == "step"]
    device = _device()
    out = _timings(float(first), ends, spec["warmup"])
    if spec.get("items_batch"):  # the global batch of a data-parallel run (images/s)
        out["batch"] = spec["items_batch"]
    out.update(_peak_memory(device), loss_first=res.losses[0], loss_last=res.losses[-1],
               loop_seconds=res.seconds, cache_hit=res.cache_hit)
    return out


def child_bare_image(spec: dict) -> dict:
    """The ceiling: SD UNet + peft LoRA, forward/backward/clip/AdamW on random latents."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    device = _device()
    model = Path(spec["model"])
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True,
                                                use_safetensors=True, torch_dtype=torch.float32)
    unet.to(device, torch.float32).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"],
                                init_lora_weights="gaussian", target_modules=IMAGE_TARGETS))
    unet.train()
    b, lat = spec["batch"], spec["latent"]
    hidden_dim = unet.config.cross_attention_dim

    def loss_fn():
        latents = torch.randn(b, unet.config.in_channels, lat, lat, device=device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        hidden = torch.randn(b, 77, hidden_dim, device=device)
        with _autocast(device, spec["precision"]):
            pred = unet(noisy, t, hidden, **_added_cond(unet, b, device)).sample
        return F.mse_loss(pred.float(), noise)
    return _timed_loop(unet, device, spec["warmup"], spec["steps"], loss_fn)


def diffusers_peft_loop(config: str, model: str, *, batch: int, warmup: int, steps: int,
                        precision: str = "no", rank: int | None = None) -> dict:
    """The plain baseline: what diffusers' ``train_text_to_image_lora.py`` does per step
    (minus accelerate) on the config's dataset — VAE encode and text encoder every step, no
    caching, UNet + peft LoRA, clipping, AdamW. Also ``bench/train_throughput.py``'s."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.image import load_examples
    device = _device()
    cfg = load_config(config)
    root = Path(model)
    torch.manual_seed(SEED)
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw)
    for m in (unet, vae, te):
        m.to(device, torch.float32).requires_grad_(False)
    r = rank or cfg.lora_rank
    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                                target_modules=IMAGE_TARGETS))
    unet.train()
    examples = load_examples(cfg)
    pixels = torch.stack([e.pixels for e in examples])
    ids = tok([e.caption for e in examples], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    def loss_fn():
        idx = torch.randint(0, len(examples), (batch,))
        with torch.no_grad(), _autocast(device, precision):
            latents = vae.encode(pixels[idx].to(device)).latent_dist.sample().float() \
                * vae.config.scaling_factor
            hidden = te(ids[idx].to(device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        with _autocast(device, precision):
            pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
        return F.mse_loss(pred.float(), noise)
    return _timed_loop(unet, device, warmup, steps, loss_fn)


def child_diffusers_image(spec: dict) -> dict:
    return diffusers_peft_loop(spec["config"], spec["model"], batch=spec["batch"],
                               warmup=spec["warmup"], steps=spec["steps"],
                               precision=spec["precision"], rank=spec["rank"])


def child_diffusers_sdxl(spec: dict) -> dict:
    """The plain SDXL baseline: what diffusers' ``train_dreambooth_lora_sdxl.py`` does per
    step (minus accelerate) on the config's dataset: the VAE (float32: SDXL's overflows in
    fp16) encodes, both text encoders encode (penultimate hidden states, pooled output of the
    second), ``add_time_ids`` from each image's size and crop, UNet + peft LoRA; frozen
    weights in the training precision and LoRA weights in float32 (its
    ``cast_training_params``), clipping, AdamW. No caching."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.image import load_examples
    device = _device()
    cfg = load_config(spec["config"])
    root = Path(spec["model"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    torch.manual_seed(SEED)
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    tes = [CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
           CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw)]
    toks = [CLIPTokenizer.from_pretrained(root, subfolder=name, **kw)
            for name in ("tokenizer", "tokenizer_2")]
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw)
    vae.to(device, torch.float32).requires_grad_(False)
    for m in (unet, *tes):
        m.to(device, dtype).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"],
                                init_lora_weights="gaussian", target_modules=IMAGE_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    examples = load_examples(cfg)
    pixels = torch.stack([e.pixels for e in examples])
    ids = [t([e.caption for e in examples], padding="max_length", max_length=t.model_max_length,
             truncation=True, return_tensors="pt").input_ids for t in toks]
    time_ids = torch.tensor([[e.original_size[1], e.original_size[0], *e.crop_top_left,
                              e.bucket[1], e.bucket[0]] for e in examples], dtype=torch.float32)
    b = spec["batch"]

    def loss_fn():
        idx = torch.randint(0, len(examples), (b,))
        with torch.no_grad():
            latents = vae.encode(pixels[idx].to(device)).latent_dist.sample() \
                * vae.config.scaling_factor
            hidden, pooled = [], None
            for te, part in zip(tes, ids, strict=True):
                out = te(part[idx].to(device), output_hidden_states=True)
                pooled = out[0]  # the last encoder's projected pooled output
                hidden.append(out.hidden_states[-2])
            hidden = torch.cat(hidden, dim=-1)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
        cond = {"text_embeds": pooled, "time_ids": time_ids[idx].to(device)}
        with _autocast(device, spec["precision"]):
            pred = unet(sched.add_noise(latents, noise, t), t, hidden,
                        added_cond_kwargs=cond).sample
        return F.mse_loss(pred.float(), noise)
    return _timed_loop(unet, device, spec["warmup"], spec["steps"], loss_fn)


def child_diffusers_flux(spec: dict) -> dict:
    """The plain Flux baseline: what diffusers' ``train_dreambooth_lora_flux.py`` does per
    step (minus accelerate) on the config's dataset, with per-image captions: the VAE
    encodes (``(z - shift) x scale``), CLIP-L (pooled) and T5 (hidden states) encode, the
    noisy latents are packed with ``FluxPipeline._pack_latents`` and image ids, Flux-dev's
    guidance is passed, the prediction is unpacked and compared with ``noise - latents``;
    frozen weights in the training precision, LoRA weights float32, clipping, AdamW. No
    caching."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.image import load_examples
    device = _device()
    cfg = load_config(spec["config"])
    root = Path(spec["model"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    torch.manual_seed(SEED)
    kw = {"local_files_only": True}
    transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer",
                                                         torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    clip = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw)
    t5 = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype, **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    tok2 = T5Tokenizer.from_pretrained(str(root / "tokenizer_2"), **kw)
    for m in (transformer, vae, clip, t5):
        m.to(device).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"],
                                       init_lora_weights="gaussian",
                                       target_modules=IMAGE_TARGETS))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    transformer.train()
    examples = load_examples(cfg)
    pixels = torch.stack([e.pixels for e in examples])
    captions = [e.caption for e in examples]
    ids = tok(captions, padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    ids2 = tok2(captions, padding="max_length", max_length=min(512, tok2.model_max_length),
                truncation=True, return_tensors="pt").input_ids
    b = spec["batch"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def loss_fn():
        idx = torch.randint(0, len(examples), (b,))
        with torch.no_grad():
            latents = vae.encode(pixels[idx].to(device, dtype)).latent_dist.sample()
            latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()
            pooled = clip(ids[idx].to(device), output_hidden_states=False).pooler_output
            hidden = t5(ids2[idx].to(device), output_hidden_states=False)[0]
        _, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigma = torch.rand(b, device=device)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
        guidance = (torch.full((b,), 3.5, device=device)
                    if transformer.config.guidance_embeds else None)
        with _autocast(device, spec["precision"]):
            pred = transformer(hidden_states=packed, timestep=sigma, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=hidden,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)
        return F.mse_loss(pred.float(), noise - latents)
    return _timed_loop(transformer, device, spec["warmup"], spec["steps"], loss_fn)


def _peft_llama(spec: dict, device):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(SEED)
    weights = spec.get("weights", "fp32")
    if weights == "nf4":  # QLoRA as the peft/bitsandbytes docs set it up
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            spec["model"], local_files_only=True, use_safetensors=True,
            quantization_config=quant, dtype=torch.bfloat16, device_map={"": str(device)})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(spec["model"], local_files_only=True,
                                                     use_safetensors=True, dtype=dtype)
        model.to(device, dtype)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec["rank"], lora_alpha=2 * spec["rank"],
                      target_modules=TEXT_TARGETS, lora_dropout=0.0, bias="none")
    return get_peft_model(model, lora)


def child_bare_text(spec: dict) -> dict:
    """The ceiling: Llama + peft LoRA, forward/backward/clip/AdamW on random token ids."""
    import torch
    device = _device()
    model = _peft_llama(spec, device)
    model.train()
    b, seq = spec["batch"], spec["seq"]
    vocab = model.config.vocab_size

    def loss_fn():
        ids = torch.randint(0, vocab, (b, seq), device=device)
        with _autocast(device, spec["precision"]):
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    return _timed_loop(model, device, spec["warmup"], spec["steps"], loss_fn)


def child_trainer(spec: dict) -> dict:
    """Hugging Face ``transformers.Trainer`` + peft on the sequences ``lora train`` trains on
    (our ``encode_records``/``build_sequences`` of the same config): same model, batch,
    sequence length, LoRA, learning rate, weight decay, clipping and precision; offline
    (``report_to="none"``, nothing saved, no hub)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lora_kernel.training.checks import load_config
    from lora_kernel.training.text import build_sequences, encode_records
    device = _device()
    cfg = load_config(spec["config"])
    tok = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = build_sequences(cfg, encode_records(cfg, tok), pad)
    if any(len(ids) != spec["seq"] for ids, _ in seqs):
        raise RuntimeError("every sequence must hold exactly max_seq_length tokens")
    dataset = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
               for ids, labels in seqs]
    model = _peft_llama(spec, device)
    ends: list[float] = []
    begin: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not begin:
                _sync(device)
                begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"],
        max_steps=spec["warmup"] + spec["steps"], learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, lr_scheduler_type="constant", max_grad_norm=1.0,
        bf16=spec["precision"] == "bf16", use_cpu=device.type != "cuda",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=SEED)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()])
    trainer.train()
    out = _timings(ends[0] - begin[0], ends, spec["warmup"])
    out.update(_peak_memory(device), optim=str(getattr(args.optim, "value", args.optim)))
    return out


CHILDREN = {"probe": child_probe, "build": child_build, "lora_train": child_lora_train,
            "bare_image": child_bare_image, "bare_text": child_bare_text,
            "trainer": child_trainer, "diffusers_image": child_diffusers_image,
            "diffusers_sdxl": child_diffusers_sdxl, "diffusers_flux": child_diffusers_flux}


def _child_main(kind: str, spec: dict, conn, log_path: str) -> None:
    """A variant's process: its output goes to ``log_path``; its result (or error) to
    ``conn``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        if spec.get("threads"):
            import torch
            torch.set_num_threads(spec["threads"])
        result = {"ok": True, "batch": spec.get("batch"), **CHILDREN[kind](spec)}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(result)
    conn.close()


# -- the parent ----------------------------------------------------------------------------
class Runner:
    """Starts each child from a fork server that imported torch & co. once (a fresh
    interpreter per variant would cost ~7 s of imports each on a small CPU); every child is
    its own process, so its peak memory is its own."""

    def __init__(self, logs: Path, timeout: float):
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.logs, self.timeout = logs, timeout

    def run(self, kind: str, name: str, spec: dict) -> dict:
        log = self.logs / f"{name.replace(' ', '_').replace('+', '_')}.log"
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child_main, args=(kind, spec, send, str(log)))
        t0 = time.perf_counter()
        proc.start()
        send.close()
        result = None
        if recv.poll(self.timeout):
            try:
                result = recv.recv()
            except EOFError:
                result = None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if result is None:
            why = (f"timed out after {self.timeout:.0f}s" if proc.exitcode in (None, -9)
                   else f"exit code {proc.exitcode}")
            result = {"ok": False, "error": f"child died ({why})"}
        result["wall_s"] = time.perf_counter() - t0
        if not result["ok"]:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            print(f"  {name} FAILED: {result['error']}\n{tail}", file=sys.stderr)
        return result


def _peak_for(device_name: str, cuda: bool, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not cuda:
        return None
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def _derive(results: dict, built: dict, sizes: dict, peak: float | None) -> None:
    """Add images/s or tokens/s and MFU to each successful result."""
    for (task, _name), r in results.items():
        if not r.get("ok"):
            continue
        sps = r["steps_per_s"]
        if task == "flux":  # no FLOP count for the transformer: MFU n/a
            r["items_per_s"], r["items"] = sps * (r.get("batch") or sizes[task]["batch"]), \
                "images/s"
            r["mfu"] = None
            continue
        if task in ("image", "sdxl"):
            b = r.get("batch") or sizes[task]["batch"]
            r["items_per_s"], r["items"] = sps * b, "images/s"
            key = "unet_forward_flops" if task == "image" else "sdxl_unet_forward_flops"
            flops = sps * b * 3 * built[key]
        else:
            t = sizes["text"]["batch"] * sizes["text"]["seq"]
            r["items_per_s"], r["items"] = sps * t, "tokens/s"
            flops = 6 * built["llama_params"] * sps * t
        r["mfu"] = flops / peak if peak else None


def _fmt_mem(r: dict) -> str:
    if "peak_mem_bytes" not in r:
        return "-"
    return f"{r['peak_mem_bytes'] / 2**30:.2f} GiB"


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def table_lines(results: dict, markdown: bool) -> list[str]:
    head = ["task", "variant", "steps/s", "images/s or tokens/s", "MFU", "first step",
            "warm-up", "measured", "peak memory"]
    rows = []
    for (task, name), r in results.items():
        if not r.get("ok"):
            rows.append([task, name, "FAILED", r.get("error", "")[:40], "", "", "", "", ""])
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        rows.append([task, name, f"{r['steps_per_s']:.2f}",
                     f"{r['items_per_s']:,.1f} {r['items']}", mfu, f"{r['first_step_s']:.2f} s",
                     f"{_steps(r['warmup_steps'])}, {r['warmup_s']:.2f} s",
                     f"{_steps(r['measured_steps'])}, {r['steady_s']:.2f} s", _fmt_mem(r)])
    if markdown:
        return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    return ["  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))).rstrip()
            for x in [head, *rows]]


def ratio_lines(results: dict, device_name: str, tiny: bool) -> list[str]:
    def sps(task, name):
        r = results.get((task, name))
        return r["steps_per_s"] if r and r.get("ok") else None

    def ratio(label, a, b, target=None):
        if a is None or b is None:
            return f"{label}: n/a (a variant is missing or failed)"
        text = f"{label}: {a / b:.2f}x"
        if target is not None:
            text += f" (target >= {target}x: {'met' if a / b >= target else 'NOT met'})"
        return text

    out = []
    if (sdxl := sps("sdxl", "lora train eager")) is not None or ("sdxl", "bare loop") in results:
        plain = sps("sdxl", "diffusers+peft")
        out.append(ratio("ratio sdxl lora-train eager / bare loop", sdxl,
                         sps("sdxl", "bare loop")))
        out.append(ratio("ratio sdxl lora-train eager / diffusers+peft (dreambooth_lora_sdxl)",
                         sdxl, plain, target=None if tiny else 2.0)
                   + (" (target >= 2x applies to the GPU run only)" if tiny else ""))
        gc = results.get(("sdxl", "lora train gc batch 1"))
        if gc is None or not gc.get("ok"):
            out.append("target sdxl peak memory <= 16 GiB (gc, batch 1): n/a (no result)")
        elif tiny or not gc.get("peak_mem_kind", "").startswith("GPU"):
            out.append(f"target sdxl peak memory <= 16 GiB (gc, batch 1): n/a here "
                       f"({gc['peak_mem_bytes'] / 2**30:.2f} GiB {gc.get('peak_mem_kind')})")
        else:
            peak_gib = gc["peak_mem_bytes"] / 2**30
            out.append(f"target sdxl peak memory <= 16 GiB (gc, batch 1): {peak_gib:.2f} GiB: "
                       f"{'met' if peak_gib <= 16 else 'NOT met'}")
    if ("flux", "lora train") in results or ("flux", "diffusers+peft") in results:
        out.append(ratio("ratio flux lora-train / diffusers+peft (dreambooth_lora_flux)",
                         sps("flux", "lora train"), sps("flux", "diffusers+peft"),
                         target=None if tiny else 1.5)
                   + (" (target >= 1.5x applies to the GPU run only)" if tiny else ""))
        nf4 = results.get(("flux", "lora train nf4 gc"))
        if nf4 is None or not nf4.get("ok"):
            out.append("target flux nf4 peak memory <= 22 GiB (gc, batch 1): n/a (no result)")
        elif tiny or not nf4.get("peak_mem_kind", "").startswith("GPU"):
            out.append(f"target flux nf4 peak memory <= 22 GiB (gc, batch 1): n/a here "
                       f"({nf4['peak_mem_bytes'] / 2**30:.2f} GiB {nf4.get('peak_mem_kind')})")
        else:
            peak_gib = nf4["peak_mem_bytes"] / 2**30
            out.append(f"target flux nf4 peak memory <= 22 GiB (gc, batch 1): {peak_gib:.2f} "
                       f"GiB: {'met' if peak_gib <= 22 else 'NOT met'}")
    for task in ("image", "text"):
        eager, comp = sps(task, "lora train eager"), sps(task, "lora train compiled")
        if eager is None and comp is None and (task, "bare loop") not in results:
            continue
        bare = sps(task, "bare loop")
        out.append(ratio(f"ratio {task} lora-train compiled / eager", comp, eager))
        out.append(ratio(f"ratio {task} lora-train eager / bare loop", eager, bare))
        out.append(ratio(f"ratio {task} lora-train compiled / bare loop", comp, bare))
        if task == "text":
            hf = sps(task, "Trainer+peft")
            out.append(ratio("ratio text lora-train eager / Trainer+peft", eager, hf))
            out.append(ratio("ratio text lora-train compiled / Trainer+peft", comp, hf))
            best = max([x for x in (eager, comp) if x is not None], default=None)
            out.append(ratio("ratio text lora-train best / Trainer+peft", best, hf,
                             target=None if tiny else 1.3)
                       + (" (target >= 1.3x applies to the GPU run only)" if tiny else ""))
            out.append(ratio("ratio text lora-train eager / Trainer+peft bf16 weights", eager,
                             sps(task, "Trainer+peft bf16 weights")))
            out.append(ratio("ratio text lora-train nf4 / Trainer+peft nf4",
                             sps(task, "lora train nf4"), sps(task, "Trainer+peft nf4"),
                             target=None if tiny else 1.3)
                       + (" (target >= 1.3x applies to the GPU run only)" if tiny else ""))
            out.append(_nf4_memory_line(results, tiny))
        else:
            plain = sps(task, "diffusers+peft")
            out.append(ratio("ratio image lora-train eager / diffusers+peft", eager, plain))
            out.append(ratio("ratio image lora-train eager / fp32 weights (half-precision "
                             "frozen weights' gain)", eager, sps(task, "lora train fp32 weights")))
            out.append(ratio("ratio image lora-train compiled / diffusers+peft", comp, plain))
            best = max([x for x in (eager, comp) if x is not None], default=None)
            if best is None:
                out.append("target image lora train >= 12 steps/s on H200: n/a (no result)")
            elif tiny or "H200" not in device_name:
                out.append(f"target image lora train >= 12 steps/s on H200: n/a here "
                           f"(best {best:.2f} steps/s on {device_name}{', tiny' if tiny else ''})")
            else:
                out.append(f"target image lora train >= 12 steps/s on H200: best {best:.2f} "
                           f"steps/s: {'met' if best >= 12 else 'NOT met'}")
    return out


def _nf4_memory_line(results: dict, tiny: bool) -> str:
    """Issue 23's memory target: lora train's nf4 peak <= 40% of its bf16 peak (GPU run)."""
    nf4, half = results.get(("text", "lora train nf4")), results.get(("text", "lora train eager"))
    label = "target text nf4 peak memory <= 40% of bf16 (lora train)"
    if not (nf4 and half and nf4.get("ok") and half.get("ok")):
        return f"{label}: n/a (no result)"
    share = nf4["peak_mem_bytes"] / half["peak_mem_bytes"]
    if tiny or not nf4.get("peak_mem_kind", "").startswith("GPU"):
        return (f"{label}: n/a here ({share:.0%} of the eager run's "
                f"{nf4.get('peak_mem_kind')} peak; tiny runs are fp32 and host memory)")
    return f"{label}: {share:.0%}: {'met' if share <= 0.4 else 'NOT met'}"


def header_lines(probe: dict, sizes: dict, tiny: bool, args, built: dict) -> list[str]:
    img, txt = sizes["image"], sizes["text"]
    compile_backend = args.compile_backend or "inductor"
    lines = [f"device: {probe['device_name']}; torch {probe['torch']}, diffusers "
             f"{probe['diffusers']}, transformers {probe['transformers']}, peft {probe['peft']}, "
             f"accelerate {probe['accelerate']}, Python {probe['python']}; "
             f"{dt.date.today().isoformat()}"]
    mode = "tiny (demo models)" if tiny else "full size"
    threads = f"; {args.threads_used} CPU thread(s) per child" if args.threads_used else ""
    lines.append(f"mode: {mode}; precision {sizes['precision']}; {sizes['warmup']} warm-up + "
                 f"{sizes['steps']} measured steps per variant; compile backend "
                 f"{compile_backend}{threads}")
    if "unet_forward_flops" in built:
        lines.append(f"image: {'demo tiny SD' if tiny else 'SD1.5-architecture UNet'}, "
                     f"{img['resolution']} px (latent {built['latent']}), batch {img['batch']}, "
                     f"rank {img['rank']} on {','.join(IMAGE_TARGETS)}, {img['images']} images; "
                     f"UNet forward {built['unet_forward_flops'] / 1e9:,.4g} GFLOPs/image")
    if "sdxl_unet_forward_flops" in built:
        xl = sizes["sdxl"]
        lines.append(f"sdxl: {'demo tiny SDXL' if tiny else 'SDXL-base-architecture UNet'}, "
                     f"{xl['resolution']} px (latent {built['sdxl_latent']}), batch "
                     f"{xl['batch']}, rank {xl['rank']} on {','.join(IMAGE_TARGETS)}, "
                     f"{xl['images']} images; UNet forward "
                     f"{built['sdxl_unet_forward_flops'] / 1e9:,.4g} GFLOPs/image")
    if "flux_config" in built:
        fl = sizes["flux"]
        lines.append(f"flux: {'demo tiny Flux' if tiny else 'Flux.1-dev-architecture'} "
                     f"transformer, {fl['resolution']} px, batch {fl['batch']}, rank "
                     f"{fl['rank']} on {','.join(IMAGE_TARGETS)}, {fl['images']} images")
    if "llama_params" in built:
        lines.append(f"text: {'demo tiny Llama' if tiny else 'Llama'} "
                     f"{built['llama_params'] / 1e6:,.4g} M params, seq {txt['seq']}, "
                     f"batch {txt['batch']}, rank {txt['rank']} on {','.join(TEXT_TARGETS)}, "
                     f"{txt['records']} sequences")
    return lines


def write_docs(path: Path, gpu_run: bool, lines: list[str]) -> None:
    """Replace this benchmark's GPU block (a real GPU run) or tiny block (anything else) in
    ``path``; add the section first when it is missing."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + "\n\n".join([
            "### GPU results", GPU_BLOCK[0] + "\nNot measured yet.\n" + GPU_BLOCK[1],
            "### Tiny smoke run", TINY_BLOCK[0] + "\nNot run yet.\n" + TINY_BLOCK[1]]) + "\n"
    start, end = GPU_BLOCK if gpu_run else TINY_BLOCK
    if start not in text or end not in text:
        raise SystemExit(f"{path}: the markers {start} / {end} are missing from the section")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    path.write_text(before + start + "\n" + "\n".join(lines) + "\n" + end + after,
                    encoding="utf-8")


SCALING_TARGETS = {2: 0.85, 8: 0.8}  # issue 26: efficiency at N GPUs (SD1.5 / SDXL LoRA)


def scaling_plan(args, tasks: list[str], built: dict, sizes: dict, common: dict,
                 probe: dict) -> list:
    """``--gpus N``: ``lora train`` eager on 1 process and on N (``num_processes``), the same
    batch per process, for the image tasks asked for (SD1.5, SDXL)."""
    n = int(args.gpus)
    if n < 2:
        raise SystemExit("--gpus N: N must be at least 2 (1 process is the baseline row)")
    if probe["cuda"] and n > int(probe.get("cuda_count") or 1):
        raise SystemExit(f"--gpus {n}: this machine has {probe.get('cuda_count')} GPU(s)")
    home = Path(common["home"])
    plan = []
    for task in [t for t in tasks if t in ("image", "sdxl")]:
        sz = sizes[task]
        for procs in (1, n):
            name = f"lora train {procs} GPU{'s' if procs > 1 else ''}"
            spec = dict(common, config=built[f"{task}_config"],
                        model=str(Path(built["root"]) / "models" / MODEL_DIRS[task]),
                        rank=sz["rank"], batch=sz["batch"], compile=False,
                        items_batch=sz["batch"] * procs, fp32_weights=False,
                        overrides={"num_processes": procs},
                        out=str(home / "out" / task / f"dp{procs}"))
            plan.append((task, name, "lora_train", spec))
    return plan


def scaling_lines(results: dict, n: int, probe: dict) -> list[str]:
    """Scaling efficiency = steps/s on N processes / steps/s on 1 (same batch per process:
    N x the examples per second is perfect scaling), against issue 26's targets."""
    out = []
    for task in ("image", "sdxl"):
        one, many = (results.get((task, f"lora train {p} GPU{'s' if p > 1 else ''}"))
                     for p in (1, n))
        if one is None and many is None:
            continue
        if not (one and many and one.get("ok") and many.get("ok")):
            out.append(f"scaling {task} {n} GPUs: n/a (a row failed)")
            continue
        eff = many["steps_per_s"] / one["steps_per_s"]
        target = SCALING_TARGETS.get(n)
        if not probe["cuda"]:
            verdict = " (CPU gloo smoke row: the path works; says nothing of GPU scaling)"
        elif target is not None:
            verdict = f" (target >= {target}: {'met' if eff >= target else 'NOT met'})"
        else:
            verdict = ""
        out.append(f"scaling {task} {n} GPUs: efficiency {eff:.2f} = {many['steps_per_s']:.2f}"
                   f" / {one['steps_per_s']:.2f} steps/s at the same batch per process"
                   f"{verdict}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="tiny demo models and few steps (automatic without CUDA)")
    ap.add_argument("--home", type=Path,
                    help="working folder for models, data, caches and outputs (default: a "
                         "temporary folder, deleted afterwards)")
    ap.add_argument("--only", choices=["image", "text", "sdxl", "flux"],
                    help="run one task only")
    ap.add_argument("--skip-compiled", action="store_true", help="no compiled variants")
    ap.add_argument("--steps", type=int, help="measured steps per variant (default: 30 on "
                                              "GPU, 4 tiny)")
    ap.add_argument("--warmup", type=int, help="warm-up steps before them (>= 1; default: 5 "
                                               "on GPU, 1 tiny)")
    ap.add_argument("--compile-backend", help="torch.compile backend of the compiled "
                                              "variants (default: inductor; eager for a "
                                              "tiny run on CPU)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads per child (default: 1 for a tiny run on CPU, "
                         "where 2 threads on a loaded 2-core machine made steps up to 100x "
                         "slower spinning in OpenMP barriers; else torch's default)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, for MFU")
    ap.add_argument("--gpus", type=int, default=None, metavar="N",
                    help="issue 26: scaling efficiency of data-parallel lora train (image, "
                         "sdxl): 1 process against N (num_processes, the same batch per "
                         "process); only those rows. On CPU: N gloo processes (a smoke row)")
    ap.add_argument("--timeout", type=float, help="seconds per variant")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--write-docs", action="store_true",
                    help="update this benchmark's section of docs/benchmarks.md")
    ap.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    started = time.perf_counter()

    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="gpu_train_")
        home = Path(tmp.name)
    else:
        home = args.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_HOME"] = str(home)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logs = home / "gpu_train_logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        runner = Runner(logs, timeout=args.timeout or 600)
        probe = runner.run("probe", "probe", {})
        if not probe["ok"]:
            return 1
        tiny = args.tiny or not probe["cuda"]
        sizes = json.loads(json.dumps(SIZES["tiny" if tiny else "gpu"]))
        if args.steps:
            sizes["steps"] = max(1, args.steps)
        if args.warmup:
            sizes["warmup"] = max(1, args.warmup)
        runner.timeout = args.timeout or sizes["timeout"]
        if args.compile_backend is None and tiny and not probe["cuda"]:
            args.compile_backend = "eager"  # dynamo graph capture only: seconds, not minutes
        tasks = [args.only] if args.only else ["image", "text", "sdxl", "flux"]
        print(f"gpu_train: {'tiny' if tiny else 'full-size'} run on {probe['device_name']}; "
              f"home {home}", flush=True)
        built = runner.run("build", "build", {"home": str(home), "sizes": sizes, "tiny": tiny,
                                              "tasks": tasks, "threads": args.threads})
        if not built["ok"]:
            return 1
        print(f"  built models and data in {built['build_s']:.1f} s", flush=True)
        results: dict = {}
        threads = args.threads if args.threads is not None else (
            1 if tiny and not probe["cuda"] else 0)
        common = {"home": str(home), "warmup": sizes["warmup"], "steps": sizes["steps"],
                  "precision": sizes["precision"], "threads": threads}
        args.threads_used = threads
        plan = []
        if args.gpus:
            plan = scaling_plan(args, tasks, built, sizes, common, probe)
            tasks = []  # the scaling rows only
        for task in tasks:
            cfg_path = built[f"{task}_config"]
            model = str(Path(built["root"]) / "models" / MODEL_DIRS[task])
            sz = sizes[task]
            for name in VARIANTS[task]:
                spec = dict(common, config=cfg_path, model=model, rank=sz["rank"],
                            batch=sz["batch"], out=str(home / "out" / task / name.replace(
                                " ", "_").replace("+", "_")))
                if name.startswith("lora train"):
                    if name.endswith("compiled") and args.skip_compiled:
                        continue
                    spec.update(compile=name.endswith("compiled"),
                                compile_backend=args.compile_backend)
                    if name.endswith("gc batch 1"):
                        spec.update(overrides=GC_BATCH_1, batch=1)
                    if name.endswith("nf4 gc"):
                        spec.update(overrides=NF4_GC)
                    elif name.endswith("nf4"):
                        spec.update(overrides=NF4)
                    spec.update(fp32_weights=name.endswith("fp32 weights"))
                    plan.append((task, name, "lora_train", spec))
                elif name == "diffusers+peft":
                    plan.append((task, name, f"diffusers_{task}", spec))
                elif name == "bare loop":
                    spec.update(latent=built.get("sdxl_latent" if task == "sdxl" else "latent"),
                                seq=sz.get("seq"))
                    plan.append((task, name, "bare_text" if task == "text" else "bare_image",
                                 spec))
                else:
                    spec.update(seq=sz["seq"], weights="nf4" if name.endswith("nf4") else (
                        "bf16" if name.endswith("bf16 weights") else "fp32"))
                    plan.append((task, name, "trainer", spec))
        for task, name, kind, spec in plan:
            r = runner.run(kind, f"{task} {name}", spec)
            results[(task, name)] = r
            state = (f"{r['steps_per_s']:.2f} steps/s, first step {r['first_step_s']:.2f} s"
                     if r["ok"] else "FAILED")
            print(f"  {task:5s} {name:20s} {state} ({r['wall_s']:.1f} s wall)", flush=True)
        peak = _peak_for(probe["device_name"], probe["cuda"], args.peak_tflops)
        _derive(results, built, sizes, peak)
        header = header_lines(probe, sizes, tiny, args, built)
        ratios = (scaling_lines(results, args.gpus, probe) if args.gpus
                  else ratio_lines(results, probe["device_name"], tiny))
        total = time.perf_counter() - started
        print()
        for line in header:
            print(line)
        print(f"peak for MFU: {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s bf16'}")
        print()
        for line in table_lines(results, markdown=False):
            print(line)
        print()
        for line in ratios:
            print(line)
        print(f"total wall time: {total:.1f} s" + ("" if tiny else
              f" (budget 480 s on one H100/H200: {'within' if total <= 480 else 'OVER'})"))
        if args.json:
            args.json.write_text(json.dumps({
                "probe": probe, "tiny": tiny, "sizes": sizes, "built": built,
                "peak_flops": peak, "total_s": total,
                "results": [{"task": t, "variant": n, **r} for (t, n), r in results.items()],
                "ratios": ratios}, indent=1, default=str))
        if args.write_docs and args.gpus:
            print("--write-docs: not for a --gpus run (docs/benchmarks.md's data-parallel "
                  "section is written by hand from its printout)")
        elif args.write_docs:
            gpu_run = probe["cuda"] and not tiny
            doc = [f"`{' '.join(['.venv/bin/python', 'bench/gpu_train.py', *sys.argv[1:]])}`",
                   "", *[f"- {h}" for h in header],
                   f"- peak for MFU: {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
                   f"; total wall time {total:.0f} s", "",
                   *table_lines(results, markdown=True), "",
                   *[f"- {r}" for r in ratios]]
            write_docs(args.docs, gpu_run, doc)
            print(f"wrote the {'GPU' if gpu_run else 'tiny'} results into {args.docs}")
        return 0 if all(r.get("ok") for r in results.values()) else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
