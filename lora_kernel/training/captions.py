"""Caption habits of kohya users, applied per training step: ``shuffle_caption`` with
``keep_tokens`` / ``keep_tokens_separator`` (the trigger word stays first),
``caption_dropout_rate`` (the whole caption), ``caption_tag_dropout_rate`` (each tag after the
kept ones) and ``caption_separator`` (a caption written with the full-width ``，`` of Chinese
captions splits as one with ``,``).

kohya's order: the whole caption is dropped first; otherwise its tags are split into a fixed
and a flexible part, the flexible part shuffled, then thinned by tag dropout, and everything
joined with ``", "``. All randomness comes from a ``random.Random`` the task seeds from the
loop's generator, so a run is deterministic under ``seed`` and resumes exactly.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

import random
import re

FULL_WIDTH_COMMA = "\uff0c"


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The non-empty, stripped tags of ``caption`` (``,`` also splits at ``，``)."""
    seps = [separator] + ([FULL_WIDTH_COMMA] if separator == "," else [])
    pattern = "|".join(re.escape(s) for s in seps)
    return [t.strip() for t in re.split(pattern, caption) if t.strip()]


class CaptionHabits:
    """The caption transformations of a config (``active``: any of them is on)."""

    def __init__(self, cfg) -> None:
        self.shuffle = bool(cfg.shuffle_caption)
        self.keep = int(cfg.keep_tokens)
        self.keep_separator = cfg.keep_tokens_separator
        self.separator = cfg.caption_separator
        self.dropout = float(cfg.caption_dropout_rate)
        self.tag_dropout = float(cfg.caption_tag_dropout_rate)
        self.active = self.shuffle or self.dropout > 0 or self.tag_dropout > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """``caption`` as the text encoder sees it this step."""
        if not self.active:
            return caption
        if self.dropout > 0 and rng.random() < self.dropout:
            return ""
        if self.keep_separator and self.keep_separator in caption:
            fixed_text, flex_text = caption.split(self.keep_separator, 1)
            fixed, flex = split_tags(fixed_text, self.separator), split_tags(flex_text,
                                                                             self.separator)
        else:
            tags = split_tags(caption, self.separator)
            fixed, flex = tags[:self.keep], tags[self.keep:]
        if self.shuffle:
            rng.shuffle(flex)
        if self.tag_dropout > 0:
            flex = [t for t in flex if rng.random() >= self.tag_dropout]
        return ", ".join(fixed + flex)

    def captions(self, texts: list[str], seed: int) -> list[str]:
        """``texts`` (one batch) as seen this step, drawn from ``random.Random(seed)``."""
        rng = random.Random(seed)
        return [self.apply(t, rng) for t in texts]


def keep_tokens_warnings(cfg, entries: list[tuple[str, str, str]]) -> list[str]:
    """One warning per caption with fewer tags than ``keep_tokens`` (then every tag stays in
    place and nothing of it is shuffled or dropped): ``entries`` are (where, name, caption)."""
    if not cfg.keep_tokens or not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate):
        return []
    out = []
    for where, name, caption in entries:
        if cfg.keep_tokens_separator and cfg.keep_tokens_separator in caption:
            continue
        n = len(split_tags(caption, cfg.caption_separator))
        if n < cfg.keep_tokens:
            out.append(f"{where}: the caption of {name!r} has {n} tag(s), fewer than "
                       f"keep_tokens: {cfg.keep_tokens}, so none of it is shuffled or dropped; "
                       f"fix: lower keep_tokens or separate its tags with "
                       f"{cfg.caption_separator!r}")
    return out
