"""Whole-number logprobs for judges whose tokenizer splits numbers (SmolLM2: '85' -> '8' '5'):
the model pass behind the local judge (`emgeo_jax.judge`) and `emgeo serve`'s extension.

The standard judge scheme (`scoring.score_top_logprobs`) reads the top logprobs of one output
token and keeps those that are integers 0..100. A tokenizer that spells numbers digit by digit
only ever shows 0..9 there. This module computes, for every candidate number n, the exact
probability that the reply *starts with the number n*:

    log P(n) = sum_j log P(t_j | prompt, t_<j) + log P(end | prompt, t_1 .. t_k)

where t_1 .. t_k are the tokens of `str(n)` and `end` is any next token whose text does not
start with an ASCII digit (so "10" is not counted as "1", nor "05" as "0"). These events are
disjoint, so the candidates' probabilities sum to at most 1 and the scheme's mass threshold
keeps its meaning. For a tokenizer with whole-number tokens (Llama-3: '85' is one token) this
is the first-token probability times the (near-one) probability that no digit follows.

Cost: one cached forward of the prompt without its last token (no LM head), then one forward
of the candidates' token trie: the root is the prompt's last token and every trie node sees
the prompt and its own ancestors only (tree attention, `attend`), at position
prompt length - 1 + depth. For 0..100 spelled in digits the trie holds 1 + 10 + 90 + 1 = 102
tokens; the root's logits are also the first output token's distribution (greedy token and
top logprobs), so a judge request needs no other pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emgeo_jax.generate.layout import place_prompts, place_replicated
from emgeo_jax.generate.prompts import PAD_MULTIPLE, left_pad, pad_prompts, pad_steering
from emgeo_jax.hosts import to_host
from emgeo_jax.models.llama import KVCache, default_positions
from emgeo_jax.models.lm import LM, score_tree
from emgeo_jax.models.lm import prefill as prefill_cache
from emgeo_jax.models.scan import DEFAULT_RUN, RunOptions
from emgeo_jax.models.steering import Steering

JUDGE_NUMBERS = tuple(range(101))  # the standard scheme's 0..100


@dataclasses.dataclass(frozen=True)
class NumberTrie:
    """The token trie of candidate numbers. Node 0 is the root (stands for the prompt's last
    token); node i > 0 is token `tokens[i]` under `parent[i]` at `depth[i]`.
    `ancestors [M, M]`: j is i or an ancestor of i. `leaf [N]`: the node ending number
    `numbers[k]`. `continues [V]`: tokens whose text starts with an ASCII digit."""

    numbers: tuple[int, ...]
    tokens: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    ancestors: np.ndarray
    leaf: np.ndarray
    continues: np.ndarray

    @classmethod
    def blank(cls, nodes: int, count: int, vocab_size: int) -> NumberTrie:
        """A zero-filled trie of `nodes` nodes (root included) ending `count` numbers (0..
        count-1) over a vocabulary of `vocab_size`: the shapes and dtypes `number_trie`
        builds, for abstract arguments (`jax.eval_shape(trie.arrays)`, `emgeo_jax.plan`)."""
        return cls(
            tuple(range(count)),
            np.zeros(nodes, np.int32),
            np.zeros(nodes, np.int32),
            np.zeros(nodes, np.int32),
            np.zeros((nodes, nodes), bool),
            np.zeros(count, np.int32),
            np.zeros(vocab_size, bool),
        )

    def arrays(self) -> dict[str, jax.Array]:
        """The trie as the `score_trie` argument: `tokens, parent, depth [M]`, `ancestors
        [M, M]`, `leaf [N]`, `continues [V]`."""
        return {k: jnp.asarray(getattr(self, k)) for k in TRIE_FIELDS}


TRIE_FIELDS = ("tokens", "parent", "depth", "ancestors", "leaf", "continues")


def number_trie(
    tokenizer: Any,
    vocab_size: int,
    token_bytes: Callable[[int], bytes],
    numbers: Sequence[int] = JUDGE_NUMBERS,
) -> NumberTrie:
    """Build the trie of `numbers` spelled as `tokenizer.encode(str(n))` (no special tokens).
    `token_bytes(id)` gives a token's raw bytes (e.g. `serve.TokenText(tok).bytes`); ids at or
    beyond the tokenizer's length (unused logit rows) never continue a number."""
    tokens, parent, depth = [-1], [0], [0]
    children: dict[tuple[int, int], int] = {}
    leaf = []
    for n in numbers:
        ids = tokenizer.encode(str(n), add_special_tokens=False)
        if not ids:
            raise ValueError(f"number_trie: the tokenizer spells {n} with no tokens")
        node = 0
        for t in ids:
            key = (node, int(t))
            if key not in children:
                children[key] = len(tokens)
                tokens.append(int(t))
                parent.append(node)
                depth.append(depth[node] + 1)
            node = children[key]
        leaf.append(node)
    m = len(tokens)
    ancestors = np.zeros((m, m), bool)
    for i in range(m):
        j = i
        while True:
            ancestors[i, j] = True
            if j == 0:
                break
            j = parent[j]
    n_tok = min(vocab_size, len(tokenizer))
    continues = np.zeros(vocab_size, bool)
    continues[:n_tok] = [token_bytes(i)[:1].isdigit() for i in range(n_tok)]
    return NumberTrie(
        tuple(int(n) for n in numbers),
        np.asarray(tokens, np.int32),
        np.asarray(parent, np.int32),
        np.asarray(depth, np.int32),
        ancestors,
        np.asarray(leaf, np.int32),
        continues,
    )


class NumberScores(NamedTuple):
    """Per prompt row: `logprobs [B, N]` of the reply starting with each of `numbers`, and the
    first output token's `top_ids, top_logprobs [B, k]` (sorted, best first)."""

    numbers: tuple[int, ...]
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "options"))
def score_trie(
    graphdef: Any,
    params: Any,
    ids: jax.Array,
    mask: jax.Array,
    last: jax.Array,
    steering: Steering,
    cache: KVCache,
    trie: dict[str, jax.Array],
    *,
    top_k: int,
    options: RunOptions = DEFAULT_RUN,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The jitted scoring pass. `ids, mask [B, Tp]`: the prompts without their last token
    `last [B]`, left-padded; `cache` empty with `Tp + M` slots; `trie`: `NumberTrie.arrays()`.
    Returns `number logprobs [B, N]`, `top_ids, top_lps [B, top_k]`. `options` (static): the
    attention implementation and the prompt pass's residual pin on a mesh
    (`generate.Layout.prefill_resid`); the tree pass always attends through XLA."""
    b = ids.shape[0]
    m = trie["tokens"].shape[0]
    cache, _ = prefill_cache(
        graphdef,
        params,
        cache,
        ids,
        default_positions(mask),
        mask,
        steering=steering,
        options=options,
    )
    root = jnp.sum(mask, axis=-1).astype(jnp.int32)  # position of the last prompt token
    node_ids = jnp.where(jnp.arange(m)[None] == 0, last[:, None], trie["tokens"][None])
    logits = score_tree(
        graphdef,
        params,
        cache,
        node_ids,
        root[:, None] + trie["depth"][None],
        jnp.broadcast_to(trie["ancestors"][None], (b, m, m)),
        steering=steering,
        options=dataclasses.replace(options, resid_sharding=None),
    )
    lsm = jax.nn.log_softmax(logits, axis=-1)  # [B, M, V]
    edge = lsm[:, trie["parent"], jnp.maximum(trie["tokens"], 0)]  # [B, M]: log P(node | parent)
    edge = jnp.where(jnp.arange(m)[None] == 0, 0.0, edge)
    path = jnp.einsum("bj,ij->bi", edge, trie["ancestors"].astype(jnp.float32))
    end = jax.nn.logsumexp(jnp.where(trie["continues"], -jnp.inf, lsm), axis=-1)  # [B, M]
    numbers = (path + end)[:, trie["leaf"]]
    top_lps, top_ids = jax.lax.top_k(lsm[:, 0], top_k)
    return numbers, top_ids, top_lps


def number_logprobs(
    lm: LM,
    prompt_ids: Sequence[Sequence[int]],
    trie: NumberTrie,
    steering: Steering | None = None,
    top_logprobs: int = 20,
    pad_multiple: int = PAD_MULTIPLE,
) -> NumberScores:
    """Whole-number logprobs (module docstring) of the replies to token-id prompts (chat
    template applied, ending in the generation prompt), under `steering` in prefill and
    reply alike. One compiled program per (batch size, padded prompt length)."""
    if len(prompt_ids) == 0:
        raise ValueError("number_logprobs: empty prompt list")
    for i, p in enumerate(prompt_ids):
        if len(p) < 2:
            raise ValueError(f"number_logprobs: prompt {i} has {len(p)} tokens (needs >= 2)")
    if not 1 <= top_logprobs <= lm.config.vocab_size:
        raise ValueError(f"top_logprobs={top_logprobs} must be in 1..{lm.config.vocab_size}")
    steering = Steering.none(lm.config) if steering is None else steering
    pad_id = getattr(lm.tokenizer, "pad_token_id", None) or 0
    rows = pad_prompts(lm, prompt_ids)  # a multiple of the mesh's row split; dropped below
    ids, mask = left_pad([p[:-1] for p in rows], pad_multiple, pad_id)
    last = np.asarray([p[-1] for p in rows], np.int32)
    steering = pad_steering(steering, len(prompt_ids), len(rows))
    ids, mask, cache, layout = place_prompts(lm, ids, mask, ids.shape[1] + len(trie.tokens))
    last, steering, arrays = place_replicated(layout, (last, steering, trie.arrays()))
    lps, top_ids, top_lps = to_host(  # rows may live on other processes' devices
        score_trie(
            lm.graphdef,
            lm.params,
            ids,
            mask,
            jnp.asarray(last),
            steering,
            cache,
            arrays,
            top_k=top_logprobs,
            options=lm.run_options(resid_sharding=None if layout is None else layout.prefill_resid),
        )
    )
    n = len(prompt_ids)
    return NumberScores(trie.numbers, lps[:n], top_ids[:n], top_lps[:n])
