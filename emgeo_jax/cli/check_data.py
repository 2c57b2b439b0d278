"""`emgeo check-data PATH [--kind] [--on_error] [--tokenizer DIR --max_length N]`.

Loads a dataset (contrast pairs, judged responses or chat messages), prints the report (kept,
skipped rows with file:line and reason, class counts) and, with `--tokenizer`, the token length
statistics and the batch shapes extraction would compile.

Formats (JSONL, one object per line; `--kind auto` tells them apart by their keys):

- contrast pairs: `{"id": "med-1", "question": "...", "aligned": "...", "misaligned": "..."}`,
  keys `question`, `aligned`, `misaligned` required, `id` and `system` optional (other keys,
  e.g. `domain`, ignored); each pair gives an aligned (label 0) and a misaligned (label 1)
  example with the same prompt. The shipped set: emgeo_jax/resources/contrast/.
- judged responses (JSONL or CSV): `question`, `answer` (or `response`), `aligned`,
  `coherent` (0..100, empty = no score); classed coherent > 50 and aligned > 70 (aligned) or
  <= 30 (misaligned), balanced.
- chat messages: `{"messages": [{"role", "content"}, ...], "label": 0|1}`, the last turn the
  assistant answer.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from emgeo_jax.data.batching import fit_buckets, plan_batches
from emgeo_jax.data.loaders import load_examples
from emgeo_jax.data.tokenize import tokenize_examples

_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "contrast", "judged", "messages"], "format")
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "raise"], "bad rows: skip or stop")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "local tokenizer folder (optional)")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "longest allowed sequence in tokens")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "batch size for the batch plan")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: emgeo check-data PATH [--kind] [--on_error] [--tokenizer DIR]")
    examples, report = load_examples(argv[1], _KIND.value, _ON_ERROR.value)
    print(f"{argv[1]}: {report.summary()}")
    for issue in report.skipped:
        print(f"  {issue}")
    if _TOKENIZER.value is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_TOKENIZER.value)
    tokenized, tok_report = tokenize_examples(
        examples, tokenizer, _MAX_LENGTH.value, _ON_ERROR.value
    )
    print(f"tokenized: {tok_report.summary()}")
    for issue in tok_report.skipped:
        print(f"  {issue}")
    if not tokenized:
        return
    lengths = np.array([t.length for t in tokenized])
    answers = np.array([t.answer_mask.sum() for t in tokenized])
    print(f"tokens per example: min {lengths.min()} mean {lengths.mean():.1f} max {lengths.max()}")
    print(f"answer tokens: min {answers.min()} mean {answers.mean():.1f} max {answers.max()}")
    buckets = fit_buckets(lengths.tolist(), _BATCH_SIZE.value)  # what `emgeo extract` uses
    plan = plan_batches(lengths.tolist(), _BATCH_SIZE.value, buckets)
    shapes = sorted({t for t, _ in plan})
    print(f"{len(plan)} batches of {_BATCH_SIZE.value}, lengths {shapes}")
