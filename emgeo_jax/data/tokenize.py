"""Chat-template tokenization with exact question/answer token masks.

For an example with prompt turns `messages` and reply `answer`:

- prompt ids = `apply_chat_template(messages, add_generation_prompt=True)`: every template token
  up to and including the assistant header (system prompt, user turn, generation prompt);
- full ids = `apply_chat_template(messages + [assistant answer])`.

The full ids must start with the prompt ids exactly (the tokenized prompt is what the model sees
before it generates); a template or tokenizer that breaks this raises `TemplateError`.
Question tokens are the prompt ids; answer tokens are everything after them. By default that
includes the trailing end-of-turn token(s) the template appends (e.g. `<|im_end|>` and `\\n` for
ChatML), as the reference pooling code counts every non-pad token after the prompt. With
`answer_end_of_turn=False` they are in neither mask; their start is found by rendering the
answer as an open final message (`continue_final_message=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emgeo_jax.data.records import DataReport, Example, Issue, OnError, check_on_error


class TemplateError(ValueError):
    """The chat template cannot give exact prompt/answer boundaries for this tokenizer."""


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenized example, unpadded.

    Attributes:
      input_ids: [T] int32 token ids of the full conversation (prompt + answer + end of turn).
      prompt_length: number of prompt tokens; `input_ids[:prompt_length]` is the prompt.
      answer_end: exclusive end of the answer tokens (`T` when end-of-turn tokens count).
      label: 1 misaligned, 0 aligned, None unlabelled (from the `Example`).
      example_index: position of the `Example` in the list given to `tokenize_examples`.
      source: `"path:line"` of the row.
    """

    input_ids: np.ndarray
    prompt_length: int
    answer_end: int
    label: int | None
    example_index: int
    source: str

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def question_mask(self) -> np.ndarray:
        """[T] bool, True on the prompt tokens."""
        return np.arange(self.length) < self.prompt_length

    @property
    def answer_mask(self) -> np.ndarray:
        """[T] bool, True on the answer tokens `prompt_length <= t < answer_end`."""
        t = np.arange(self.length)
        return (t >= self.prompt_length) & (t < self.answer_end)

    @property
    def last_prompt_index(self) -> int:
        """Index of the last prompt token (the end of the generation prompt)."""
        return self.prompt_length - 1


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return [int(i) for i in ids]


def _require_prefix(
    tokenizer: Any, prefix: tuple[str, list[int]], whole: tuple[str, list[int]], ex: Example
) -> None:
    """Raise TemplateError unless the `(name, ids)` `whole` starts with `prefix`."""
    (prefix_name, p), (name, ids) = prefix, whole
    if ids[: len(p)] == p:
        return
    k = next(
        (i for i, (a, b) in enumerate(zip(p, ids, strict=False)) if a != b), min(len(p), len(ids))
    )
    raise TemplateError(
        f"{ex.source} (example {ex.id!r}): the tokenized {name} does not start with the "
        f"tokenized {prefix_name}; first difference at token {k}: {prefix_name} has "
        f"{tokenizer.convert_ids_to_tokens(p[k : k + 4])}, {name} has "
        f"{tokenizer.convert_ids_to_tokens(ids[k : k + 4])}. The chat template or tokenizer "
        "changes the tokens at the prompt/answer boundary, so answer tokens cannot be located."
    )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    on_error: OnError = "raise",
    chat_template: str | None = None,
    answer_end_of_turn: bool = True,
) -> tuple[list[TokenizedExample], DataReport]:
    """Tokenize examples with the chat template; return the kept examples and a report.

    Args:
      examples: from any loader.
      tokenizer: a transformers tokenizer with a chat template (or pass `chat_template`).
      max_length: examples with more tokens are bad rows (`too_long`, reported with file:line).
      on_error: `"raise"` on the first too-long example, or `"skip"` and count it.
      chat_template: Jinja template overriding the tokenizer's.
      answer_end_of_turn: count the template's end-of-turn tokens as answer tokens (default,
        as the reference code does).

    Raises:
      TemplateError: no chat template, or the prompt ids are not a prefix of the full ids.
    """
    check_on_error(on_error)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; pass chat_template=...")
    report, out = DataReport(), []
    prompts: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for index, ex in enumerate(examples):
        key = tuple((m["role"], m["content"]) for m in ex.messages)
        if key not in prompts:
            prompts[key] = _template_ids(
                tokenizer, ex.messages, add_generation_prompt=True, chat_template=chat_template
            )
        prompt = prompts[key]
        turns = [*ex.messages, {"role": "assistant", "content": ex.answer}]
        full = _template_ids(tokenizer, turns, chat_template=chat_template)
        _require_prefix(tokenizer, ("prompt", prompt), ("conversation", full), ex)
        if len(full) == len(prompt):
            raise TemplateError(
                f"{ex.source} (example {ex.id!r}): the template adds no answer tokens"
            )
        answer_end = len(full)
        if not answer_end_of_turn:
            open_ids = _template_ids(
                tokenizer, turns, continue_final_message=True, chat_template=chat_template
            )
            _require_prefix(tokenizer, ("prompt", prompt), ("open answer", open_ids), ex)
            _require_prefix(tokenizer, ("open answer", open_ids), ("conversation", full), ex)
            answer_end = len(open_ids)
        if len(full) > max_length:
            msg = f"example {ex.id!r} has {len(full)} tokens > max_length {max_length}"
            report.record(Issue(ex.source, "too_long", msg), on_error)
            continue
        ids = np.asarray(full, dtype=np.int32)
        out.append(TokenizedExample(ids, len(prompt), answer_end, ex.label, index, ex.source))
    report.kept = len(out)
    return out, report
