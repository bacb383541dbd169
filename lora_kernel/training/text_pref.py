"""Preference training of the text LoRA: ``objective: dpo`` (Direct Preference Optimization,
Rafailov et al. 2023) and ``objective: orpo`` (Odds Ratio Preference Optimization, Hong et al.
2024) on ``{"prompt", "chosen", "rejected"}`` records (``prompt`` a string or ``messages``, the
conversation before the answer).

Our loop, not trl's trainers: ``DPOTrainer``/``ORPOTrainer`` are ``transformers.Trainer``s
with their own optimizer, schedule, checkpoints, logging and data collation; running them would
bypass the loop's exact resume, determinism, progress records, TensorBoard and the evidence the
record seals, for two losses of a few lines each. The formulas are trl's (sigmoid DPO loss;
ORPO's NLL plus the log-sigmoid of the log odds ratio of mean token log-probabilities). The
DPO reference model is the base model itself: the policy with its LoRA disabled (what trl does
for a peft model with ``ref_model=None``), so no second copy is loaded.

A pair is the same conversation with the chosen and with the rejected answer, rendered like SFT
data (:mod:`lora_kernel.training.text_data`: the chat template when the model has one or one
is named, else ``<bos> prompt answer <eos>``); the log-probability of an answer is summed over
its tokens (the assistant turn and its end-of-turn token).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.text import IGNORE, TextTask, collate
from lora_kernel.training.text_data import (
    BadRecord,
    check_conversation,
    dataset_lines,
    encode_conversation,
    template_text,
)

OBJECTIVES = ("sft", "dpo", "orpo")


def pair_messages(rec: Any) -> tuple[list[dict[str, str]], str, str]:
    """``(conversation before the answer, chosen, rejected)`` of one preference record."""
    if not isinstance(rec, dict):
        raise BadRecord("the line is not a JSON object", "one JSON object per line")
    for key in ("chosen", "rejected"):
        other = "rejected" if key == "chosen" else "chosen"
        if key not in rec:
            raise BadRecord(f"it has {other!r} but no {key!r}",
                            "give every line both 'chosen' and 'rejected' answers "
                            "(or remove the line)")
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise BadRecord(f"{key!r} is not a non-empty string", f"give {key!r} as text")
    if isinstance(rec.get("messages"), list):
        before = [m if isinstance(m, dict) else {} for m in rec["messages"]]
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content", ""))}
                for m in before]
    elif isinstance(rec.get("prompt"), str):
        msgs = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise BadRecord("it has no 'prompt' (string) or 'messages' (the turns before the "
                        "answer)", "add the prompt the two answers reply to")
    check_conversation(msgs + [{"role": "assistant", "content": rec["chosen"]}])
    return msgs, rec["chosen"], rec["rejected"]


def check_preference_dataset(cfg, file: str) -> int:
    """Check every preference record (before any model loads); return their number."""
    if cfg.objective == "sft":
        raise ConfigError("the dataset holds preference pairs (chosen/rejected); fix: set "
                          "objective: dpo or orpo (or train SFT on a messages file)",
                          file=file, key="objective")
    n = 0
    for path, lineno, rec in dataset_lines(cfg):
        try:
            msgs, _, _ = pair_messages(rec)
        except BadRecord as exc:
            raise ConfigError(f"{path} line {lineno}: {exc}", file=file,
                              key="metadata_path") from None
        if len(msgs) > 1 and template_text(cfg) is None:
            raise ConfigError(f"{path} line {lineno} gives 'messages', but the model has no "
                              f"chat template and none is named; fix: set chat_template",
                              file=file, key="chat_template")
        n += 1
    return n


def _encode(msgs, answer: str, tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    if template is not None:
        return encode_conversation(msgs + [{"role": "assistant", "content": answer}],
                                   tokenizer, template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = tokenizer(msgs[-1]["content"], add_special_tokens=False).input_ids
    a = tokenizer(" " + answer.lstrip(), add_special_tokens=False).input_ids
    return bos + p + a + eos, [IGNORE] * (len(bos) + len(p)) + a + eos


def encode_pairs(cfg, tokenizer) -> list[tuple[tuple, tuple]]:
    """``((chosen ids, labels), (rejected ids, labels))`` tensors of every record."""
    template = template_text(cfg, tokenizer)
    L = cfg.max_seq_length
    out = []
    for _, _, rec in dataset_lines(cfg):
        msgs, chosen, rejected = pair_messages(rec)
        pair = []
        for answer in (chosen, rejected):
            ids, labels = _encode(msgs, answer, tokenizer, template)
            pair.append((torch.tensor(ids[-L:]), torch.tensor(labels[-L:])))
        out.append((pair[0], pair[1]))
    return out


def sequence_logps(model, seqs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean log-probability of each sequence's labelled tokens."""
    ids, mask, labels = collate(seqs, pad_id)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1))
    logp = logp.squeeze(-1) * keep
    total = logp.sum(-1)
    return total, total / keep.sum(-1).clamp(min=1)


class PreferenceTask(TextTask):
    """The text task with a DPO or ORPO loss over chosen/rejected pairs."""

    def build(self, cfg, tokenizer) -> list:
        pairs = encode_pairs(cfg, tokenizer)
        self.pairs = pairs
        self.held, self.eval_history = [], []  # held-out evaluation is for SFT runs
        # the loop counts examples and label tokens through ``sequences``: the chosen ones
        return [chosen for chosen, _ in pairs]

    def margins(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """Per pair: policy and reference log-probabilities of the chosen and rejected
        answers (sums) and their token means."""
        seqs = [self.pairs[i][0] for i in batch] + [self.pairs[i][1] for i in batch]
        total, mean = sequence_logps(self.model, seqs, self.pad_id, self.device)
        n = len(batch)
        out = {"chosen": total[:n], "rejected": total[n:], "chosen_mean": mean[:n],
               "rejected_mean": mean[n:]}
        if self.cfg.objective == "dpo":
            with torch.no_grad(), self.model.disable_adapter():
                ref, _ = sequence_logps(self.model, seqs, self.pad_id, self.device)
            out["ref_chosen"], out["ref_rejected"] = ref[:n], ref[n:]
        return out

    def loss(self, batch: list[int], generator: torch.Generator) -> torch.Tensor:
        m = self.margins(batch)
        beta = self.cfg.preference_beta
        if self.cfg.objective == "dpo":
            logits = (m["chosen"] - m["ref_chosen"]) - (m["rejected"] - m["ref_rejected"])
            return -F.logsigmoid(beta * logits).mean()
        # ORPO: NLL of the chosen answer + beta x -log sigmoid(log odds ratio)
        c, r = m["chosen_mean"], m["rejected_mean"]
        log_odds = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
        return (-c).mean() - beta * F.logsigmoid(log_odds).mean()
