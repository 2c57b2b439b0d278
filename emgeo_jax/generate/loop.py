"""KV-cached, steerable batched generation: one jitted prefill, one jitted decode loop.

    out = lm.generate(["Hello!", [{"role": "user", "content": "Hi"}]],
                      steering=Steering.addition(lm, v, layers=[15], scale=4.0),
                      max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0)
    out.texts, out.tokens, out.logprobs

Prompts (strings or chat messages) go through the tokenizer's chat template with the
generation prompt, are left-padded to a bucket of `PAD_MULTIPLE` tokens (so prompt sets of
similar length share a compiled program) and get positions that count real tokens. The
prefill writes a preallocated cache `[L, B, S, K, Dh]` (S = padded prompt + new tokens);
the decode loop is a `lax.while_loop` that feeds one token per row per step, stops when
every row has produced an EOS id or `max_new_tokens` tokens, and donates the cache.

Sampling: `temperature == 0` is greedy (argmax); otherwise logits / temperature, optionally
restricted to its nucleus (the smallest set of highest logits with probability >= `top_p`,
found exactly without a sort: `top_p_mask`), sampled by inverse CDF with the key
`fold_in(PRNGKey(seed), step)`. Temperature and top_p are data: changing them does not
recompile. `logprobs` are those of the model's unscaled distribution (log-softmax of the
logits), as an OpenAI-compatible server reports them.

Steering applies in prefill and decode alike; its position mode decides where: "all" both,
"prompt" only prefill tokens, "generated" only the generated tokens as they are fed back
(decode steps). Layer l = output of block l = HF `hidden_states[l+1]`.

On a mesh (`lm.mesh`, set by `emgeo_jax.load(..., mesh=...)`), prompts and the KV cache
are split over the batch (`parallel.ACTIVATION_AXES` "tokens", "kv_cache") and the residual
is pinned (`generation_layout`): the prefill's rows over `data x fsdp` with each layer's
weights all-gathered, a decode step's `D` over `fsdp` so the weights stay in place (see
the `emgeo_jax.parallel` docstring). A prompt count that `data x fsdp` does not divide is
padded with copies of the last prompt (`pad_prompts`) whose outputs are dropped, so every
row stays split (never replicated) and the real rows get the tokens one device gives
(sampling too: each row's uniform depends only on its index, JAX's partitionable
threefry). Single-device runs are left unconstrained.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import KVCache, default_positions, init_cache
from emgeo_jax.models.lm import LM, forward
from emgeo_jax.parallel import activation_sharding
from emgeo_jax.steer import Steering, Taps

PAD_MULTIPLE = 32
NUCLEUS_ROWS = 8  # rows per chunk of the nucleus bisection (see `top_p_mask`)
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")

Prompt = str | Sequence[dict[str, str]]


class Generation(NamedTuple):
    """Per prompt row: `texts[i]` (decoded, special tokens skipped), `tokens[i]` (generated
    ids, without the EOS), `logprobs[i] [n_i]` (of the chosen tokens), `top_logprobs[i]`
    (`(ids [n_i, k], logprobs [n_i, k])` or None), `projections[i] [n_i]` (residual of each
    generated token at the monitor layer dotted with the unit monitor direction, or None),
    `finish_reasons[i]` ("stop" on EOS, "length" otherwise)."""

    texts: list[str]
    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    top_logprobs: list[tuple[np.ndarray, np.ndarray]] | None
    projections: list[np.ndarray] | None
    finish_reasons: list[str]


def eos_token_ids(lm: LM) -> list[int]:
    """EOS ids: the tokenizer's eos, its chat end tokens, and `generation_config.json`'s
    `eos_token_id` when the model came from an HF folder."""
    tok = lm.tokenizer
    ids = set()
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    gen_cfg = Path(lm.source) / "generation_config.json" if lm.source else None
    if gen_cfg is not None and gen_cfg.is_file():
        import json

        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(ids)


def with_system(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    """Chat turns for a prompt (a user string or turns), with a `system` turn first when
    given and the prompt has none."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and turns and turns[0].get("role") != "system":
        turns = [{"role": "system", "content": system}, *turns]
    return turns


def chat_token_ids(
    tokenizer: Any, prompts: Sequence[Prompt], system: str | None
) -> list[list[int]]:
    """Apply the chat template (with the generation prompt) to each prompt: a user string or
    a list of `{"role", "content"}` messages; `system` is prepended when the prompt has none."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass token ids instead")
    out = []
    for i, prompt in enumerate(prompts):
        messages = with_system(prompt, system)
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"prompt {i}: give a string or a non-empty list of chat messages")
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append([int(t) for t in ids])
    return out


def left_pad(rows: Sequence[Sequence[int]], multiple: int, pad_id: int = 0):
    """`ids, mask [B, T]` int32, right-aligned, T = max length rounded up to `multiple`."""
    t = multiple * math.ceil(max(len(r) for r in rows) / multiple)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, t - len(r) :] = r
            mask[i, t - len(r) :] = 1
    return ids, mask


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-inf < ... < 0 < ... < inf; -0 maps as +0;
    no NaN)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """The nucleus of `softmax(logits) [B, V]`: True where `logits >= t`, `t` the largest logit
    whose set `{logits >= t}` holds probability >= `top_p` (so >= 1 token is kept, ties at `t`
    are kept, and `top_p >= 1` keeps every token). This is exactly the set a full sort gives
    (sorted descending, keep each token whose preceding cumulative probability is < top_p,
    then keep all logits >= the smallest kept one), found without sorting: `t` is bisected
    over the 2^32 float32 values in their order, 32 masked sums over V per row. Rows go
    `NUCLEUS_ROWS` at a time so a chunk stays in cache across the 32 passes. On 2 CPU cores,
    V = 49k: 4 ms for 8 rows, 37 ms for 64 (CPU time, loaded machine), against 93 / 690 ms
    for `jnp.sort`. Candidate shortcuts (top-k, top-p inside them, a sort as the fallback) do
    not pay off: at temperature 1 a small instruct model's nucleus often holds thousands of
    tokens, so some row of a batch would need the fallback at almost every step."""

    def row(lg):  # [V] -> [V] bool
        probs = jax.nn.softmax(lg)
        keys = _order_key(lg)

        # invariant: mass(keys >= lo) >= top_p > mass(keys >= hi); lo ends at the key of t
        def halve(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            enough = jnp.sum(jnp.where(keys >= mid, probs, 0.0)) >= top_p
            return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

        lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.min(keys), jnp.max(keys) + 1))
        return keys >= lo

    return jax.lax.map(row, logits, batch_size=NUCLEUS_ROWS)


def inverse_cdf(weights: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Index `[B]` drawn with probability `weights / weights.sum(-1)` (`weights [B, V] >= 0`,
    each row with a positive entry) from uniforms `u [B]` in [0, 1): the first index whose
    cumulative weight exceeds `u * total`. Two levels (block sums, then one block of `block`
    entries) keep it to one pass over V; a zero-weight index is never returned."""
    b, v = weights.shape
    w = jnp.pad(weights, ((0, 0), (0, -v % block))).reshape(b, -1, block)

    def first_above(w, r):  # w [B, n], r [B] -> first i with cumsum(w)[i] > r, a positive w
        cum = jnp.cumsum(w, axis=-1)
        last = jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), axis=-1)
        i = jnp.minimum(jnp.sum(cum <= jnp.maximum(r, 0.0)[:, None], axis=-1), last)
        before = jnp.take_along_axis(cum - w, i[:, None], axis=-1)[:, 0]
        return i, r - before

    sums = jnp.sum(w, axis=-1)
    blk, rest = first_above(sums, u * jnp.sum(sums, axis=-1))
    i, _ = first_above(jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0], rest)
    return blk * block + i


def sample_tokens(logits, key, temperature, top_p) -> jax.Array:
    """`logits [B, V]` -> ids `[B]`: argmax when `temperature == 0`, else an exact draw from
    softmax(logits / temperature) restricted to its `top_p` nucleus (`top_p_mask`), by
    inverse CDF with one uniform per row (`fold_in`-derived `key`)."""
    logits = logits.astype(jnp.float32)

    def draw(lg):
        lg = lg / temperature
        keep = jax.lax.cond(
            top_p < 1.0, top_p_mask, lambda x, _: jnp.ones(x.shape, bool), lg, top_p
        )
        weights = jnp.where(keep, jnp.exp(lg - jnp.max(lg, axis=-1, keepdims=True)), 0.0)
        return inverse_cdf(weights, jax.random.uniform(key, lg.shape[:1])).astype(jnp.int32)

    # argmax as top-1 (the lower index wins ties, as in argmax): 4x cheaper on XLA CPU
    greedy = lambda lg: jax.lax.top_k(lg, 1)[1][:, 0].astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(temperature > 0, draw, greedy, logits)


class Layout(NamedTuple):
    """Where generation keeps its arrays on a mesh: `tokens` for `ids, mask [B, T]`, `cache`
    (a `KVCache` of shardings: `k, v [L, B, S, K, Dh]` by the "kv_cache" rule, `mask [B, S]`,
    `index` replicated), and the residual pins of `prefill` (`[B, T, D]`, "hidden") and of
    each `decode` step (`[B, 1, D]`, "step_hidden")."""

    tokens: NamedSharding
    cache: KVCache
    prefill_resid: NamedSharding
    decode_resid: NamedSharding


def generation_layout(
    mesh: Mesh, cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int
) -> Layout:
    """The `Layout` of `batch` prompts of `prompt_len` tokens with `cache_len` cache slots."""
    kv = (cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    kv_sharding = activation_sharding(mesh, "kv_cache", kv)
    cache = KVCache(
        k=kv_sharding,
        v=kv_sharding,
        mask=activation_sharding(mesh, "cache_mask", (batch, cache_len)),
        index=NamedSharding(mesh, PartitionSpec()),
    )
    d = cfg.hidden_size
    return Layout(
        tokens=activation_sharding(mesh, "tokens", (batch, prompt_len)),
        cache=cache,
        prefill_resid=activation_sharding(mesh, "hidden", (batch, prompt_len, d)),
        decode_resid=activation_sharding(mesh, "step_hidden", (batch, 1, d)),
    )


def place_prompts(
    lm: LM, ids: np.ndarray, mask: np.ndarray, cache_len: int
) -> tuple[jax.Array, jax.Array, KVCache, Layout | None]:
    """Padded prompts `ids, mask [B, T]` and an empty `KVCache` of `cache_len` slots, placed
    for `lm`: without `lm.mesh` (or on a one-device mesh) as they are (layout None); on
    `lm.mesh` by `generation_layout` (returned), the cache allocated where it stays. Every
    process passes the same prompts; `B` must be a multiple of `lm.batch_multiple`
    (`pad_prompts`)."""
    cfg = lm.config
    make_cache = functools.partial(init_cache, cfg, len(ids), cache_len, lm.dtype)
    mesh = lm.mesh
    if mesh is None or mesh.size == 1:
        return jnp.asarray(ids), jnp.asarray(mask), make_cache(), None
    if len(ids) % lm.batch_multiple:
        raise ValueError(
            f"{len(ids)} prompt rows on a mesh splitting rows {lm.batch_multiple} ways; "
            "pad them with `pad_prompts` first"
        )
    layout = generation_layout(mesh, cfg, *ids.shape, cache_len)
    ids, mask = (
        jax.make_array_from_callback(x.shape, layout.tokens, lambda i, x=x: x[i])
        for x in (ids, mask)
    )
    return ids, mask, jax.jit(make_cache, out_shardings=layout.cache)(), layout


def pad_prompts(lm: LM, prompts: Sequence[Any]) -> list[Any]:
    """`prompts` with copies of the last one appended until their count is a multiple of
    `lm.batch_multiple` (`data x fsdp` of `lm.mesh`; unchanged without a mesh). Drop the
    outputs of the added rows (`[:len(prompts)]`)."""
    prompts = list(prompts)
    return prompts + prompts[-1:] * (-len(prompts) % lm.batch_multiple)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "resid_sharding"), donate_argnames=("cache",)
)
def prefill(graphdef, params, ids, mask, steering, cache: KVCache, resid_sharding=None):
    """Run the padded prompts `ids, mask [B, Tp]` into the empty `cache` (donated).
    Returns `(cache, last_logits [B, V], next_positions [B])`. `resid_sharding` (static):
    pins the residual `[B, Tp, D]` (`Layout.prefill_resid`; None on one device)."""
    positions = default_positions(mask)
    out = forward(
        graphdef,
        params,
        ids,
        positions,
        mask,
        steering=steering,
        cache=cache,
        resid_sharding=resid_sharding,
    )
    return out.cache, out.logits[:, -1], jnp.sum(mask, axis=-1).astype(jnp.int32)


class _Loop(NamedTuple):
    step: jax.Array
    cache: KVCache
    token: jax.Array  # [B] last chosen token
    position: jax.Array  # [B] its position
    done: jax.Array  # [B]
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]
    top_ids: jax.Array  # [B, N, k]
    top_lps: jax.Array  # [B, N, k]
    proj: jax.Array  # [B, N]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "top_k", "monitor", "resid_sharding"),
    donate_argnames=("cache",),
)
def decode(
    graphdef,
    params,
    cache: KVCache,
    first_logits: jax.Array,
    position: jax.Array,
    steering: Steering,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    eos_ids: jax.Array,
    monitor_layer: jax.Array,
    monitor_dir: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int,
    monitor: bool,
    resid_sharding: NamedSharding | None = None,
):
    """The decode loop. Token 0 comes from `first_logits [B, V]`; step i feeds token i-1 at
    `position + i - 1` and chooses token i. With `monitor`, one extra step feeds the last
    token so that every generated token's residual is projected. Returns `tokens, logprobs
    [B, N]`, `top_ids, top_logprobs [B, N, top_k]`, `projections [B, N]` and the final cache
    (returned so the donated cache buffers are reused in place). `resid_sharding` (static):
    pins each step's residual `[B, 1, D]` (`Layout.decode_resid`; None on one device)."""
    n = max_new_tokens
    b = first_logits.shape[0]
    last_step = n if monitor else n - 1

    def choose(logits, step, state_tokens, state_lps, top_ids, top_lps, done):
        tok = sample_tokens(logits, jax.random.fold_in(key, step), temperature, top_p)
        tok = jnp.where(done, eos_ids[0], tok)
        logits = logits.astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        lp = (jnp.take_along_axis(logits, tok[:, None], axis=-1) - log_z)[:, 0]
        if top_k:
            tv, ti = jax.lax.top_k(logits, top_k)
            tv = tv - log_z
        else:
            tv, ti = jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
        col = jnp.minimum(step, n - 1)
        write = step < n

        def put(arr, val):
            upd = jax.lax.dynamic_update_index_in_dim(arr, val.astype(arr.dtype), col, 1)
            return jnp.where(write, upd, arr)

        new_done = done | jnp.isin(tok, eos_ids)
        return (
            tok,
            put(state_tokens, tok),
            put(state_lps, lp),
            put(top_ids, ti),
            put(top_lps, tv),
            new_done,
        )

    zeros = jnp.zeros((b, n), jnp.float32)
    tok, tokens, lps, top_ids, top_lps, done = choose(
        first_logits,
        0,
        jnp.zeros((b, n), jnp.int32),
        zeros,
        jnp.zeros((b, n, top_k), jnp.int32),
        jnp.zeros((b, n, top_k), jnp.float32),
        jnp.zeros((b,), bool),
    )
    state = _Loop(jnp.int32(1), cache, tok, position, done, tokens, lps, top_ids, top_lps, zeros)
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(s: _Loop):
        return (s.step <= last_step) & ~jnp.all(s.done)

    def body(s: _Loop) -> _Loop:
        out = forward(
            graphdef,
            params,
            s.token[:, None],
            s.position[:, None],
            ones,
            steering=steering,
            taps=Taps(resid="full") if monitor else None,
            cache=s.cache,
            is_generated=ones.astype(bool),
            resid_sharding=resid_sharding,
        )
        proj = s.proj
        if monitor:
            h = jnp.take(out.resid_post, monitor_layer, axis=0)[:, 0].astype(jnp.float32)
            proj = jax.lax.dynamic_update_index_in_dim(proj, h @ monitor_dir, s.step - 1, 1)
        tok, tokens, lps, ti, tl, done = choose(
            out.logits[:, 0], s.step, s.tokens, s.logprobs, s.top_ids, s.top_lps, s.done
        )
        return _Loop(s.step + 1, out.cache, tok, s.position + 1, done, tokens, lps, ti, tl, proj)

    s = jax.lax.while_loop(cond, body, state)
    return s.tokens, s.logprobs, s.top_ids, s.top_lps, s.proj, s.cache


def generate_ids(
    lm: LM,
    prompt_ids: Sequence[Sequence[int]],
    steering: Steering | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    top_logprobs: int = 0,
    monitor: tuple[int, Any] | None = None,
    pad_multiple: int = PAD_MULTIPLE,
) -> Generation:
    """Generate from token-id prompts (no chat template). See `generate` for the arguments;
    `eos_ids` defaults to `eos_token_ids(lm)`."""
    cfg = lm.config
    if len(prompt_ids) == 0:
        raise ValueError("generate: empty prompt list")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be finite and >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    steering = Steering.none(cfg) if steering is None else steering
    if steering.mask is not None:
        raise ValueError("generate: use positions='all'|'prompt'|'generated', not a token mask")
    eos = list(eos_token_ids(lm) if eos_ids is None else eos_ids)
    if not eos:
        eos = [-1]  # no EOS: every row runs to max_new_tokens
    monitor_layer, monitor_dir = 0, np.zeros(cfg.hidden_size, np.float32)
    if monitor is not None:
        monitor_layer, direction = monitor
        if not 0 <= monitor_layer < cfg.num_layers:
            raise ValueError(f"monitor layer {monitor_layer} out of range 0..{cfg.num_layers - 1}")
        direction = np.asarray(direction, np.float32)
        if direction.shape != (cfg.hidden_size,) or not np.all(np.isfinite(direction)):
            raise ValueError(f"monitor direction must be finite [D={cfg.hidden_size}]")
        monitor_dir = direction / np.linalg.norm(direction)

    pad_id = getattr(lm.tokenizer, "pad_token_id", None) or 0
    ids, mask = left_pad(pad_prompts(lm, prompt_ids), pad_multiple, pad_id)
    ids, mask, cache, layout = place_prompts(lm, ids, mask, ids.shape[1] + max_new_tokens + 1)
    cache, logits, position = prefill(
        lm.graphdef,
        lm.params,
        ids,
        mask,
        steering,
        cache,
        resid_sharding=None if layout is None else layout.prefill_resid,
    )
    outputs = decode(
        lm.graphdef,
        lm.params,
        cache,
        logits,
        position,
        steering,
        jax.random.PRNGKey(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.asarray(eos, jnp.int32),
        jnp.int32(monitor_layer),
        jnp.asarray(monitor_dir),
        max_new_tokens=max_new_tokens,
        top_k=top_logprobs,
        monitor=monitor is not None,
        resid_sharding=None if layout is None else layout.decode_resid,
    )[:5]
    if jax.process_count() > 1:  # rows may live on other processes' devices
        from jax.experimental import multihost_utils

        outputs = multihost_utils.process_allgather(outputs, tiled=True)
    tokens, lps, top_ids, top_lps, proj = jax.device_get(outputs)
    rows, lp_rows, top_rows, proj_rows, reasons = [], [], [], [], []
    for i in range(len(prompt_ids)):
        hits = np.flatnonzero(np.isin(tokens[i], eos))
        n = int(hits[0]) if len(hits) else max_new_tokens
        rows.append(tokens[i, :n].tolist())
        lp_rows.append(lps[i, :n])
        top_rows.append((top_ids[i, :n], top_lps[i, :n]))
        proj_rows.append(proj[i, :n])
        reasons.append("stop" if len(hits) else "length")
    tok = lm.tokenizer
    texts = [tok.decode(r, skip_special_tokens=True) if tok is not None else "" for r in rows]
    return Generation(
        texts=texts,
        tokens=rows,
        logprobs=lp_rows,
        top_logprobs=top_rows if top_logprobs else None,
        projections=proj_rows if monitor is not None else None,
        finish_reasons=reasons,
    )


def generate(
    lm: LM,
    prompts: Sequence[Prompt],
    steering: Steering | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    top_logprobs: int = 0,
    monitor: tuple[int, Any] | None = None,
) -> Generation:
    """Generate a reply to each prompt (a user string or a list of chat messages).

    `steering`: a `Steering` (its position mode applies; see module docstring).
    `temperature=0` is greedy; `seed` fixes the PRNG key. `system` adds a system message.
    `top_logprobs=k` also returns the k most likely tokens per step. `monitor=(layer, r)`
    returns, per generated token, its residual after block `layer` dotted with `r/|r|`."""
    if isinstance(prompts, str):
        raise ValueError("generate: prompts must be a list (got a single string)")
    if len(prompts) == 0:
        raise ValueError("generate: empty prompt list")
    ids = chat_token_ids(lm.tokenizer, prompts, system)
    return generate_ids(
        lm,
        ids,
        steering,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        top_logprobs=top_logprobs,
        monitor=monitor,
    )
