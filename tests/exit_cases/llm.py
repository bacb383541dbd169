"""Language-model cases: chat data that no template can train, and quantization without its
backend. Each must-work twin is in ``tests/training/test_text_data.py``."""
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


CASES: dict[str, Callable[[Case], list]] = {
    "a chat dataset's roles do not alternate user/assistant": _roles_not_alternating,
    "a chat dataset has an empty assistant turn": _empty_assistant,
    "a chat dataset turn has an unknown role": _unknown_role,
    "chat data for a model without a chat template and no `chat_template` named":
        _no_chat_template,
    "`quantization: nf4` (or fp4, int8) without a usable bitsandbytes": _no_bitsandbytes,
}
