"""Merge a text run's PEFT adapter into its base model: the result is a plain transformers
folder of safetensors shards (``config.json``, ``model*.safetensors`` with an index when
sharded, the tokenizer with its chat template, ``generation_config.json``), what vLLM, TGI
and llama.cpp's ``convert_hf_to_gguf.py`` read. The record that pins the merge (kind
``derived``) is sealed by the CLI through :mod:`lora_kernel.trusted.derive`.

The base model is checked against the digest the run recorded before anything loads (a
base changed since the run would merge into other weights: :class:`VerificationError`, exit
5), and the merge is checked after: the merged model's logits on a probe are compared with
the adapter-on-base logits (``measured.max_abs_logit_diff``, recorded in the derived record).

Runs as: the user (``lora merge``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, VerificationError

MERGE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAX_SHARD_SIZE = "4GB"
PROBE = "What is the code for apple?"


def adapter_folder(record: Path, adapter_files) -> Path:
    """The PEFT adapter folder of a text run's record (the one holding adapter_config.json)."""
    for rel in sorted(adapter_files):
        if Path(rel).name == "adapter_config.json":
            return record / Path(rel).parent
    raise ConfigError(f"the record {record} holds no PEFT adapter (adapter_config.json); "
                      f"fix: lora merge takes a text run (task: text)", key="RUN")


def merge_text_adapter(base_model: str | os.PathLike[str], adapter: Path, out: Path, *,
                       dtype: str = "fp32", base_sha256: str | None = None) -> dict[str, Any]:
    """Write ``base_model`` with ``adapter`` merged into ``out`` (created; must not exist) in
    ``dtype`` (fp32, bf16, fp16); return what was measured."""
    import torch
    from peft import PeftModel

    from lora_kernel.training.models import load_causal_lm, model_sha256
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}",
                          key="--dtype")
    base = Path(base_model)
    if not base.is_dir():
        raise ConfigError(f"the run's base model {base} is gone; fix: restore it at that path",
                          key="base_model")
    if base_sha256:
        now = model_sha256(base)
        if now != base_sha256:
            raise VerificationError(f"the base model {base} changed since the run (sha256 "
                                    f"{now[:16]}…, the run recorded {base_sha256[:16]}…); "
                                    f"merging would combine the adapter with other weights")
    torch_dtype = getattr(torch, MERGE_DTYPES[dtype])
    model, tokenizer = load_causal_lm(base, dtype=torch_dtype)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    peft_model.eval()
    ids = _probe_ids(tokenizer)
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits.float()
        merged = peft_model.merge_and_unload()
        after = merged(input_ids=ids).logits.float()
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(str(out))
    return {"max_abs_logit_diff": float((before - after).abs().max()), "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir())}


def _probe_ids(tokenizer):
    """A short prompt's token ids (rendered as a user turn when the tokenizer has a chat
    template)."""
    import torch
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from lora_kernel.training.text_data import chat_prompt_ids
        return torch.tensor([chat_prompt_ids(PROBE, tokenizer, template)])
    return tokenizer(PROBE, return_tensors="pt").input_ids
