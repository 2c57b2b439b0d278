"""Training and dissection data: examples from any loader, filtered by class and topic, and a
deterministic, resumable order of fixed-shape batches.

Topics come from a `"domain"` (or `"topic"`) field of each example's source row (the shipped
contrast pairs carry `domain`: medical, financial, general); the loaders keep `source`
(`"path:line"`), so the field is read back from the file rather than added to `Example`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.data import Example, TokenizedExample, bucket_length, collate, load_examples


def row_field(examples: Sequence[Example], field: str) -> list[Any]:
    """The value of `field` (None if absent) in the JSONL row each example came from."""
    cache: dict[str, list[str]] = {}
    out = []
    for ex in examples:
        path, _, line = ex.source.rpartition(":")
        if path not in cache:
            cache[path] = Path(path).read_text(encoding="utf-8-sig").splitlines()
        row = json.loads(cache[path][int(line) - 1])
        out.append(row.get(field) if isinstance(row, dict) else None)
    return out


def topics(examples: Sequence[Example]) -> list[str | None]:
    """Each example's topic: the row's `domain`, else its `topic`, else None."""
    domain, topic = row_field(examples, "domain"), row_field(examples, "topic")
    return [d if d is not None else t for d, t in zip(domain, topic, strict=True)]


def load_training_examples(
    path: str | Path,
    kind: str = "auto",
    label: int | None = None,
    topic: str | None = None,
) -> list[Example]:
    """Examples of `path` (any loader format), keeping only class `label` (1 misaligned,
    0 aligned; None = all) and topic `topic` (None = all). Contrast pairs with `label=1` give
    the misaligned answers: the narrow bad dataset of an EM organism."""
    examples, _ = load_examples(path, kind=kind)
    if label is not None:
        examples = [ex for ex in examples if ex.label == label]
    if topic is not None:
        examples = [ex for ex, t in zip(examples, topics(examples), strict=True) if t == topic]
    if not examples:
        raise ValueError(f"{path}: no examples with label={label} and topic={topic!r}")
    return examples


def batch_order(n: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Example positions of the `index`-th batch of an endless stream of epochs, each a
    fresh permutation (`default_rng([seed, epoch])`); a short last batch is padded later.
    A pure function of its arguments, so a resumed run sees the same batches."""
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(index, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def train_batch(
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    seed: int,
    index: int,
    pad_id: int,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """The `index`-th training batch (see `collate`), right-padded to `length` (default: the
    bucket of the longest example, so every batch has one shape)."""
    if length is None:
        length = bucket_length(max(ex.length for ex in tokenized))
    rows = [tokenized[p] for p in batch_order(len(tokenized), batch_size, seed, index)]
    return collate(rows, length, batch_size, pad_id, padding_side="right")
