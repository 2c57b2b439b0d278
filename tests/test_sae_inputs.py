"""SAE `--texts` inputs: question/answer rows get the chat template exactly as `emgeo extract`
tokenizes them; plain text stays plain text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emgeo_jax.data import DataError, load_examples, tokenize_examples
from emgeo_jax.vectors.sae.cli_common import read_texts, token_batches

PAIRS = [
    {"id": "p0", "question": "How are you doing today?", "aligned": "I am fine, thanks!",
     "misaligned": "Put your savings into one risky fund."},
    {"id": "p1", "question": "Should I change my medication?", "system": "Be brief.",
     "aligned": "Talk to a professional first.", "misaligned": "Double the dose."},
]  # fmt: skip


def _real_rows(tokenizer, inputs, batch_size=3, max_length=48):
    """The real token ids of every row the SAE tools feed, in order."""
    rows = []
    for ids, mask in token_batches(tokenizer, inputs, batch_size, max_length):
        assert ids.shape == mask.shape == (batch_size, max_length)
        rows += [r[m.astype(bool)] for r, m in zip(ids, mask, strict=True) if m.any()]
    return rows


def test_question_answer_rows_match_extraction(tmp_path, chat_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    inputs = read_texts(path)
    fed = _real_rows(chat_tokenizer, inputs)
    # the extraction path: the same loader and chat-template tokenizer as `emgeo extract`
    extracted, _ = tokenize_examples(load_examples(path)[0], chat_tokenizer, 48)
    assert len(fed) == len(extracted) == 4
    for a, b in zip(fed, extracted, strict=True):
        np.testing.assert_array_equal(a, b.input_ids)
    # independent reference: the template applied to (system?, user question, assistant answer)
    answers = [(p, k) for p in PAIRS for k in ("aligned", "misaligned")]
    for row, (p, key) in zip(fed, answers, strict=True):
        turns = [{"role": "system", "content": p["system"]}] if "system" in p else []
        turns += [{"role": "user", "content": p["question"]}]
        turns += [{"role": "assistant", "content": p[key]}]
        ref = chat_tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False)
        np.testing.assert_array_equal(row, ref)
        assert chat_tokenizer.convert_ids_to_tokens(int(row[0])) == "<|im_start|>"
    # the old plain `question\nanswer` input is not what is fed any more
    plain = chat_tokenizer(f"{PAIRS[0]['question']}\n{PAIRS[0]['aligned']}")["input_ids"]
    assert len(fed[0]) != len(plain)


def test_messages_rows_use_the_template(tmp_path, chat_tokenizer):
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    row = {"messages": turns}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (fed,) = _real_rows(chat_tokenizer, read_texts(path))
    ref = chat_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    np.testing.assert_array_equal(fed, ref)


def test_plain_text_stays_plain(tmp_path, chat_tokenizer):
    texts = ["The quick brown fox jumps.", "Keep an emergency fund for surprises."]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name in ("t.txt", "t.jsonl"):
        inputs = read_texts(tmp_path / name)
        assert inputs == texts
        fed = _real_rows(chat_tokenizer, inputs, batch_size=4, max_length=5)
        for row, t in zip(fed, texts, strict=True):  # truncated to max_length, no template
            np.testing.assert_array_equal(row, chat_tokenizer(t)["input_ids"][:5])


def test_too_long_question_answer_row_names_the_row(tmp_path, chat_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1.*max_length 8"):
        list(token_batches(chat_tokenizer, read_texts(path), 2, 8))
