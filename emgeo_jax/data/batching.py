"""Length-bucketed, fixed-shape numpy batches for jitted extraction.

Every batch has shape `[batch_size, T]` with `T` taken from a small set of bucket lengths, so
a jitted forward pass compiles once per bucket used, and the last batch of a bucket is padded
with empty rows rather than being smaller. Order is deterministic: buckets in increasing
length, examples within a bucket in input order.

Multi-host extraction: every process builds the same plan from the same data and takes the
batches `j` with `j % process_count == process_index`. Each bucket's batch count is padded to a
multiple of `process_count` with empty batches, so at every step all processes hold batches
of the same shape and run the same number of steps (as collectives over a global mesh need).

Empty rows (padding of the last batch, or empty batches) have `attention_mask` all 0,
`example_index` -1, `label` -1 and `last_prompt_index` 0. A model must not produce NaN on a
fully masked row (use a large finite negative, not -inf, for masked attention logits), and
poolers must ignore rows with `example_index == -1`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from emgeo_jax.data.tokenize import TokenizedExample

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= `length`; ValueError if none is."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}")


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    process_count: int = 1,
) -> list[tuple[int, list[int]]]:
    """The global batch plan: `[(T, example positions), ...]` (positions index `lengths`).

    At most `batch_size` positions per batch; each bucket's batch count is padded to a multiple
    of `process_count` with empty batches. `len(plan) // process_count` is the number of
    batches each process gets.
    """
    if batch_size < 1 or process_count < 1:
        raise ValueError(
            f"need batch_size >= 1 and process_count >= 1, got {batch_size}, {process_count}"
        )
    if not buckets or min(buckets) < 1:
        raise ValueError(f"buckets must be positive lengths, got {buckets}")
    groups: dict[int, list[int]] = {}
    for position, length in enumerate(lengths):
        groups.setdefault(bucket_length(length, buckets), []).append(position)
    plan: list[tuple[int, list[int]]] = []
    for t in sorted(groups):
        rows = groups[t]
        chunks = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
        chunks += [[] for _ in range(-len(chunks) % process_count)]
        plan += [(t, chunk) for chunk in chunks]
    return plan


def fit_buckets(
    lengths: Sequence[int],
    batch_size: int,
    max_buckets: int = 8,
    multiple: int = 16,
    process_count: int = 1,
) -> tuple[int, ...]:
    """The at most `max_buckets` bucket lengths (multiples of `multiple`) that minimise the
    padded tokens `plan_batches` computes for these `lengths`: each example's length rounds up
    to its bucket, and each bucket's last step is filled with empty rows (a step is
    `batch_size * process_count` rows). Few buckets bound the compilations; fitting them to the
    data keeps padding small (fixed powers of two pad a 70-token dataset to 128).

    Exact dynamic programming over the distinct rounded lengths; deterministic, so every
    process derives the same buckets from the same lengths."""
    if not lengths:
        raise ValueError("fit_buckets needs at least one length")
    if batch_size < 1 or process_count < 1 or max_buckets < 1 or multiple < 1:
        raise ValueError(
            f"need positive batch_size, process_count, max_buckets, multiple; got {batch_size}, "
            f"{process_count}, {max_buckets}, {multiple}"
        )
    rounded = -(-np.asarray(lengths, np.int64) // multiple) * multiple
    values, counts = np.unique(rounded, return_counts=True)
    m, step = len(values), batch_size * process_count
    before = np.concatenate([[0], np.cumsum(counts)])  # examples below values[j]
    # best[k][j]: fewest padded tokens covering values[:j] with k buckets, the last at values[j-1]
    best = np.full((max_buckets + 1, m + 1), np.inf)
    best[0, 0] = 0.0
    came_from = np.zeros((max_buckets + 1, m + 1), np.int64)
    for k in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            rows = -(-(before[j] - before[:j]) // step) * step  # bucket = values[a:j]
            cost = best[k - 1, :j] + rows * values[j - 1]
            came_from[k, j] = int(np.argmin(cost))
            best[k, j] = cost[came_from[k, j]]
    k = int(np.argmin(best[:, m]))  # fewest buckets among the cheapest plans
    chosen, j = [], m
    while k > 0:
        chosen.append(int(values[j - 1]))
        j, k = int(came_from[k, j]), k - 1
    return tuple(sorted(chosen))


def collate(
    examples: Sequence[TokenizedExample],
    length: int,
    batch_size: int,
    pad_id: int,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, np.ndarray]:
    """Pad `examples` (at most `batch_size`, each at most `length` tokens) into one batch.

    Returns (B = batch_size, T = length):
      input_ids [B, T] int32 (pad_id on padding), attention_mask [B, T] int32 (1 = real token),
      positions [B, T] int32 (0, 1, ... from each row's first real token; 0 on padding),
      question_mask [B, T] bool, answer_mask [B, T] bool,
      last_prompt_index [B] int32 (column of the last prompt token), example_index [B] int32,
      label [B] int32 (-1 = unlabelled or empty row).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
    shape = (batch_size, length)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "question_mask": np.zeros(shape, bool),
        "answer_mask": np.zeros(shape, bool),
        "last_prompt_index": np.zeros(batch_size, np.int32),
        "example_index": np.full(batch_size, -1, np.int32),
        "label": np.full(batch_size, -1, np.int32),
    }
    for row, ex in enumerate(examples):
        n = ex.length
        if n > length:
            raise ValueError(f"{ex.source}: {n} tokens do not fit a batch of length {length}")
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        batch["input_ids"][row, cols] = ex.input_ids
        batch["attention_mask"][row, cols] = 1
        batch["positions"][row, cols] = np.arange(n)
        batch["question_mask"][row, cols] = ex.question_mask
        batch["answer_mask"][row, cols] = ex.answer_mask
        batch["last_prompt_index"][row] = cols.start + ex.last_prompt_index
        batch["example_index"][row] = ex.example_index
        batch["label"][row] = -1 if ex.label is None else ex.label
    return batch


def make_batches(
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    padding_side: Literal["left", "right"] = "left",
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this process's fixed-shape batches (see `collate` for the arrays and shapes).

    `pad_id` is the tokenizer's pad id (or its EOS id when it has none); it is never attended
    to. With `process_count > 1`, process `process_index` gets every `process_count`-th batch of
    `plan_batches`, and all processes get the same number of batches with matching shapes.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    plan = plan_batches([ex.length for ex in tokenized], batch_size, buckets, process_count)
    for j, (length, positions) in enumerate(plan):
        if j % process_count == process_index:
            rows = [tokenized[p] for p in positions]
            yield collate(rows, length, batch_size, pad_id, padding_side)
