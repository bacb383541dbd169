"""Packing keeps examples apart: whole examples share a sequence, position ids restart per
example and attention is block-diagonal, so the packed loss equals the unpacked loss of the
same examples; an example longer than max_seq_length is truncated with a warning naming it."""
from __future__ import annotations

import logging

import pytest
import torch

from lora_kernel.training.checks import load_config
from lora_kernel.training.models import load_causal_lm
from lora_kernel.training.text import IGNORE, TextTask, build_sequences, pack_examples


def _task(demo_home, tmp_path, **changes):
    lines = (demo_home / "demo" / "datasets" / "chat" / "train.jsonl").read_text().splitlines()
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines[:10]) + "\n")
    cfg = load_config(demo_home / "demo" / "chat_lora.yaml",
                      {"metadata_path": str(data), "quantization": "none",
                       "output_dir": str(tmp_path / "out"), "max_seq_length": 160, **changes})
    model, tok = load_causal_lm(cfg.base_model)
    return TextTask(cfg, model, tok, device=torch.device("cpu"))


def test_packed_loss_equals_unpacked_loss_on_the_same_examples(demo_home, tmp_path):
    packed = _task(demo_home, tmp_path, packing=True)
    plain = _task(demo_home, tmp_path, packing=False)
    assert len(packed.sequences) < len(plain.sequences) == 10  # examples do share sequences
    assert packed.tokens == plain.tokens  # the same label tokens, none cut
    gen = torch.Generator()
    with torch.no_grad():
        lp = packed.loss(list(range(len(packed.sequences))), gen)
        lu = plain.loss(list(range(len(plain.sequences))), gen)
    torch.testing.assert_close(lp, lu, atol=1e-5, rtol=1e-5)
    # the control: the same packed rows attending across examples give another loss
    seqs = packed.sequences
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), packed.pad_id)
    labels = torch.full((len(seqs), n), IGNORE)
    for row, (i, lab) in enumerate(seqs):
        ids[row, :len(i)], labels[row, :len(lab)] = i, lab
    with torch.no_grad():
        leaky = packed.model(input_ids=ids, attention_mask=(labels != -999).long(),
                             labels=labels).loss
    assert abs(leaky.item() - lu.item()) > 1e-3


def test_every_example_is_whole_in_one_sequence_and_positions_restart(demo_home, tmp_path):
    task = _task(demo_home, tmp_path, packing=True)
    for s in task.sequences:
        assert len(s[0]) <= 160
        starts = (s.positions == 0).nonzero().flatten().tolist()
        ends = starts[1:] + [len(s[0])]
        for a, b in zip(starts, ends, strict=True):  # each block is one whole conversation
            assert task.tokenizer.decode(s[0][a:b]).startswith("<|im_start|>system")
            assert s.positions[a:b].tolist() == list(range(b - a))


def test_an_example_longer_than_max_seq_length_is_truncated_with_a_warning(
        demo_home, tmp_path, caplog):
    cfg = load_config(demo_home / "demo" / "text_lora.yaml", {"packing": True,
                                                               "max_seq_length": 8})
    records = [([1] * 5, [IGNORE] + [1] * 4), ([2] * 12, [IGNORE] + [2] * 11), ([3] * 3,
                                                                           [IGNORE, 3, 3])]
    with caplog.at_level(logging.WARNING):
        seqs = build_sequences(cfg, records, pad_id=0)
    assert "record 2 of the dataset has 12 tokens" in caplog.text
    assert sorted(len(s[0]) for s in seqs) == [8, 8]  # 12 -> 8 alone; 5 + 3 share one
    assert pack_examples([5, 12, 3], 16) == [[1, 2], [0]]


@pytest.mark.parametrize("lengths", [[3, 3, 3], [10], []])
def test_first_fit_never_exceeds_the_limit(lengths):
    for group in pack_examples(lengths, 10):
        assert sum(lengths[i] for i in group) <= 10
