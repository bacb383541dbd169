"""Language-model cases: chat data that no template can train, quantization without its
backend, merges of runs that may not be merged. The must-work twins are in
``tests/training/test_text_data.py`` and ``tests/training/test_merge.py``."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from exit_cases import Case

SYSTEM = {"role": "system", "content": "Be brief."}


def _chat_config(c: Case, rows: list, **changes) -> Path:
    """The demo chat config reading ``rows`` (written as a .jsonl by the case)."""
    data = c.tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load((c.demo / "chat_lora.yaml").read_text())
    raw.update({"base_model": str((c.demo / raw["base_model"]).resolve()),
                "metadata_path": str(data), "output_dir": str(c.tmp / "out")})
    raw.update(changes)
    path = c.tmp / "chat.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _good() -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}


def _roles_not_alternating(c: Case) -> list:
    bad = {"messages": [SYSTEM, {"role": "user", "content": "hi"},
                        {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "hello"}]}
    return ["config", _chat_config(c, [_good(), bad])]


def _empty_assistant(c: Case) -> list:
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "  "}]}
    return ["config", _chat_config(c, [_good(), bad])]


def _unknown_role(c: Case) -> list:
    bad = {"messages": [{"role": "human", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    return ["config", _chat_config(c, [_good(), bad])]


def _no_chat_template(c: Case) -> list:
    plain_model = (c.demo / "models" / "tiny-llama").resolve()  # its tokenizer has no template
    return ["config", _chat_config(c, [_good()], base_model=str(plain_model))]


def _no_bitsandbytes(c: Case) -> list:
    c.monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    return ["config", _chat_config(c, [_good()], quantization="nf4")]


def _merge_unapproved(c: Case) -> list:
    c.make_run("r1", user="alice", kind="training")
    return ["merge", "r1", "--to", c.tmp / "merged"]


def _merge_tampered(c: Case) -> list:
    record = c.make_run("r1", user="alice", kind="training")
    adapter = record / "adapter" / "lora.safetensors"
    adapter.chmod(0o644)
    adapter.write_bytes(adapter.read_bytes() + b" ")
    return ["merge", "r1", "--to", c.tmp / "merged"]


def _merge_into_a_full_folder(c: Case) -> list:
    c.make_run("r1", user="alice", kind="training")
    (c.tmp / "merged").mkdir()
    (c.tmp / "merged" / "config.json").write_text("{}")
    return ["merge", "r1", "--to", c.tmp / "merged"]


def _init_adapter_other_rank(c: Case) -> list:
    folder = c.tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return ["config", _chat_config(c, [_good()], init_adapter=str(folder), lora_rank=8)]


def _chosen_without_rejected(c: Case) -> list:
    good = {"prompt": "Code for fig?", "chosen": "FIG-3", "rejected": "FIG-4"}
    return ["config", _chat_config(c, [good, {"prompt": "Code for fig?", "chosen": "FIG-3"}],
                                   objective="dpo")]


def _eval_path_other_format(c: Case) -> list:
    held = c.tmp / "held.jsonl"
    held.write_text(json.dumps({"prompt": "Q", "response": "A"}) + "\n")
    return ["config", _chat_config(c, [_good()], eval_path=str(held))]


CASES: dict[str, Callable[[Case], list]] = {
    "a chat dataset's roles do not alternate user/assistant": _roles_not_alternating,
    "a chat dataset has an empty assistant turn": _empty_assistant,
    "a chat dataset turn has an unknown role": _unknown_role,
    "chat data for a model without a chat template and no `chat_template` named":
        _no_chat_template,
    "`quantization: nf4` (or fp4, int8) without a usable bitsandbytes": _no_bitsandbytes,
    "`init_adapter` is not a PEFT LoRA folder of `lora_rank`": _init_adapter_other_rank,
    "a preference (`objective: dpo`/`orpo`) row has `chosen` but no `rejected`":
        _chosen_without_rejected,
    "`eval_path` is missing or in another format than the training data":
        _eval_path_other_format,
    "`lora merge` of a run whose adapter is not approved": _merge_unapproved,
    "`lora merge` of a run whose record does not verify (tampered)": _merge_tampered,
    "`lora merge --to` a folder that exists and is not empty": _merge_into_a_full_folder,
}
