"""Chat and instruction data for the text task: the dataset formats users already have, the
chat template each conversation is rendered with, and which tokens carry the loss.

Formats (``dataset_format``; ``auto`` detects it from the first record), one JSON object a line:

=================  ===========================================================================
messages           ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
                   (OpenAI)
sharegpt           ``{"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}``
alpaca             ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` and
                   ``system`` optional): one user turn, one assistant turn
prompt_response    ``{"prompt": "...", "response": "..."}`` (no template; loss on the response)
text               ``{"text": "..."}`` (no template; loss on every token)
preference         ``{"prompt" | "messages", "chosen", "rejected"}`` (``objective: dpo | orpo``;
                   :mod:`lora_kernel.training.text_pref`)
=================  ===========================================================================

The three conversation formats are rendered with the tokenizer's own ``chat_template``, or a
named one from ``templates/chat/`` (``chat_template: llama3 | chatml | qwen | mistral |
gemma``) when set. The loss covers only the assistant turns: each one's content and the
end-of-turn text the template puts after it (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ``</s>``), so the model learns to stop. System prompts and user turns are in
the sequence but carry no loss.

How the assistant spans are found works for any template without ``{% generation %}`` markers:
the conversation up to an assistant turn is rendered with ``add_generation_prompt``, then
through the end of that turn; the text between the two is the turn's span (trailing whitespace
left out). The whole conversation must start with each such rendering (a template that
rewrites earlier turns when later ones are added is refused), and every segment is tokenized on
its own, as the prompt is at inference.

Every refusal names the file, the line and the fix (:class:`ConfigError`, exit 2), and the
dataset is checked before any model loads (:func:`check_chat_dataset`).

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response", "text", "preference")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates" / "chat"
# chat_template name -> file in templates/chat
TEMPLATE_NAMES = {"llama3": "llama3", "chatml": "chatml", "qwen": "chatml",
                  "mistral": "mistral", "gemma": "gemma"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
IGNORE = -100


class BadRecord(ValueError):
    """A record that cannot be trained; ``fix`` says what to change. The caller names the
    file and line."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.problem, self.fix = problem, fix


# -- formats --------------------------------------------------------------------------------
def detect_format(rec: Any, cfg) -> str | None:
    """The format of one record, or None when it is none of :data:`FORMATS`."""
    if not isinstance(rec, dict):
        return None
    if "chosen" in rec or "rejected" in rec:
        return "preference"
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if cfg.prompt_column in rec and cfg.response_column in rec:
        return "prompt_response"
    if cfg.text_column in rec:
        return "text"
    return None


def dataset_lines(cfg) -> Iterator[tuple[Path, int, Any]]:
    """``(file, line number, parsed JSON)`` of every record of a text dataset, in order."""
    from lora_kernel.training.data import jsonl_lines, text_files
    for path in text_files(cfg):
        for lineno, line in jsonl_lines(path, source=cfg.source):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {lineno} is not JSON ({exc.msg}); fix: one "
                                  f"JSON object per line", file=cfg.source,
                                  key="metadata_path") from None
            yield path, lineno, rec


def resolve_format(cfg) -> str:
    """``dataset_format``, with ``auto`` resolved from the first record (and remembered on
    ``cfg`` so the manifest records the format trained)."""
    if cfg.dataset_format != "auto":
        return str(cfg.dataset_format)
    if getattr(cfg, "resolved_dataset_format", None):
        return str(cfg.resolved_dataset_format)
    for path, lineno, rec in dataset_lines(cfg):
        fmt = detect_format(rec, cfg)
        if fmt is None:
            keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise ConfigError(
                f"{path} line {lineno} has neither {cfg.text_column!r} nor "
                f"{cfg.prompt_column!r}+{cfg.response_column!r} nor a conversation (keys: "
                f"{keys}); fix: one JSON object per line with \"messages\" (OpenAI), "
                f"\"conversations\" (ShareGPT), \"instruction\"+\"output\" (Alpaca), "
                f"{cfg.prompt_column!r}+{cfg.response_column!r} or {cfg.text_column!r}, or set "
                f"text_column / prompt_column / response_column", file=cfg.source,
                key="text_column")
        cfg.resolved_dataset_format = fmt
        return fmt
    raise ConfigError("dataset is empty: no records; fix: add one JSON object per line",
                      file=cfg.source, key="metadata_path")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise BadRecord(f"{what} is {kind}, not a string", f"give {what} as text")
    return value


def to_messages(rec: Any, fmt: str) -> list[dict[str, str]]:
    """The conversation of one record of a conversation format, as
    ``[{"role", "content"}, ...]``, checked (:func:`check_conversation`)."""
    if not isinstance(rec, dict):
        raise BadRecord("the line is not a JSON object", "one JSON object per line")
    if fmt == "alpaca":
        user = _text(rec.get("instruction"), "'instruction'")
        extra = rec.get("input") or ""
        if extra:
            user += "\n\n" + _text(extra, "'input'")
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(rec.get("output"), "'output'")}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], "'system'")})
    else:
        field_, role_key, text_key = (("messages", "role", "content") if fmt == "messages"
                                      else ("conversations", "from", "value"))
        turns = rec.get(field_)
        if not isinstance(turns, list) or not turns:
            raise BadRecord(f"{field_!r} is not a non-empty list of turns",
                            f"give {field_!r} as a list of {{\"{role_key}\": ..., "
                            f"\"{text_key}\": ...}} objects")
        msgs = []
        known = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                raise BadRecord(f"turn {i} is not an object", f"write turn {i} as "
                                f"{{\"{role_key}\": ..., \"{text_key}\": ...}}")
            role = turn.get(role_key)
            if role not in known:
                raise BadRecord(f"turn {i} has unknown role {role!r} (key {role_key!r})",
                                f"use one of {', '.join(known)}")
            if fmt == "sharegpt":
                role = SHAREGPT_ROLES[role]
            msgs.append({"role": role,
                         "content": _text(turn.get(text_key), f"turn {i}'s {text_key!r}")})
    check_conversation(msgs)
    return msgs


def check_conversation(msgs: list[dict[str, str]]) -> None:
    """Refuse (:class:`BadRecord`) a conversation that templates cannot render or that trains
    nothing: a system prompt anywhere but first, roles that do not alternate user/assistant
    (starting with the user), no assistant turn, an empty assistant turn."""
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    body = msgs[start:]
    if not body:
        raise BadRecord("the conversation has no user or assistant turn",
                        "add a user turn and the assistant's answer")
    for i, msg in enumerate(body, start=start + 1):
        want = "user" if (i - start) % 2 == 1 else "assistant"
        if msg["role"] != want:
            where = ("a system prompt after the first turn" if msg["role"] == "system"
                     else f"turn {i} is {msg['role']!r} where the template expects {want!r}")
            raise BadRecord(f"roles do not alternate user/assistant: {where}",
                            "start with the user (after an optional system prompt), then "
                            "alternate user and assistant; merge consecutive turns of one role")
        if want == "assistant" and not msg["content"].strip():
            raise BadRecord(f"turn {i} (assistant) is empty", "give the assistant's answer, "
                            "or end the conversation at the turn before")
    if len(body) < 2:
        raise BadRecord("the conversation has no assistant turn (nothing to train)",
                        "add the assistant's answer")


# -- templates ------------------------------------------------------------------------------
def named_template(name: str) -> str:
    """The text of a chat template of ``templates/chat/`` by name (``chat_template`` key)."""
    return (CHAT_TEMPLATE_DIR / f"{TEMPLATE_NAMES[name]}.jinja").read_text(encoding="utf-8")


def model_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a model folder's tokenizer carries (``chat_template.jinja`` or the
    ``chat_template`` of ``tokenizer_config.json``), read without loading the tokenizer."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = conf.get("chat_template") if isinstance(conf, dict) else None
    if isinstance(value, list):  # several named templates: the "default" one
        value = next((t.get("template") for t in value if isinstance(t, dict)
                      and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value.strip() else None


def template_text(cfg, tokenizer=None) -> str | None:
    """The chat template this run renders with: the named one (``chat_template``), else the
    tokenizer's (or the model folder's), else None."""
    if cfg.chat_template:
        return named_template(cfg.chat_template)
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, str) and own.strip():
        return own
    return model_chat_template(cfg.base_model)


def _no_template(cfg, fmt: str, path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is {fmt} data (conversations), but the model {cfg.base_model} has no chat "
        f"template and none is named; fix: set chat_template to one of "
        f"{', '.join(TEMPLATE_NAMES)} (the format the model was or will be tuned in), or use "
        f"a model whose tokenizer has a chat_template", file=cfg.source, key="chat_template")


def check_chat_dataset(cfg, file: str, fmt: str) -> int:
    """Check every record of a conversation-format dataset (before any model loads); return
    the number of records. Each refusal names the file, line and fix."""
    n = 0
    for path, lineno, rec in dataset_lines(cfg):
        if n == 0 and template_text(cfg) is None:
            raise _no_template(cfg, fmt, path)
        got = detect_format(rec, cfg)
        if got != fmt:
            raise ConfigError(f"{path} line {lineno} is {got or 'in no known format'}, but the "
                              f"dataset is {fmt} (from its first line or dataset_format); "
                              f"fix: write every line in one format", file=file,
                              key="metadata_path")
        try:
            to_messages(rec, fmt)
        except BadRecord as exc:
            raise ConfigError(f"{path} line {lineno}: {exc}", file=file,
                              key="metadata_path") from None
        n += 1
    return n


# -- rendering and loss masks ---------------------------------------------------------------
def _render(tokenizer, template: str, msgs, *, generation: bool) -> str:
    out = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                        add_generation_prompt=generation)
    return out if isinstance(out, str) else str(out)


def render_segments(msgs: list[dict[str, str]], tokenizer, template: str
                    ) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trains)`` segments: ``trains`` marks each
    assistant turn's content and end-of-turn text (see the module docstring)."""
    full = _render(tokenizer, template, msgs, generation=False)
    segments: list[tuple[str, bool]] = []
    at = 0
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, template, msgs[:i], generation=True)
        upto = _render(tokenizer, template, msgs[:i + 1], generation=False)
        if not (upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= at):
            raise BadRecord("the chat template renders earlier turns differently once later "
                            "turns are added, so the assistant turns cannot be located",
                            "name a template that renders turn by turn (chat_template: "
                            + " | ".join(TEMPLATE_NAMES) + ")")
        end = len(upto.rstrip())
        segments.append((full[at:len(prefix)], False))
        segments.append((full[len(prefix):end], True))
        at = end
    segments.append((full[at:], False))
    return [(t, trains) for t, trains in segments if t]


def encode_conversation(msgs: list[dict[str, str]], tokenizer, template: str
                        ) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) of one conversation."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trains in render_segments(msgs, tokenizer, template):
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(seg)
        labels.extend(seg if trains else [IGNORE] * len(seg))
    return ids, labels


def encode_chat_records(cfg, tokenizer, fmt: str) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of every record of a conversation-format dataset."""
    from jinja2.exceptions import TemplateError

    template = template_text(cfg, tokenizer)
    out = []
    for path, lineno, rec in dataset_lines(cfg):
        if template is None:
            raise _no_template(cfg, fmt, path)
        try:
            out.append(encode_conversation(to_messages(rec, fmt), tokenizer, template))
        except BadRecord as exc:
            raise ConfigError(f"{path} line {lineno}: {exc}", file=cfg.source,
                              key="metadata_path") from None
        except TemplateError as exc:  # raise_exception(...) in the template, or its bug
            raise ConfigError(f"{path} line {lineno}: the chat template refused the "
                              f"conversation ({exc}); fix: write the turns as the template "
                              f"requires, or name another chat_template", file=cfg.source,
                              key="metadata_path") from None
    return out


def chat_prompt_ids(prompt: str, tokenizer, template: str) -> list[int]:
    """The token ids of ``prompt`` as one user turn, rendered up to the assistant's answer
    (what sampling generates from)."""
    text = _render(tokenizer, template, [{"role": "user", "content": prompt}], generation=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def first_user_prompts(cfg, fmt: str, n: int = 3) -> list[str]:
    """The first user turn of the first ``n`` records (default sample prompts)."""
    out = []
    for _, _, rec in dataset_lines(cfg):
        try:
            msgs = to_messages(rec, fmt)
        except BadRecord:
            continue
        out.append(next(m["content"] for m in msgs if m["role"] == "user"))
        if len(out) >= n:
            break
    return out


def check_eval_path(cfg, file: str) -> None:
    """``eval_path`` must be a JSON Lines file in the training data's format."""
    if not cfg.eval_path:
        return
    path = Path(cfg.eval_path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}; fix: point eval_path at a .jsonl file of "
                          f"held-out records, or use validation_split", file=file,
                          key="eval_path")
    from dataclasses import replace
    held = replace(cfg, metadata_path=str(path), train_data_dir=None, dataset_format="auto",
                   eval_path=None, resolved_dataset_format=None)
    fmt, want = resolve_format(held), resolve_format(cfg)
    if fmt != want:
        raise ConfigError(f"{path} is {fmt} data but the training data is {want}; fix: "
                          f"held-out records in the training data's format", file=file,
                          key="eval_path")
    if fmt in CHAT_FORMATS:
        check_chat_dataset(held, file, fmt)
