"""The training config's schema: :class:`TrainConfig`, its keys and their help, and
:func:`config_from_mapping` (keys, types, ranges; nothing on disk read). Runs as the user (in
the kernel, the CLI and the pin step).

The one config validator shared by the CLI, the notebooks and the studio widgets is the checking
loader on top of it: :func:`lora_kernel.training.checks.load_config` /
:func:`~lora_kernel.training.checks.validate_config`.

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

from lora_kernel.common.contract import CONFIG_PATH_KEYS
from lora_kernel.common.errors import ConfigError
from lora_kernel.common.yamlio import parse_yaml
from lora_kernel.training.data import MAX_IMAGE_PIXELS
from lora_kernel.training.precision import VAE_DTYPES
from lora_kernel.training.text_data import FORMATS, TEMPLATE_NAMES
from lora_kernel.training.text_quant import COMPUTE_DTYPES, QUANTIZATIONS

TASKS = ("image", "text")
COMPILE_MODES = ("true", "false", "auto")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine",
    "cosine_with_restarts", "polynomial",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The keys whose values are filesystem paths, resolved against the config's folder.
PATH_KEYS = CONFIG_PATH_KEYS
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
    dataset_format: str = _h(
        "Text dataset format: auto (from the first line), messages (OpenAI), sharegpt, alpaca, "
        "prompt_response or text; the manifest records the resolved one (text).",
        default="auto")
    chat_template: str | None = _h(
        "Render conversations with this template of templates/chat (llama3, chatml, qwen, "
        "mistral, gemma) instead of the tokenizer's own chat_template (text).", default=None)
    quantization: str = _h(
        "Load the frozen base quantized, the LoRA weights staying float32: a causal LM (text) "
        "through bitsandbytes as nf4 or fp4 (4-bit, QLoRA) or int8; the Flux / SD3.5 "
        "transformer as nf4 or int8 (bitsandbytes; its CPU backend without CUDA) or fp8 (GPUs "
        "with fp8 support); none for other image models.", default="none")
    bnb_4bit_compute_dtype: str = _h(
        "Compute dtype of 4-bit layers: auto (mixed_precision's dtype, bf16 when no), bf16, "
        "fp16 or fp32 (text).", default="auto")
    eval_path: str | None = _h(
        "Held-out .jsonl (same format as the training data) whose loss is measured every "
        "eval_steps and at the end (TensorBoard eval/loss, training_summary.json; text, sft).",
        default=None)
    validation_split: float = _h(
        "Hold out this fraction of the records (text, sft) or of the images (image), chosen "
        "by the seed, instead of eval_path / validation_dir (0: none).", default=0.0)
    validation_dir: str | None = _h(
        "Folder of held-out images (any image dataset layout) whose loss, at fixed noise, is "
        "measured every eval_steps and at the end (TensorBoard eval/loss, "
        "training_summary.json held_out_loss); recorded as dataset files val:<path> (image).",
        default=None)
    eval_steps: int = _h("Measure the held-out loss every N optimizer steps (0: only before "
                         "and after training; text, image).", default=0)
    sample_every_n_steps: int = _h(
        "Also write samples every N optimizer steps (0: only at the end): the sample grid "
        "(image; samples/step-N/ and TensorBoard) or sample completions (text; "
        "samples/step-N/).", default=0)
    objective: str = _h(
        "sft (next-token loss on the answers), dpo or orpo (preference pairs: prompt, chosen, "
        "rejected; text).", default="sft")
    preference_beta: float = _h(
        "DPO's beta (strength of the KL anchor to the base model) / ORPO's lambda (weight of "
        "the odds-ratio term) (text).", default=0.1)
    use_dora: bool = _h("Weight-decomposed LoRA (DoRA; text; image with network_type lora "
                        "or locon).", default=False)
    use_rslora: bool = _h("Rank-stabilised LoRA: scale lora_alpha/sqrt(r) instead of "
                          "lora_alpha/r (text).", default=False)
    init_adapter: str | None = _h(
        "Continue from this PEFT adapter folder (an earlier text run's <output_name>/, same "
        "lora_rank); its sha256 is recorded in the new adapter (text).", default=None)
    bnb_4bit_use_double_quant: bool = _h(
        "Quantize the 4-bit quantization constants too (about 0.4 bits per weight less; text).",
        default=True)
    seed: int = _h("Random seed: data order, LoRA init, noise, sampling.", default=42)
    deterministic: bool | None = _h(
        "Deterministic kernels: the same config and seed give a bit-identical adapter on the "
        "same machine. Default: on for CPU; on CUDA only when true (sets "
        "torch.use_deterministic_algorithms, cudnn flags, CUBLAS_WORKSPACE_CONFIG; slower).",
        default=None)
    mixed_precision: str = _h(
        "'no', 'fp16' or 'bf16': autocast, and the frozen base weights (UNet, text "
        "encoders, VAE; the causal LM) are loaded in that dtype while the LoRA weights stay "
        "float32 (fp16 needs a GPU).", default="no")
    vae_dtype: str = _h(
        "dtype of the frozen VAE: auto (the weights' dtype, but fp32 where the family's VAE "
        "overflows in fp16, as SDXL's does), fp32, bf16 or fp16 (image).", default="auto")
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
    text_encoder_lr: float | None = _h(
        "Text-encoder LR (SDXL: both encoders unless text_encoder_2_lr is set). Default: "
        "learning_rate.", default=None)
    text_encoder_2_lr: float | None = _h(
        "LR of the second text encoder (SDXL's OpenCLIP-bigG; a model with one text encoder "
        "refuses it). Default: text_encoder_lr.", default=None)
    init: str | None = _h(
        "Start from this LoRA instead of a fresh one: a diffusers-format adapter file this "
        "platform exported (<output_name>.safetensors) for a model of the same family, with "
        "the same lora_rank and target modules (image); for SD 1.x/2.x also a kohya-format "
        "file (kohya: network_weights).", default=None)
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
    compile: str = _h(
        "torch.compile the UNet (image) / causal LM (text) for the training loop, with fused "
        "AdamW on CUDA and a compile cache in <LORA_HOME>/cache/torch_compile: true, false or "
        "auto (on for CUDA runs of at least 200 optimizer steps; never on CPU).",
        default="auto")
    keep_checkpoints: int = _h(
        "Keep only the newest N checkpoints (older ones are deleted after each save; "
        "0: keep all).", default=0)
    # -- several processes, one run (lora_kernel.training.distributed) --
    num_processes: str = _h(
        "Data-parallel training processes (ranks), launched with torch.distributed on "
        "127.0.0.1: auto (the GPUs the run was given; 1 on CPU) or N. Each rank trains "
        "batch_size examples of every global batch of batch_size x N; rank 0 alone writes "
        "checkpoints, samples, TensorBoard and adapters. N > 1 on CPU uses gloo (tests).",
        default="auto")
    fsdp: bool = _h(
        "Shard the frozen base model over the ranks (FSDP with LoRA) so a text model larger "
        "than one GPU trains. Not built yet: true is refused (docs/distributed.md).",
        default=False)
    rendezvous_port: int = _h(
        "TCP port on 127.0.0.1 where the ranks meet (num_processes > 1); 0: a free one.",
        default=0)
    # -- flow-matching transformers (Flux.1, SD3.5; lora_kernel.training.families.flow) --
    timestep_sampling: str = _h(
        "How flow times t are drawn (Flux, SD3.5): uniform, sigmoid (sigmoid(sigmoid_scale x "
        "N(0,1))), logit_normal (sigmoid(N(0,1))) or shift (sigmoid, then shifted by "
        "discrete_flow_shift).", default="sigmoid")
    discrete_flow_shift: float = _h(
        "Shift s of timestep_sampling: shift (t' = s t / (1 + (s - 1) t)); Flux, SD3.5.",
        default=3.0)
    sigmoid_scale: float = _h("Scale of the normal draw of timestep_sampling: sigmoid / shift.",
                              default=1.0)
    weighting_scheme: str = _h(
        "Per-example loss weight of flow matching: none, sigma_sqrt or cosmap (Flux, SD3.5).",
        default="none")
    guidance_scale: float | None = _h(
        "Guidance fed to Flux.1-dev's guidance embedding during training (a model without "
        "one, schnell or SD3.5, refuses it). Default: 1.0 for Flux.1-dev.", default=None)
    # -- kohya habits (issue 24; logic in optimizers.py, captions.py, kohya_config.py) ----
    optimizer: str = _h(
        "adamw, adamw8bit, lion, lion8bit (bitsandbytes), prodigy (prodigyopt) or adafactor "
        "(transformers) (kohya: optimizer_type).", default="adamw")
    optimizer_args: dict = _h(
        "Extra optimizer keyword arguments: a mapping, or kohya's list of \"key=value\" "
        "strings (e.g. [\"d_coef=2\", \"use_bias_correction=True\"] for prodigy).",
        default_factory=dict)
    lr_scheduler_num_cycles: int = _h("Restarts of cosine_with_restarts (kohya's name).",
                                      default=1)
    lr_scheduler_power: float = _h("Power of the polynomial schedule.", default=1.0)
    min_lr: float = _h("Floor of a decaying schedule (linear, cosine, cosine_with_restarts, "
                       "polynomial) after warm-up; 0: decay to 0.", default=0.0)
    shuffle_caption: bool = _h("Shuffle a caption's tags every step (image; the first "
                               "keep_tokens stay first).", default=False)
    keep_tokens: int = _h("Leading tags kept in place by shuffle_caption and tag dropout "
                          "(the trigger word).", default=0)
    keep_tokens_separator: str = _h(
        "Text in a caption ending its fixed part (kohya: e.g. \"|||\"); overrides "
        "keep_tokens for captions that contain it. Empty: off.", default="")
    caption_separator: str = _h("Tag separator of captions (a full-width \"\uff0c\" of "
                                "Chinese captions splits the same as \",\").", default=",")
    caption_dropout_rate: float = _h("Probability that a step trains an image with an empty "
                                     "caption, in [0, 1).", default=0.0)
    caption_tag_dropout_rate: float = _h(
        "Probability that each tag after keep_tokens is dropped for a step, in [0, 1).",
        default=0.0)
    save_every_n_epochs: int = _h(
        "Write a loadable adapter (kohya and diffusers format, <output_name>-eNNNN) every N "
        "epochs into <output_dir>/snapshots/ (0: never); save_steps also writes one "
        "(<output_name>-sNNNNNN) besides its checkpoint (image).", default=0)
    sample_every_n_epochs: int = _h("Draw the sample grid every N epochs (image; 0: only at "
                                    "the end).", default=0)
    clip_skip: int = _h("Condition on the text encoder's output this many layers from the "
                        "end (kohya's clip_skip; 2 for many anime models; SD 1.x/2.x, SDXL "
                        "always uses its penultimate layer; sample images use the last).",
                        default=1)
    min_snr_gamma: float = _h("Min-SNR loss weighting gamma (image; kohya's; typical 5; 0: "
                              "off). Follows the model's epsilon / v prediction.", default=0.0)
    debiased_estimation_loss: bool = _h("Weight the loss by 1/sqrt(SNR) (image; kohya's "
                                        "debiased estimation).", default=False)
    multires_noise_iterations: int = _h("Levels of multires (pyramid) noise added to the "
                                        "training noise (image; kohya's; typical 6; 0: off).",
                                        default=0)
    multires_noise_discount: float = _h("Weight decay per multires noise level, in (0, 1].",
                                        default=0.3)
    zero_terminal_snr: bool = _h("Rescale the training noise schedule to zero terminal SNR "
                                 "(image; for v-prediction models such as SD2-768).",
                                 default=False)
    caption_extension: str | None = _h(
        "Suffix of sidecar caption files (kohya layout), e.g. .txt. Default: .txt or "
        ".caption.", default=None)
    reg_data_dir: str | None = _h(
        "Regularization (class) images, kohya's layout: N_class folders (N repeats; the "
        "class name is the caption unless the images have sidecar captions), balanced to the "
        "training images' count each epoch as kohya does; recorded as dataset files "
        "reg:<path> (image; logic in reg.py).", default=None)
    network_type: str = _h(
        "Image adapter type: lora, locon (LoRA on the UNet's ResNet and sampler convolutions "
        "too: conv_dim, conv_alpha), loha or lokr (peft's LoHa / LoKr); exported in the "
        "LyCORIS / kohya key names A1111/Forge and ComfyUI load, and as one peft-format file "
        "<output_name>_peft.safetensors (kohya: "
        "network_module lycoris.kohya, network_args algo; logic in adapters.py).",
        default="lora")
    conv_dim: int | None = _h("Rank of the 3x3 convolutions of locon / loha / lokr (kohya's "
                              "network_args conv_dim). Default: none (linear layers only).",
                              default=None)
    conv_alpha: float | None = _h("Alpha of those convolutions. Default: conv_dim.",
                                  default=None)
    lokr_factor: int = _h("Kronecker factor of lokr (kohya's network_args factor; -1: "
                          "automatic).", default=-1)
    prior_loss_weight: float | None = _h(
        "Loss weight of the regularization images (needs reg_data_dir). Default: 1.0.",
        default=None)

    # Where this config came from (not a user key).
    source: str | None = field(default=None, repr=False, compare=False,
                               metadata={"internal": True})
    # What validation noticed in the dataset but accepts (empty captions, duplicate rows,
    # 1x1 images), one message each naming its row; printed as ``warning: ...`` (not a key).
    dataset_warnings: list[str] = field(default_factory=list, repr=False, compare=False,
                                        metadata={"internal": True})
    # The base model's family (image: sd15, sd2, sdxl), read by validation before anything
    # loads; shown by ``lora config`` (not a key).
    model_family: str | None = field(default=None, repr=False, compare=False,
                                     metadata={"internal": True})
    # What validation noticed about the model and config but accepts (e.g. SDXL trained far
    # below its native resolution), printed as ``warning: ...`` (not a key).
    model_warnings: list[str] = field(default_factory=list, repr=False, compare=False,
                                      metadata={"internal": True})
    # kohya spellings of our keys that this config used (``network_dim`` for ``lora_rank``),
    # one note each; the canonical key is what is recorded (not a key).
    key_notes: list[str] = field(default_factory=list, repr=False, compare=False,
                                 metadata={"internal": True})

    # The text dataset's format when dataset_format is auto, found by validation from the
    # first line; to_dict records it in place of "auto" (not a key).
    resolved_dataset_format: str | None = field(default=None, repr=False, compare=False,
                                                metadata={"internal": True})

    def __post_init__(self):
        self._check()

    # -- validation --------------------------------------------------------
    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=self.source or "<config>", key=key)

    def _check(self):
        if self.compile not in COMPILE_MODES:
            raise self._err("compile", f"must be true, false or auto, got {self.compile!r}; "
                            "fix: compile: auto")
        if self.task not in TASKS:
            raise self._err("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}; "
                                    f"fix: set task: image or task: text")
        positive = ["lora_rank", "batch_size", "epochs", "gradient_accumulation_steps",
                    "resolution", "max_seq_length", "sample_steps", "max_new_tokens",
                    "logging_steps", "max_image_pixels", "clip_skip"]
        for key in positive:
            if getattr(self, key) < 1:
                raise self._err(key, f"must be >= 1, got {getattr(self, key)}; fix: use a "
                                     f"positive integer")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise self._err("max_train_steps", f"must be >= 1 or omitted, got "
                                               f"{self.max_train_steps}")
        for key in ("save_steps", "lr_warmup_steps", "max_grad_norm", "weight_decay",
                    "noise_offset", "keep_checkpoints", "save_every_n_epochs",
                    "sample_every_n_steps", "sample_every_n_epochs", "min_snr_gamma",
                    "multires_noise_iterations"):
            if getattr(self, key) < 0:
                raise self._err(key, f"must be >= 0, got {getattr(self, key)}")
        from lora_kernel.training.habits import lr_ceiling
        top, typical = lr_ceiling(self.optimizer)
        if not (0 < self.learning_rate < top) or not math.isfinite(self.learning_rate):
            raise self._err("learning_rate", f"must be in (0, {top:g}), got "
                                             f"{self.learning_rate}; typical {typical}")
        for key in ("text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, key)
            if value is not None and not (0 < value < top):
                raise self._err(key, f"must be in (0, {top:g}), got {value}")
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
        if self.vae_dtype not in VAE_DTYPES:
            raise self._err("vae_dtype", f"must be one of {', '.join(VAE_DTYPES)}, got "
                                         f"{self.vae_dtype!r}; fix: vae_dtype: auto")
        self._check_text_keys()
        self._check_flow()
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
        from lora_kernel.training.habits import check_habits
        check_habits(self)
        from lora_kernel.training.distributed_checks import check_distributed_keys
        check_distributed_keys(self)

    def _check_text_keys(self):
        if not (0 <= self.validation_split < 1):
            raise self._err("validation_split", f"must be in [0, 1), got "
                                                f"{self.validation_split}; e.g. 0.1")
        for key in ("eval_steps", "sample_every_n_steps"):
            if getattr(self, key) < 0:
                raise self._err(key, f"must be >= 0, got {getattr(self, key)}")
        if self.eval_path and self.validation_split:
            raise self._err("validation_split", "give eval_path or validation_split, not both")
        if (self.eval_path or self.validation_split) and self.task == "text" \
                and self.objective != "sft":
            raise self._err("eval_path" if self.eval_path else "validation_split",
                            "held-out evaluation is for text SFT runs (task: text, objective: "
                            "sft) and image runs; fix: remove it")
        if self.eval_path and self.task == "image":
            raise self._err("eval_path", "is a held-out .jsonl of a text run; fix: for images "
                                         "use validation_dir (a folder of held-out images) or "
                                         "validation_split")
        if self.validation_dir and self.task != "image":
            raise self._err("validation_dir", "is a folder of held-out images (task: image); "
                                              "fix: for text use eval_path")
        if self.validation_dir and self.validation_split:
            raise self._err("validation_split", "give validation_dir or validation_split, not "
                                                "both; fix: remove one of them")
        if self.preference_beta <= 0:
            raise self._err("preference_beta", f"must be > 0, got {self.preference_beta}")
        if self.task == "image" and self.objective != "sft":
            raise self._err("objective", "dpo and orpo apply to task: text; fix: remove it")
        from lora_kernel.training.flow_models import QUANTIZATIONS as FLOW_QUANTIZATIONS
        quantizations = QUANTIZATIONS if self.task == "text" else FLOW_QUANTIZATIONS
        for key, allowed in (("dataset_format", FORMATS), ("quantization", quantizations),
                             ("objective", ("sft", "dpo", "orpo")),
                             ("bnb_4bit_compute_dtype", COMPUTE_DTYPES)):
            if getattr(self, key) not in allowed:
                raise self._err(key, f"must be one of {', '.join(allowed)}, got "
                                     f"{getattr(self, key)!r}")
        if self.chat_template is not None and self.chat_template not in TEMPLATE_NAMES:
            raise self._err("chat_template", f"unknown template {self.chat_template!r}; fix: "
                            f"one of {', '.join(TEMPLATE_NAMES)}, or remove the key for the "
                            f"tokenizer's own")
        if self.task == "image" and self.target_modules == ["all-linear"]:
            raise self._err("target_modules", "all-linear applies to task: text; fix: name "
                                              "the UNet modules, or remove the key")
        for key in ("use_rslora", "init_adapter"):
            if self.task == "image" and getattr(self, key):
                raise self._err(key, "applies to task: text; fix: remove it")

    def _check_flow(self):
        from lora_kernel.training.families.flow import TIMESTEP_SAMPLING, WEIGHTING_SCHEMES
        for key, allowed in (("timestep_sampling", TIMESTEP_SAMPLING),
                             ("weighting_scheme", WEIGHTING_SCHEMES)):
            if getattr(self, key) not in allowed:
                raise self._err(key, f"must be one of {', '.join(allowed)}, got "
                                     f"{getattr(self, key)!r}; fix: {key}: {allowed[0]}")
        for key in ("discrete_flow_shift", "sigmoid_scale"):
            if not getattr(self, key) > 0:
                raise self._err(key, f"must be > 0, got {getattr(self, key)}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise self._err("guidance_scale", f"must be >= 0, got {self.guidance_scale}")

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
        if self.resolved_dataset_format and self.dataset_format == "auto":
            out["dataset_format"] = self.resolved_dataset_format
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
        elif ann.startswith("dict"):
            types = (dict,)
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
    if key == "compile" and isinstance(value, bool):
        value = "true" if value else "false"
    if key == "num_processes" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if key == "sample_prompts" and isinstance(value, str):
        value = [value]
    if key == "optimizer_args" and isinstance(value, (list, str)):
        from lora_kernel.training.habits import parse_optimizer_args
        value = parse_optimizer_args(value, file)
    if bool in types:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {type(value).__name__} {value!r}; "
                              f"fix: use true or false (yes/no/on/off are read as text), e.g. "
                              f"{key}: {_example(key)}", file=file, key=key)
        return value
    if isinstance(value, bool) or not isinstance(value, types):
        want = {int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "a mapping"}
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
    return {"base_model": "models/tiny-sd", "lora_alpha": "8", "deterministic": "true",
            "max_train_steps": "100"}.get(key, "...")


def parse_value(text: str) -> Any:
    """Parse a ``-p key value`` override with the config files' own YAML loader, so ``-p`` and
    files agree (``1e-4`` -> float, ``no`` -> "no"); text that is not YAML stays text."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def config_from_mapping(raw: Mapping[str, Any], *, source: str | os.PathLike | None = None,
                        base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping of config keys, checked against the schema only:
    unknown keys, wrong types and out-of-range values raise :class:`ConfigError`; relative
    paths resolve against ``base_dir`` (the config file's folder). Nothing on disk is read:
    the checking loader (:func:`lora_kernel.training.checks.validate_config`) adds that.
    """
    file = str(source) if source is not None else "<config>"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a YAML mapping of key: value, got {type(raw).__name__}; "
                          f"fix: start from templates/image_lora.yaml", file=file)
    keys = config_keys()
    values: dict[str, Any] = {}
    from lora_kernel.training.habits import resolve_aliases
    raw, alias_notes = resolve_aliases(raw, file)
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
    cfg.key_notes = alias_notes
    return cfg
