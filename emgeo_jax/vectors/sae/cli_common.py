"""Helpers shared by the SAE subcommands: model inputs for `--texts`, model calls whose results
every process holds (`on_host`), and reading one vector.

`--texts` (`emgeo sae-check`, `emgeo sae-features --method steering`) takes either

- question/answer data: a contrast-pair, judged-response or chat-messages file (JSONL, or CSV
  for judged responses), read by `emgeo_jax.data.load_examples` and tokenized by
  `tokenize_examples` with the chat template (user question, assistant answer), prompt-prefix
  check included. These are exactly the rows and token ids `emgeo extract` sees for the same
  file (judged files keep extraction's class filter and balancing), so SAE statistics come
  from the distribution the contrast vectors were built on; or
- plain text: a `.txt` file (one text per non-empty line) or a JSONL file whose rows have a
  `text` field, tokenized as is with the tokenizer's default special tokens (e.g. Llama's BOS,
  nothing for Qwen), no chat template.

Token positions: the SAE statistics run over every real token of these sequences (template,
question and answer tokens; padding excluded): steering adds the vector at every position (the
reference default) and the SAE must reconstruct every position the model reads. Sequences
longer than `max_length` are an error for question/answer rows (as in `emgeo extract`) and
truncated for plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from emgeo_jax.data import Example, TokenizedExample, collate, load_examples, tokenize_examples
from emgeo_jax.hosts import to_host
from emgeo_jax.runs import iter_jsonl
from emgeo_jax.vectors.sae.model import SAEError

SAEInput = str | Example


def _has_text_rows(path: Path) -> bool:
    """True when the first JSON object of the JSONL file `path` has a `text` field."""
    for _, row in iter_jsonl(path, SAEError, encoding="utf-8-sig"):
        return "text" in row
    raise SAEError(f"{path}: no rows")


def read_texts(path: str | Path) -> list[SAEInput]:
    """The model inputs of `path` (see the module docstring): plain strings for `.txt` files and
    JSONL `text` rows, `Example`s (prompt turns + answer) for question/answer data."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise SAEError(
            f"{path}: unknown texts file type '{path.suffix}'; use .txt (one text per line), "
            ".jsonl (`text` rows or question/answer data) or .csv (judged responses)"
        )
    if path.suffix.lower() == ".jsonl" and _has_text_rows(path):
        texts = []
        for i, row in iter_jsonl(path, SAEError, encoding="utf-8-sig"):
            if not isinstance(row.get("text"), str):
                raise SAEError(f"{path}:{i}: every row needs a string 'text' field")
            texts.append(row["text"])
        return texts
    examples, _ = load_examples(path)
    return examples


def _tokenize(tokenizer, inputs: Sequence[SAEInput], max_length: int) -> list[TokenizedExample]:
    """Chat-template tokenization of `Example`s (`tokenize_examples`, as `emgeo extract`) and
    plain tokenization of strings (truncated to `max_length`), in input order."""
    examples = [x for x in inputs if isinstance(x, Example)]
    chat = iter(tokenize_examples(examples, tokenizer, max_length)[0]) if examples else iter(())
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, Example):
            out.append(next(chat))
            continue
        ids = np.asarray(tokenizer(x)["input_ids"][:max_length], np.int32)
        out.append(TokenizedExample(ids, 0, len(ids), None, i, f"text {i}"))
    return out


def token_batches(
    tokenizer, inputs: Sequence[SAEInput], batch_size: int, max_length: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(input_ids, attention_mask) [B, T]` (`B = batch_size`, `T = max_length`: one compiled
    shape), right-padded by `emgeo_jax.data.collate`; the last batch is filled with empty rows.
    `inputs` from `read_texts`: `Example`s get the chat template, strings are plain text."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = _tokenize(tokenizer, inputs, max_length)
    for s in range(0, len(rows), batch_size):
        batch = collate(rows[s : s + batch_size], max_length, batch_size, pad, "right")
        yield batch["input_ids"], batch["attention_mask"]


def on_host(fn: Callable[..., object]) -> Callable[..., np.ndarray]:
    """`fn` (a `vectors.sae.runner` `ResidFn` / `NllFn`, whose results live on the model's
    mesh) with its result as a whole numpy array on every process (`hosts.to_host`: a local
    copy on one process, gathered from every process's rows under `jax.distributed`, where
    every process makes the same calls). The SAE statistics then run on host arrays, so
    `emgeo sae-check` / `sae-features` give the same figures on any number of processes."""

    def host_fn(*args, **kwargs) -> np.ndarray:
        return to_host(fn(*args, **kwargs))

    return host_fn
