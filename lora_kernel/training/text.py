"""Text LoRA (causal LM): transformers + peft ``CAUSAL_LM`` LoRA.

The dataset is JSON Lines: conversations (OpenAI ``messages``, ShareGPT, Alpaca; rendered with
the chat template, loss on the assistant turns, see :mod:`lora_kernel.training.text_data`),
``text`` records (loss on every token) or ``prompt``/``response`` records (loss on the response
and end-of-sequence only). With
``packing`` several examples share one sequence of ``max_seq_length`` tokens, as in
LLaMA-Factory and TRL; without it each example is its own (padded) sequence.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lora_kernel.common.errors import ConfigError, DataError
from lora_kernel.training.data import read_text_records
from lora_kernel.training.loop import autocast_context, seed_everything
from lora_kernel.training.precision import keep_trainable_fp32

IGNORE = -100
logger = logging.getLogger(__name__)


def load_text_model(cfg, *, dtype, device):
    """``(model, tokenizer)`` of ``cfg.base_model``: its frozen weights in ``dtype``, or
    quantized per ``cfg.quantization`` straight onto ``device`` and prepared for k-bit
    training (:mod:`lora_kernel.training.text_quant`)."""
    from lora_kernel.training.models import load_causal_lm
    from lora_kernel.training.text_quant import bnb_config, prepare_unquantized
    quant = bnb_config(cfg)
    if quant is None:
        return load_causal_lm(cfg.base_model, dtype=dtype)
    model, tokenizer = load_causal_lm(cfg.base_model, dtype=dtype, quantization_config=quant,
                                      device=device)
    return prepare_unquantized(cfg, model), tokenizer


def encode_records(cfg, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each record (-100 where no loss): conversations
    (:mod:`lora_kernel.training.text_data`) rendered with the chat template, loss on the
    assistant turns; prompt/response records with the prompt masked; text records whole."""
    from lora_kernel.training.text_data import CHAT_FORMATS, encode_chat_records, resolve_format
    fmt = resolve_format(cfg)
    if fmt in CHAT_FORMATS:
        return encode_chat_records(cfg, tokenizer, fmt)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for n, rec in enumerate(read_text_records(cfg), start=1):
        if cfg.prompt_column in rec and cfg.response_column in rec:
            p = tokenizer(str(rec[cfg.prompt_column]), add_special_tokens=False).input_ids
            r = tokenizer(str(rec[cfg.response_column]), add_special_tokens=False).input_ids
            ids = bos + p + r + eos
            labels = [IGNORE] * (len(bos) + len(p)) + r + eos
        elif cfg.text_column in rec:
            t = tokenizer(str(rec[cfg.text_column]), add_special_tokens=False).input_ids
            ids = bos + t + eos
            labels = [IGNORE] * len(bos) + t + eos
        else:
            raise DataError(f"record {n} has neither {cfg.text_column!r} nor "
                            f"{cfg.prompt_column!r}+{cfg.response_column!r}")
        out.append((ids, labels))
    return out


class Sequence(tuple):
    """One training sequence: a ``(ids, labels)`` pair (tensors), and ``positions``: the
    position id of every token, restarting at 0 for each packed example (None: unpacked,
    ``0..n-1``)."""

    positions: torch.Tensor | None

    def __new__(cls, ids: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None) -> Sequence:
        seq = super().__new__(cls, (ids, labels))
        seq.positions = positions
        return seq


def pack_examples(lengths: list[int], limit: int) -> list[list[int]]:
    """First-fit decreasing: the example indices of each packed sequence (at most ``limit``
    tokens; every example whole), in a fixed order for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(limit - lengths[i])
    return [sorted(b) for b in bins]


def build_sequences(cfg, records, pad_id: int) -> list[Sequence]:
    """Training sequences, one per record or, with ``packing``, several whole records per
    sequence of at most ``max_seq_length`` tokens that never attend to each other (position
    ids restart per record; :func:`collate` leaves the attention mask out so that the model
    builds a block-diagonal causal mask from them). A record longer than ``max_seq_length``
    is truncated, with a warning naming it."""
    L = cfg.max_seq_length
    for n, (ids, _) in enumerate(records, start=1):
        if len(ids) > L:
            logger.warning("record %d of the dataset has %d tokens, more than max_seq_length "
                           "%d: it is truncated (raise max_seq_length to keep it whole)",
                           n, len(ids), L)
    cut = [(list(i[:L]), list(lab[:L])) for i, lab in records]
    if cfg.packing:
        seqs = []
        for group in pack_examples([len(i) for i, _ in cut], L):
            ids: list[int] = []
            labels: list[int] = []
            pos: list[int] = []
            for k in group:
                i, lab = cut[k]
                ids.extend(i)
                labels.extend([IGNORE] + lab[1:])  # the first token is never predicted
                pos.extend(range(len(i)))
            seqs.append(Sequence(torch.tensor(ids), torch.tensor(labels), torch.tensor(pos)))
    else:
        seqs = [Sequence(torch.tensor(i), torch.tensor(lab)) for i, lab in cut]
    seqs = [s for s in seqs if (s[1] != IGNORE).any()]
    if not seqs:
        raise DataError("no training tokens: every sequence is fully masked; check "
                        "max_seq_length and the prompt/response fields")
    return seqs


def collate(seqs: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    """Right-pad a batch: input ids, attention mask, labels (-100 on padding)."""
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for row, (i, lab) in enumerate(seqs):
        ids[row, :len(i)] = i
        labels[row, :len(lab)] = lab
        mask[row, :len(i)] = 1
    return ids, mask, labels


def packed_positions(seqs: list[Sequence]) -> torch.Tensor:
    """The position ids of a right-padded batch of packed sequences: each sequence's own,
    then the padding as one more block starting at 0 (it attends only to itself and carries
    no loss)."""
    n = max(len(s[0]) for s in seqs)
    out = torch.zeros((len(seqs), n), dtype=torch.long)
    for row, s in enumerate(seqs):
        pos = s.positions if s.positions is not None else torch.arange(len(s[0]))
        out[row, :len(pos)] = pos
        out[row, len(pos):] = torch.arange(n - len(pos))
    return out


class TextTask:
    """PEFT LoRA training of a causal language model."""

    def __init__(self, cfg, model, tokenizer, *, device: torch.device):
        from lora_kernel.training.config import DEFAULT_TEXT_TARGETS
        from lora_kernel.training.models import check_target_modules
        from lora_kernel.training.text_adapter import attach, is_all_linear, lora_config
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        # Names that match nothing are refused (exit 2) before anything is attached or trained.
        if not is_all_linear(cfg.targets) and not cfg.init_adapter:
            check_target_modules(model, cfg.targets, what=f"model {cfg.base_model}",
                                 file=cfg.source, default=DEFAULT_TEXT_TARGETS)
        seed_everything(cfg.seed)
        self.lora_config = lora_config(cfg)
        if getattr(cfg, "quantization", "none") == "none":
            model.to(device)  # a quantized model was loaded onto the device
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        self.model = attach(cfg, model)  # fresh (self.lora_config), or init_adapter
        keep_trainable_fp32(self.model)  # the frozen LM may be half precision, LoRA is not
        self.model.train()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)
        self.sequences = self.build(cfg, tokenizer)
        self.tokens = sum(int((s[1] != IGNORE).sum()) for s in self.sequences)
        self._before = self.held_out_loss() if getattr(self, "held", None) else None

    def build(self, cfg, tokenizer) -> list:
        """The training examples (here: sequences; a preference task's: pairs), and the
        held-out sequences (``self.held``: ``eval_path``, or ``validation_split`` of the
        records chosen by the seed, never trained on)."""
        from dataclasses import replace
        records = encode_records(cfg, tokenizer)
        held: list = []
        if cfg.validation_split:
            gen = torch.Generator().manual_seed(cfg.seed + 104729)
            order = torch.randperm(len(records), generator=gen).tolist()
            k = max(1, round(len(records) * cfg.validation_split))
            if k >= len(records):
                raise ConfigError(f"validation_split {cfg.validation_split} of {len(records)} "
                                  f"records leaves none to train on; fix: a smaller fraction",
                                  file=cfg.source, key="validation_split")
            out = set(order[:k])
            held = [r for i, r in enumerate(records) if i in out]
            records = [r for i, r in enumerate(records) if i not in out]
        elif cfg.eval_path:
            held = encode_records(replace(cfg, metadata_path=cfg.eval_path,
                                          train_data_dir=None), tokenizer)
        self.held = build_sequences(cfg, held, self.pad_id) if held else []
        self.eval_history: list[dict] = []
        return build_sequences(cfg, records, self.pad_id)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Mean loss over the held-out sequences (eval mode, the run's autocast)."""
        b = self.cfg.batch_size
        total, count = 0.0, 0
        self.model.train(False)
        try:
            for i in range(0, len(self.held), b):
                seqs = self.held[i:i + b]
                with autocast_context(self.cfg, self.device):
                    total += self._loss_of(seqs).item() * len(seqs)
                count += len(seqs)
        finally:
            self.model.train(True)
        return total / max(1, count)

    def after_step(self, step: int, n_steps: int, writer, output_dir: Path) -> None:
        """The loop's periodic hook: the held-out loss every ``eval_steps`` (and at the last
        step; the first measurement is before training), sample completions every
        ``sample_every_n_steps``."""
        cfg = self.cfg
        if self.held:
            if not self.eval_history:
                self.eval_history.append({"step": 0, "loss": self._before})
                writer.add_scalar("eval/loss", self._before, 0)
            if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == n_steps:
                loss = self.held_out_loss()
                self.eval_history.append({"step": step, "loss": loss})
                writer.add_scalar("eval/loss", loss, step)
        from lora_kernel.training.distributed import is_rank_zero
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 \
                and step != n_steps and is_rank_zero():
            sample_completions(cfg, self, Path(output_dir) / "samples" / f"step-{step}",
                               measure=False)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad],
                 "lr": self.cfg.learning_rate}]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        order = torch.randperm(len(self.sequences), generator=gen).tolist()
        from lora_kernel.training.distributed import global_batch_size
        b = global_batch_size(self.cfg)  # data-parallel: the batch over all ranks
        return [order[i:i + b] for i in range(0, len(order), b)]

    def batch_size_of(self, batch: list[int]) -> int:
        return len(batch)

    def eval_batches(self) -> list[list[int]]:
        b = self.cfg.batch_size
        return [list(range(i, min(i + b, len(self.sequences))))
                for i in range(0, len(self.sequences), b)]

    def train_mode(self, enabled: bool) -> None:
        self.model.train(enabled)

    def loss(self, batch: list[int], generator: torch.Generator,
             shard=None) -> torch.Tensor:
        seqs = [self.sequences[i] for i in batch]
        if shard is None:
            return self._loss_of(seqs)
        # data-parallel (lora_kernel.training.distributed): this rank's slice, its token
        # losses summed over the global batch's labelled tokens, x ranks: the ranks' mean
        # gradient is the one-process gradient of the whole batch
        mine = seqs[shard.part(len(seqs))]
        if not mine:
            from lora_kernel.training.distributed import zero_loss
            return zero_loss(list(self.named_trainable().values()))
        tokens = sum(int((lab[1:] != IGNORE).sum()) for _, lab in seqs)
        return self._loss_of(mine, num_items=max(1, tokens)) * shard.world

    def _loss_of(self, seqs: list, num_items: int | None = None) -> torch.Tensor:
        ids, mask, labels = collate(seqs, self.pad_id)
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        if self.cfg.packing:  # no attention mask: the model masks by the position ids
            out = self.model(input_ids=ids.to(self.device),
                             position_ids=packed_positions(seqs).to(self.device),
                             labels=labels.to(self.device), use_cache=False, **extra)
            return out.loss
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         labels=labels.to(self.device), **extra)
        return out.loss


@torch.no_grad()
def sample_completions(cfg, task: TextTask, out_dir: Path, measure: bool = True) -> dict:
    """Greedy completions of the sample prompts, without and with the LoRA; and, with
    ``measure``, when a prompt asks for a demo code, the exact-match measures on held-out
    prompts (``measures``: :func:`lora_kernel.training.text_metrics.measure_held_out`)."""
    from lora_kernel.training.text_data import (
        CHAT_FORMATS,
        dataset_lines,
        first_user_prompts,
        resolve_format,
        template_text,
    )
    from lora_kernel.training.text_metrics import measure_held_out
    fmt = resolve_format(cfg)
    tok = task.tokenizer
    chat = fmt in CHAT_FORMATS or (fmt == "preference" and template_text(cfg, tok) is not None)
    prompts = list(cfg.sample_prompts)
    if not prompts and fmt in CHAT_FORMATS:
        prompts = first_user_prompts(cfg, fmt)
    elif not prompts:
        recs = read_text_records(cfg)
        prompts = [str(r[cfg.prompt_column]) for r in recs[:3] if cfg.prompt_column in r]
    template = template_text(cfg, tok) if chat else None

    def complete(batch: list[str]) -> list[dict]:
        return _greedy_rows(cfg, task, batch, template)

    rows = complete(prompts)
    measures = measure_held_out(prompts, [json.dumps(rec) for _, _, rec in dataset_lines(cfg)],
                                complete) if measure else None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "completions.json"
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    md = ["| prompt | base model | with LoRA |", "|---|---|---|"]
    md += [f"| {r['prompt']} | {r['base']} | {r['lora']} |" for r in rows]
    (out_dir / "completions.md").write_text("\n".join(md) + "\n")
    info = {"completions": str(path), "rows": rows}
    if measures is not None:
        info["measures"] = measures
        (out_dir / "samples.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info


def _greedy_rows(cfg, task: TextTask, prompts: list[str], template: str | None) -> list[dict]:
    """``{"prompt", "base", "lora"}``: each prompt's greedy completion without and with the
    LoRA (``template``: sampled as a chat user turn)."""
    from lora_kernel.training.text_data import chat_prompt_ids
    model, tok = task.model, task.tokenizer
    model.eval()
    rows = []
    for prompt in prompts:
        if template is not None:  # a chat run samples its prompts as user turns
            ids = torch.tensor([chat_prompt_ids(prompt, tok, template)])
        else:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
            if tok.bos_token_id is not None and ids[0, 0] != tok.bos_token_id:
                ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
        ids = ids.to(task.device)
        gen = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False,
                   pad_token_id=task.pad_id, eos_token_id=tok.eos_token_id)
        with autocast_context(cfg, task.device):  # half-precision frozen parts need it
            with model.disable_adapter():
                base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      **gen)
            tuned = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        n = ids.shape[1]
        rows.append({"prompt": prompt,
                     "base": tok.decode(base[0, n:], skip_special_tokens=True),
                     "lora": tok.decode(tuned[0, n:], skip_special_tokens=True)})
    model.train()
    return rows
