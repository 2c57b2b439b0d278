"""Helpers shared by the SAE subcommands: text batches for the model, and reading one vector."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from emgeo_jax.vectors.sae.model import SAEError


def read_texts(path: str | Path) -> list[str]:
    """Texts from a `.txt` file (one per non-empty line) or a `.jsonl` file (field `text`, or
    `question` + `answer`/`aligned`/`misaligned` joined by a newline, one text per answer)."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        row = json.loads(line)
        if "text" in row:
            texts.append(row["text"])
            continue
        answers = [row[k] for k in ("answer", "aligned", "misaligned") if k in row]
        if "question" not in row or not answers:
            raise SAEError(f"{path}:{i}: need 'text', or 'question' with an answer field")
        texts += [f"{row['question']}\n{a}" for a in answers]
    return texts


def token_batches(
    tokenizer, texts: list[str], batch_size: int, max_length: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(input_ids, attention_mask) [B, T]` right-padded to a fixed `max_length` (one compiled
    shape), truncated to `max_length` tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for s in range(0, len(texts), batch_size):
        enc = [
            tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
            for t in texts[s : s + batch_size]
        ]
        ids = np.full((batch_size, max_length), pad, np.int32)
        mask = np.zeros((batch_size, max_length), np.int32)
        for i, row in enumerate(enc):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        yield ids, mask


def read_vector(path: str | Path, key: str | None, layer: int | None) -> np.ndarray:
    """One direction `[D]` from a `.npy` or safetensors vector file: tensor `key` (default:
    the only one, or `direction`/`directions`); a `[L, D]` tensor gives row `layer`."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        key = key or next((k for k in ("direction", "directions") if k in tensors), None)
        key = key or (next(iter(tensors)) if len(tensors) == 1 else None)
        if key not in tensors:
            raise SAEError(f"{path}: choose a tensor with --vector_key among {sorted(tensors)}")
        arr = tensors[key]
    arr = np.asarray(arr, np.float32)
    if arr.ndim == 2:
        if layer is None or not 0 <= layer < arr.shape[0]:
            raise SAEError(f"{path}: [L, D] = {arr.shape} needs a layer in 0..{arr.shape[0] - 1}")
        arr = arr[layer]
    if arr.ndim != 1:
        raise SAEError(f"{path}: expected a vector [D] or [L, D], got {arr.shape}")
    return arr
