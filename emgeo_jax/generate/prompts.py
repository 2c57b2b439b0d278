"""Prompts into padded token rows: chat templating, EOS ids, left padding to buckets.

A prompt is a user string or a list of `{"role", "content"}` chat messages. `chat_token_ids`
applies the tokenizer's chat template with the generation prompt; `left_pad` right-aligns the
token rows into `ids, mask [B, T]` with `T` rounded up to `PAD_MULTIPLE` (so prompt sets of
similar length share a compiled program); `pad_prompts` appends copies of the last prompt so
the row count splits evenly over a mesh's `data x fsdp` devices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.models.lm import LM
from emgeo_jax.models.steering import Steering

PAD_MULTIPLE = 32
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")

Prompt = str | Sequence[dict[str, str]]


def eos_token_ids(lm: LM) -> list[int]:
    """EOS ids: the tokenizer's eos, its chat end tokens, and `generation_config.json`'s
    `eos_token_id` when the model came from an HF folder."""
    tok = lm.tokenizer
    ids = set()
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    gen_cfg = Path(lm.source) / "generation_config.json" if lm.source else None
    if gen_cfg is not None and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(ids)


def with_system(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    """Chat turns for a prompt (a user string or turns), with a `system` turn first when
    given and the prompt has none."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and turns and turns[0].get("role") != "system":
        turns = [{"role": "system", "content": system}, *turns]
    return turns


def chat_token_ids(
    tokenizer: Any, prompts: Sequence[Prompt], system: str | None
) -> list[list[int]]:
    """Apply the chat template (with the generation prompt) to each prompt: a user string or
    a list of `{"role", "content"}` messages; `system` is prepended when the prompt has none."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass token ids instead")
    out = []
    for i, prompt in enumerate(prompts):
        messages = with_system(prompt, system)
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"prompt {i}: give a string or a non-empty list of chat messages")
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append([int(t) for t in ids])
    return out


def left_pad(
    rows: Sequence[Sequence[int]], multiple: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`ids, mask [B, T]` int32, right-aligned, T = max length rounded up to `multiple`."""
    t = multiple * math.ceil(max(len(r) for r in rows) / multiple)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, t - len(r) :] = r
            mask[i, t - len(r) :] = 1
    return ids, mask


def pad_prompts(lm: LM, prompts: Sequence[Any]) -> list[Any]:
    """`prompts` with copies of the last one appended until their count is a multiple of
    `lm.batch_multiple` (`data x fsdp` of `lm.mesh`; unchanged without a mesh). Drop the
    outputs of the added rows (`[:len(prompts)]`)."""
    prompts = list(prompts)
    return prompts + prompts[-1:] * (-len(prompts) % lm.batch_multiple)


def pad_steering(steering: Steering, prompts: int, rows: int) -> Steering:
    """`steering` for `prompts` prompts padded to `rows` rows by `pad_prompts`: a per-row
    steering (`Steering.per_row`) must name one intervention per prompt, and the added rows
    repeat the last one's; a shared steering is returned as is."""
    if steering.variant is not None and len(steering.variant) != prompts:
        raise ValueError(
            f"per-row steering names {len(steering.variant)} rows for {prompts} prompts"
        )
    return steering.padded_rows(rows)
