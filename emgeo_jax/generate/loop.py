"""The generation loop: one jitted `prefill`, one jitted while-loop `decode`, and the
host-side `generate_ids` / `generate` that validate, pad, place, run both and unpack rows.

The prefill writes a preallocated cache `[L, B, K, S, Dh]` (S = padded prompt + new tokens +
1); `decode` is a `lax.while_loop` that feeds one token per row per step, stops when every
row has produced an EOS id or `max_new_tokens` tokens, and donates the cache. `logprobs` are
those of the model's unscaled distribution (log-softmax of the logits), as an
OpenAI-compatible server reports them; the sampled token follows `SamplingParams`.

Steering applies in prefill and decode alike; its position mode decides where: "all" both,
"prompt" only prefill tokens, "generated" only the generated tokens as they are fed back
(decode steps). Layer l = output of block l = HF `hidden_states[l+1]`.

On a mesh, a prompt count that `data x fsdp` does not divide is padded with copies of the
last prompt (`pad_prompts`) whose outputs are dropped, so every row stays split (never
replicated) and the real rows get the tokens one device gives (see `layout`, `sampling`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emgeo_jax.generate.layout import Layout, place_prompts, place_replicated
from emgeo_jax.generate.prompts import (
    PAD_MULTIPLE,
    Prompt,
    chat_token_ids,
    eos_token_ids,
    left_pad,
    pad_prompts,
    pad_steering,
)
from emgeo_jax.generate.sampling import SamplingParams, sample_tokens
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import KVCache, default_positions
from emgeo_jax.models.lm import LM, decode_step
from emgeo_jax.models.lm import prefill as prefill_cache
from emgeo_jax.models.scan import DEFAULT_RUN, RunOptions
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from emgeo_jax.parallel import move_to


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


@functools.partial(jax.jit, static_argnames=("graphdef", "options"), donate_argnames=("cache",))
def prefill(
    graphdef: Any,
    params: Any,
    ids: jax.Array,
    mask: jax.Array,
    steering: Steering,
    cache: KVCache,
    options: RunOptions = DEFAULT_RUN,
) -> tuple[KVCache, jax.Array, jax.Array]:
    """Run the padded prompts `ids, mask [B, Tp]` into the empty `cache` (donated).
    Returns `(cache, last_logits [B, V], next_positions [B])`. `options` (static): the
    attention implementation and the residual pin `[B, Tp, D]` (`Layout.prefill_resid`)."""
    cache, logits = prefill_cache(
        graphdef,
        params,
        cache,
        ids,
        default_positions(mask),
        mask,
        steering=steering,
        options=options,
    )
    return cache, logits, jnp.sum(mask, axis=-1).astype(jnp.int32)


class DecodeInputs(NamedTuple):
    """What `decode` starts from besides the cache: `first_logits [B, V]` and `position [B]`
    (the prefill's last logits and next positions), `eos_ids [E]` int32 (>= 1 id; `[-1]`
    for none), and the monitor: `monitor_layer []` int32, unit `monitor_dir [D]` f32 (read
    only when `decode(monitor=True)`)."""

    first_logits: jax.Array
    position: jax.Array
    eos_ids: jax.Array
    monitor_layer: jax.Array
    monitor_dir: jax.Array


def _unit_monitor(cfg: ModelConfig, monitor: tuple[int, Any] | None) -> tuple[int, np.ndarray]:
    """`(layer, r / |r|)` of `monitor=(layer, r)` checked (`0 <= layer < L`, `r` finite
    `[D]`); `(0, zeros [D])` when None."""
    if monitor is None:
        return 0, np.zeros(cfg.hidden_size, np.float32)
    layer, direction = monitor
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"monitor layer {layer} out of range 0..{cfg.num_layers - 1}")
    direction = np.asarray(direction, np.float32)
    if direction.shape != (cfg.hidden_size,) or not np.all(np.isfinite(direction)):
        raise ValueError(f"monitor direction must be finite [D={cfg.hidden_size}]")
    return layer, direction / np.linalg.norm(direction)


def decode_inputs(
    cfg: ModelConfig,
    first_logits: jax.Array,
    position: jax.Array,
    eos_ids: Sequence[int],
    monitor: tuple[int, Any] | None = None,
) -> DecodeInputs:
    """The `DecodeInputs` of a prefill's `first_logits [B, V]` and `position [B]`: `eos_ids`
    as int32 (`[-1]` when empty: every row runs to `max_new_tokens`), and `monitor=(layer,
    r)` checked (`0 <= layer < L`, `r` finite `[D]`) with `r` normalised (zeros when None)."""
    eos = list(eos_ids) or [-1]
    monitor_layer, monitor_dir = _unit_monitor(cfg, monitor)
    return DecodeInputs(
        first_logits=first_logits,
        position=position,
        eos_ids=jnp.asarray(eos, jnp.int32),
        monitor_layer=jnp.int32(monitor_layer),
        monitor_dir=jnp.asarray(monitor_dir),
    )


class Decoded(NamedTuple):
    """`decode`'s outputs: `tokens, logprobs [B, N]`, `top_ids, top_logprobs [B, N, top_k]`,
    `projections [B, N]` (zeros without monitor) and the final `cache` (returned so the
    donated buffers are reused in place). Entries after a row's first EOS are padding."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    projections: jax.Array
    cache: KVCache


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
    static_argnames=("graphdef", "max_new_tokens", "top_k", "monitor", "options"),
    donate_argnames=("cache",),
)
def decode(
    graphdef: Any,
    params: Any,
    cache: KVCache,
    steering: Steering,
    inputs: DecodeInputs,
    sampling: SamplingParams,
    *,
    max_new_tokens: int,
    top_k: int,
    monitor: bool,
    options: RunOptions = DEFAULT_RUN,
) -> Decoded:
    """The decode loop. Token 0 comes from `inputs.first_logits [B, V]`; step i feeds token
    i-1 at `inputs.position + i - 1` and chooses token i with `sampling` (each row's
    uniform from its stream: `SamplingParams.uniforms(i)`). With `monitor`, one extra step
    feeds the last token so that every generated token's residual is projected. `options`
    (static): the attention implementation and each step's residual pin `[B, 1, D]`
    (`Layout.decode_resid`)."""
    n = max_new_tokens
    b = inputs.first_logits.shape[0]
    last_step = n if monitor else n - 1
    eos_ids = inputs.eos_ids

    def choose(logits, step, state_tokens, state_lps, top_ids, top_lps, done):
        # greedy (temperature 0) reads no uniforms: skip drawing the rows' streams
        u = jax.lax.cond(
            sampling.temperature > 0, sampling.uniforms, lambda _: jnp.zeros((b,)), step
        )
        tok = sample_tokens(logits, u, sampling.temperature, sampling.top_p)
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
        inputs.first_logits,
        0,
        jnp.zeros((b, n), jnp.int32),
        zeros,
        jnp.zeros((b, n, top_k), jnp.int32),
        jnp.zeros((b, n, top_k), jnp.float32),
        jnp.zeros((b,), bool),
    )
    state = _Loop(
        jnp.int32(1), cache, tok, inputs.position, done, tokens, lps, top_ids, top_lps, zeros
    )

    def cond(s: _Loop):
        return (s.step <= last_step) & ~jnp.all(s.done)

    def body(s: _Loop) -> _Loop:
        out = decode_step(
            graphdef,
            params,
            s.cache,
            s.token,
            s.position,
            steering=steering,
            taps=Taps(resid="full") if monitor else None,
            options=options,
        )
        proj = s.proj
        if monitor:
            h = jnp.take(out.resid_post, inputs.monitor_layer, axis=0)[:, 0].astype(jnp.float32)
            step_proj = h @ inputs.monitor_dir
            proj = jax.lax.dynamic_update_index_in_dim(proj, step_proj, s.step - 1, 1)
        tok, tokens, lps, ti, tl, done = choose(
            out.logits[:, 0], s.step, s.tokens, s.logprobs, s.top_ids, s.top_lps, s.done
        )
        return _Loop(s.step + 1, out.cache, tok, s.position + 1, done, tokens, lps, ti, tl, proj)

    s = jax.lax.while_loop(cond, body, state)
    return Decoded(s.tokens, s.logprobs, s.top_ids, s.top_lps, s.proj, s.cache)


class Prefilled(NamedTuple):
    """The prompts run into a fresh cache (`prefill_prompts`): `cache` (`S = T' + new + 1`
    slots, `T'` the padded prompt length), `logits [B', V]` and `position [B']` (each row's
    last logits and next position), the `steering` padded to the `B' >= B` rows (`pad_prompts`)
    and the mesh `layout` (None on one device)."""

    cache: KVCache
    logits: jax.Array
    position: jax.Array
    steering: Steering
    layout: Layout | None


def prefill_prompts(
    lm: LM,
    prompt_ids: Sequence[Sequence[int]],
    steering: Steering,
    *,
    max_new_tokens: int,
    pad_multiple: int = PAD_MULTIPLE,
) -> Prefilled:
    """What `generate_ids` does before decoding: pad the prompts (rows to the mesh, length
    left-padded to a multiple of `pad_multiple`), place them and a cache with room for
    `max_new_tokens` more, and run the jitted `prefill`. (Also the prefill alone that
    benchmarks time: the same compiled program.)"""
    pad_id = getattr(lm.tokenizer, "pad_token_id", None) or 0
    ids, mask = left_pad(pad_prompts(lm, prompt_ids), pad_multiple, pad_id)
    steering = pad_steering(steering, len(prompt_ids), len(ids))
    ids, mask, cache, layout = place_prompts(lm, ids, mask, ids.shape[1] + max_new_tokens + 1)
    steering = place_replicated(layout, steering)
    cache, logits, position = prefill(
        lm.graphdef,
        lm.params,
        ids,
        mask,
        steering,
        cache,
        options=lm.run_options(resid_sharding=None if layout is None else layout.prefill_resid),
    )
    return Prefilled(cache, logits, position, steering, layout)


def place_decode_args(
    layout: Layout | None, cache: KVCache, inputs: DecodeInputs, sampling: SamplingParams
) -> tuple[KVCache, DecodeInputs, SamplingParams]:
    """`decode`'s arguments where `layout` puts them, as `emgeo plan` compiles it: the
    prefill's cache (the same split under the layout's name: no copy) and per-row inputs
    split like the prompts, the rest on every device. As they are without a layout."""
    if layout is None:
        return cache, inputs, sampling
    move = functools.partial(move_to, donate=True)  # the prefill's outputs: consumed here
    cache = jax.tree.map(move, cache, layout.cache)
    inputs = DecodeInputs(
        move(inputs.first_logits, layout.rows),
        move(inputs.position, layout.rows),
        *place_replicated(layout, (inputs.eos_ids, inputs.monitor_layer, inputs.monitor_dir)),
    )
    return cache, inputs, place_replicated(layout, sampling)


def generate_ids(
    lm: LM,
    prompt_ids: Sequence[Sequence[int]],
    steering: Steering | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    streams: Sequence[tuple[int, int]] | None = None,
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
    sampling = SamplingParams.make(temperature, top_p, seed, len(prompt_ids), streams)
    steering = Steering.none(cfg) if steering is None else steering
    if steering.mask is not None:
        raise ValueError("generate: use positions='all'|'prompt'|'generated', not a token mask")
    eos = list(eos_token_ids(lm) if eos_ids is None else eos_ids) or [-1]  # [-1]: no EOS
    _unit_monitor(cfg, monitor)  # a bad monitor is refused before anything compiles

    pre = prefill_prompts(
        lm, prompt_ids, steering, max_new_tokens=max_new_tokens, pad_multiple=pad_multiple
    )
    sampling = sampling.padded_rows(pre.logits.shape[0])
    cache, inputs, sampling = place_decode_args(
        pre.layout, pre.cache, decode_inputs(cfg, pre.logits, pre.position, eos, monitor), sampling
    )
    outputs = decode(
        lm.graphdef,
        lm.params,
        cache,
        pre.steering,
        inputs,
        sampling,
        max_new_tokens=max_new_tokens,
        top_k=top_logprobs,
        monitor=monitor is not None,
        options=lm.run_options(
            resid_sharding=None if pre.layout is None else pre.layout.decode_resid
        ),
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
    streams: Sequence[tuple[int, int]] | None = None,
    system: str | None = None,
    top_logprobs: int = 0,
    monitor: tuple[int, Any] | None = None,
) -> Generation:
    """Generate a reply to each prompt (a user string or a list of chat messages).

    `steering`: a `Steering` (its position mode applies; see module docstring).
    `temperature=0` is greedy; `seed` fixes the PRNG key: row b samples as row b of a batch
    seeded `seed`, or, with `streams` (one `(seed, lane)` per prompt, `0 <= lane < len(prompts)`),
    as row `lane` of a batch seeded `seed`, whatever else is in the batch (`sampling` module
    docstring). `system` adds a system message.
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
        streams=streams,
        top_logprobs=top_logprobs,
        monitor=monitor,
    )
