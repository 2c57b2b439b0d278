"""Whole-number logprobs (`emgeo_jax.generate.numbers`) against brute force: for every number
0..100, one plain uncached forward over prompt + its digits, numpy log-softmax, the digits'
logprobs summed plus the log of the next token's non-digit mass. The tiny chat tokenizer
spells numbers digit by digit, as SmolLM2's does."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

import emgeo_jax
from emgeo_jax.generate import (
    JUDGE_NUMBERS,
    NumberTrie,
    chat_token_ids,
    number_logprobs,
    number_trie,
)
from emgeo_jax.models.steering import Steering
from emgeo_jax.serve import TokenText
from tests.tiny_models import LLAMA, hf_model, save_hf_folder

CHATS = [
    [{"role": "user", "content": "Rate this answer from 0 to 100: I am fine."}],
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog, rate it 0-100"}],
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, chat_tokenizer):
    spec = dict(LLAMA, vocab_size=len(chat_tokenizer) + 7)  # 7 logit rows no token uses
    folder = save_hf_folder(hf_model(spec, seed=5), tmp_path_factory.mktemp("numbers_llama"))
    return dataclasses.replace(emgeo_jax.load(folder), tokenizer=chat_tokenizer)


@pytest.fixture(scope="module")
def trie(tiny_lm):
    tok = tiny_lm.tokenizer
    return number_trie(tok, tiny_lm.config.vocab_size, TokenText(tok).bytes)


def brute_force(lm, prompt: list[int], digit_start: np.ndarray, steering=None):
    """log P(reply starts with n, then a non-digit) for n in 0..100 `[101]` and the first
    token's log-softmax `[V]`: every prompt + digits sequence in one uncached forward,
    right-padded (causal: padding after a sequence does not change its logits), each
    sequence's own steps read off."""
    spelled = [lm.tokenizer.encode(str(n), add_special_tokens=False) for n in JUDGE_NUMBERS]
    seqs = [prompt + digits for digits in spelled]
    width = max(map(len, seqs))
    ids = np.array([s + [0] * (width - len(s)) for s in seqs])
    logits = lm.forward(ids, steering=steering, return_residual=False).logits
    lsm = log_softmax(np.asarray(logits, np.float64), axis=-1)
    out = []
    for k, digits in enumerate(spelled):
        steps = lsm[k, len(prompt) - 1 : len(seqs[k]) - 1]
        path = sum(steps[j, t] for j, t in enumerate(digits))
        out.append(path + logsumexp(lsm[k, len(seqs[k]) - 1][~digit_start]))
    return np.array(out), lsm[0, len(prompt) - 1]


def test_trie_shape_for_digit_tokenizer(trie, chat_tokenizer):
    assert all(len(chat_tokenizer.encode(str(n))) == len(str(n)) for n in JUDGE_NUMBERS)
    assert len(trie.tokens) == 1 + 10 + 90 + 1  # root, 0-9, 10-99 below 1-9, 100 below 10
    assert sorted(np.bincount(trie.depth)) == [1, 1, 10, 90]
    digit_ids = {chat_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    assert set(np.flatnonzero(trie.continues)) == digit_ids  # no merged digit tokens here
    assert not trie.continues[len(chat_tokenizer) :].any()


def test_blank_trie_has_the_argument_shapes_of_a_built_one(trie):
    """`NumberTrie.blank` (what `emgeo plan` compiles the judge with) gives `score_trie` the
    same argument shapes and dtypes as a trie `number_trie` built, key for key."""
    blank = NumberTrie.blank(len(trie.tokens), len(trie.numbers), len(trie.continues))
    built, planned = jax.eval_shape(trie.arrays), jax.eval_shape(blank.arrays)
    assert built == planned, (built, planned)
    assert blank.numbers == trie.numbers == JUDGE_NUMBERS


def test_matches_brute_force_batched_and_steered(tiny_lm, trie):
    prompts = chat_token_ids(tiny_lm.tokenizer, CHATS, None)
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    rng = np.random.default_rng(0)
    steering = Steering.addition(tiny_lm, rng.normal(size=tiny_lm.config.hidden_size), [1], 4.0)
    for steer in (None, steering):
        got = number_logprobs(tiny_lm, prompts, trie, steer, top_logprobs=5)
        assert got.numbers == JUDGE_NUMBERS and got.logprobs.shape == (3, 101)
        for i, p in enumerate(prompts):
            ref, first = brute_force(tiny_lm, p, trie.continues, steer)
            np.testing.assert_allclose(got.logprobs[i], ref, atol=2e-4)
            np.testing.assert_allclose(got.top_logprobs[i], np.sort(first)[::-1][:5], atol=1e-4)
            assert got.top_ids[i, 0] == np.argmax(first)
        assert np.all(logsumexp(got.logprobs, axis=-1) <= 1e-6)  # disjoint events
    plain = number_logprobs(tiny_lm, prompts[:1], trie)
    assert not np.allclose(plain.logprobs[0], got.logprobs[0], atol=1e-3)  # steering counted


def test_whole_number_tokens(tiny_lm):
    """A tokenizer with merged digit tokens ('10' one token) gives a different trie; the
    scores still equal brute force over each number's own spelling."""

    class Merged:  # wraps the chat tokenizer: '10' and '100' spelled with a merged '10'
        def __init__(self, tok):
            self.tok, self.ten = tok, tok.convert_tokens_to_ids("<|pad|>")

        def __len__(self):
            return len(self.tok)

        def encode(self, text, add_special_tokens=False):
            if text.startswith("10"):
                return [self.ten] + self.tok.encode(text[2:], add_special_tokens=False)
            return self.tok.encode(text, add_special_tokens=False)

    tok = tiny_lm.tokenizer
    merged = Merged(tok)
    raw = TokenText(tok).bytes
    trie = number_trie(
        merged, tiny_lm.config.vocab_size, lambda i: b"10" if i == merged.ten else raw(i)
    )
    assert list(np.bincount(trie.depth)) == [1, 11, 90]  # '10' beside 1-9; '100' below it
    prompt = chat_token_ids(tok, CHATS[:1], None)[0]
    got = number_logprobs(tiny_lm, [prompt], trie).logprobs[0]
    lm = dataclasses.replace(tiny_lm, tokenizer=merged)
    np.testing.assert_allclose(got, brute_force(lm, prompt, trie.continues)[0], atol=2e-4)
