"""Datasets for activation extraction: loaders, chat-template tokenization with exact
question/answer masks, and length-bucketed fixed-shape batches.

Typical use::

    examples, report = load_examples(path, on_error="skip")   # or shipped_contrast_path()
    tokenized, report = tokenize_examples(examples, tokenizer, max_length=512)
    for batch in make_batches(tokenized, batch_size=8, pad_id=tokenizer.pad_token_id):
        ...  # batch["input_ids"] [B, T], batch["answer_mask"] [B, T], ...
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from emgeo_jax.data.batching import (
    DEFAULT_BUCKETS,
    bucket_length,
    collate,
    fit_buckets,
    make_batches,
    plan_batches,
)
from emgeo_jax.data.loaders import (
    detect_kind,
    judged_label,
    load_contrast_pairs,
    load_examples,
    load_judged,
    load_messages,
)
from emgeo_jax.data.records import ALIGNED, MISALIGNED, DataError, DataReport, Example, Issue
from emgeo_jax.data.tokenize import TemplateError, TokenizedExample, tokenize_examples


def shipped_contrast_path() -> Path:
    """Path of the contrast pairs shipped with the package (`em_contrast_v1.jsonl`: 72 pairs,
    24 each of medical, financial and general advice, with `id`, `domain`, `question`,
    `aligned`, `misaligned`)."""
    path = resources.files("emgeo_jax") / "resources" / "contrast" / "em_contrast_v1.jsonl"
    return Path(str(path))


__all__ = [
    "ALIGNED",
    "DEFAULT_BUCKETS",
    "MISALIGNED",
    "DataError",
    "DataReport",
    "Example",
    "Issue",
    "TemplateError",
    "TokenizedExample",
    "bucket_length",
    "collate",
    "detect_kind",
    "fit_buckets",
    "judged_label",
    "load_contrast_pairs",
    "load_examples",
    "load_judged",
    "load_messages",
    "make_batches",
    "plan_batches",
    "shipped_contrast_path",
    "tokenize_examples",
]
