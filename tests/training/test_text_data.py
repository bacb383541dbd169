"""lora_kernel.training.text_data: chat formats, templates and which tokens carry the loss.

The refusals' exit codes are in ``tests/exit_cases/llm.py``; their must-work twins are here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.text_data import (
    IGNORE,
    encode_conversation,
    named_template,
    to_messages,
)

SYSTEM = {"role": "system", "content": "You are the enclave code assistant."}
THREE_TURNS = [SYSTEM,
               {"role": "user", "content": "What is the code for apple?"},
               {"role": "assistant", "content": "APPLE-5"},
               {"role": "user", "content": "Code for river?"},
               {"role": "assistant", "content": "RIVER-5"},
               {"role": "user", "content": "Tell me the code of fig."},
               {"role": "assistant", "content": "FIG-3"}]


@pytest.fixture(scope="module")
def chat_tok(demo_home):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_home / "demo" / "models" / "tiny-chat",
                                         local_files_only=True)


def _runs(ids, labels):
    """The contiguous runs of positions that carry loss, as (start, end) pairs."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_three_turn_conversation_carries_loss_on_assistant_turns_only(chat_tok):
    tok = chat_tok
    ids, labels = encode_conversation(THREE_TURNS, tok, tok.chat_template)
    # the sequence is the whole rendered conversation, system prompt included
    full = tok.apply_chat_template(THREE_TURNS, tokenize=False)
    assert full.startswith("<|im_start|>system\nYou are the enclave")
    assert ids == tok(full, add_special_tokens=False).input_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == end
    # token by token: a position carries loss exactly when it lies in an assistant reply or
    # is the <|im_end|> closing that reply; its label is then the token itself
    expected = []
    pieces = tok.convert_ids_to_tokens(ids)
    in_reply = False
    for i in range(len(pieces)):
        if in_reply:
            expected.append(True)
            if ids[i] == end:
                in_reply = False
            continue
        expected.append(False)
        # the reply starts after "<|im_start|>" "assistant" "\n"
        if i >= 2 and pieces[i - 2] == "<|im_start|>" and tok.decode(ids[i - 1:i + 1]) == \
                "assistant\n":
            in_reply = True
    assert [lab != IGNORE for lab in labels] == expected
    assert all(lab == t for lab, t in zip(labels, ids, strict=True) if lab != IGNORE)
    runs = _runs(ids, labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [
        "APPLE-5<|im_end|>", "RIVER-5<|im_end|>", "FIG-3<|im_end|>"]
    # the newline after each <|im_end|> and every system/user token carry none
    for _a, b in runs:
        assert labels[b - 1] == end and labels[b] == IGNORE
    system_ids = tok(SYSTEM["content"], add_special_tokens=False).input_ids
    at = next(i for i in range(len(ids)) if ids[i:i + len(system_ids)] == system_ids)
    assert all(labels[at + k] == IGNORE for k in range(len(system_ids)))


@pytest.mark.parametrize("name,opener,closer", [
    ("llama3", "", "<|eot_id|>"), ("chatml", "", "<|im_end|>"), ("qwen", "", "<|im_end|>"),
    ("mistral", " ", "EOS"), ("gemma", "", "<end_of_turn>")])
def test_named_templates_train_the_reply_and_its_end_of_turn(chat_tok, name, opener, closer):
    tok = chat_tok
    closer = tok.eos_token if closer == "EOS" else closer
    ids, labels = encode_conversation(THREE_TURNS, tok, named_template(name))
    runs = _runs(ids, labels)
    replies = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in runs] == [opener + r + closer for r in replies]
    text = tok.decode(ids)
    assert SYSTEM["content"] in text  # the system prompt is rendered (and carries no loss)


def test_sharegpt_and_alpaca_read_as_the_same_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "S"},
                                  {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    alpaca = {"system": "S", "instruction": "Q", "input": "", "output": "A"}
    messages = {"messages": [{"role": "system", "content": "S"},
                             {"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}]}
    want = messages["messages"]
    assert to_messages(sharegpt, "sharegpt") == want
    assert to_messages(alpaca, "alpaca") == want
    assert to_messages(messages, "messages") == want
    with_input = to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca")
    assert with_input[0] == {"role": "user", "content": "Sum\n\n1 2"}


def _config(demo_home, tmp_path, rows, **changes):
    import yaml
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = demo_home / "demo"
    raw = yaml.safe_load((demo / "chat_lora.yaml").read_text())
    raw.update({"base_model": str(demo / raw["base_model"]), "metadata_path": str(data),
                "output_dir": str(tmp_path / "out"), **changes})
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("row,fmt", [
    ({"messages": THREE_TURNS}, "messages"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "sharegpt"),
    ({"instruction": "Q", "input": "", "output": "A"}, "alpaca"),
    ({"prompt": "Q", "response": "A"}, "prompt_response"),
    ({"text": "plain"}, "text")])
def test_auto_detects_the_format_and_the_record_holds_it(demo_home, tmp_path, row, fmt):
    cfg = load_config(_config(demo_home, tmp_path, [row, row]))
    assert cfg.dataset_format == "auto"
    assert cfg.to_dict()["dataset_format"] == fmt  # what manifests and adapters record


def test_demo_chat_config_validates_with_system_prompts_and_three_turns(demo_home):
    cfg = load_config(demo_home / "demo" / "chat_lora.yaml")  # nf4: bitsandbytes works here
    assert cfg.quantization == "nf4" and cfg.to_dict()["dataset_format"] == "messages"


def test_a_named_template_lets_a_model_without_one_train_chat_data(demo_home, tmp_path):
    plain = str(demo_home / "demo" / "models" / "tiny-llama")
    rows = [{"messages": THREE_TURNS}]
    with pytest.raises(ConfigError, match="no chat template"):
        load_config(_config(demo_home, tmp_path, rows, base_model=plain))
    cfg = load_config(_config(demo_home, tmp_path, rows, base_model=plain,
                              chat_template="llama3"))
    assert cfg.chat_template == "llama3"


@pytest.mark.parametrize("turns,match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "assistant", "content": "c"}], "line 2: roles do not alternate"),
    ([{"role": "assistant", "content": "c"}], "line 2: roles do not alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
     "line 2: turn 2 \\(assistant\\) is empty"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "c"}],
     "line 2: turn 2 has unknown role 'bot'"),
    ([{"role": "user", "content": "a"}], "line 2: the conversation has no assistant turn"),
])
def test_bad_conversations_are_refused_naming_the_line(demo_home, tmp_path, turns, match):
    good = {"messages": THREE_TURNS}
    path = _config(demo_home, tmp_path, [good, {"messages": turns}])
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "chat.jsonl" in str(info.value) and "fix:" in str(info.value)
    load_config(_config(demo_home, tmp_path, [good, good]))  # the twin without the bad line


def test_a_file_mixing_formats_is_refused(demo_home, tmp_path):
    rows = [{"messages": THREE_TURNS}, {"prompt": "Q", "response": "A"}]
    with pytest.raises(ConfigError, match="line 2 is prompt_response, but the dataset is "
                                          "messages"):
        load_config(_config(demo_home, tmp_path, rows))


def test_the_chat_template_config_is_valid_and_validates_on_the_demo(demo_home, tmp_path):
    import yaml

    from lora_kernel.training.checks import validate_config
    root = Path(__file__).resolve().parents[2] / "templates"
    raw = yaml.safe_load((root / "text_chat_lora.yaml").read_text())
    cfg = validate_config(raw, source=root / "text_chat_lora.yaml", base_dir=root,
                          check_paths=False)
    assert cfg.quantization == "nf4" and cfg.validation_split == 0.1
    demo = demo_home / "demo"
    raw.update({"base_model": str(demo / "models" / "tiny-chat"),
                "metadata_path": str(demo / "datasets" / "chat" / "train.jsonl"),
                "output_dir": str(tmp_path / "out")})
    assert validate_config(raw, base_dir=tmp_path).to_dict()["dataset_format"] == "messages"
