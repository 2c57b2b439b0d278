"""Activations pinned on sharded meshes (extraction, generation prefill and decode): the same
results as one device, and compiled programs that move weights or activations as intended.

One process simulating 8 CPU devices runs the tiny Llama with its parameters split over
`fsdp=4 x tensor=2` and on one device, through the real entry points (`extract`,
`generate_ids`), recording the optimized HLO of each jitted program as it is called."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.multiprocess_generate import PROMPTS
from tests.test_plan import run_on_simulated_devices
from tests.tiny_models import LLAMA

ROWS, BUCKET = 8, 16  # extraction batches [8, 16]; prompts pad to [4, 8]
SCRIPT = textwrap.dedent(
    f"""
    import json, re
    import numpy as np
    import emgeo_jax.extract as ex
    import emgeo_jax.generate.loop as gen
    from emgeo_jax.data.tokenize import TokenizedExample
    from emgeo_jax.parallel import activation_sharding, make_mesh
    from emgeo_jax.models.llama import KVCache
    from emgeo_jax.generate import number_logprobs, number_trie
    from tests.multiprocess_generate import NEW_TOKENS, PROMPTS, run, tiny_lm
    import jax

    class Digits:  # spells a number one digit per token: digit d is token 10 + d
        def encode(self, text, add_special_tokens=False):
            return [10 + int(c) for c in text]

        def __len__(self):
            return {LLAMA["vocab_size"]}

    trie = number_trie(Digits(), {LLAMA["vocab_size"]},
                       lambda i: str(i - 10).encode() if 10 <= i < 20 else b"#", range(0, 101, 5))
    JUDGED = [p if len(p) > 1 else [3, *p] for p in PROMPTS]  # the scorer needs 2 tokens

    COLLECTIVE = re.compile(
        r"= (\\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
        r"(?:-start)?\\(.*?op_name=\\"([^\\"]*)\\""
    )
    compiled = {{}}

    def collectives(name):
        out = []
        for line in compiled[name].as_text().splitlines():
            m = COLLECTIVE.search(line)
            if m:
                dims = re.match(r"[a-z0-9]+\\[([0-9,]*)\\]", m.group(1))
                shape = [int(d) for d in dims.group(1).split(",") if d] if dims else None
                out.append([m.group(2), shape, "while/body" in m.group(3)])
        return out

    def recording(name, fn):
        def call(*args, **kw):
            compiled[name] = fn.lower(*args, **kw).compile()  # before the call donates
            return fn(*args, **kw)
        return call

    mesh = make_mesh({{"fsdp": 4, "tensor": 2}})
    rng = np.random.default_rng(0)
    examples = [
        TokenizedExample(rng.integers(1, {LLAMA["vocab_size"]}, n).astype(np.int32), n // 2,
                         n, i % 2, i, f"x:{{i}}")
        for i, n in enumerate([16, 9, 12, 16, 5, 14, 16, 11, 16, 7, 13, 16, 16, 10, 15, 16])
    ]
    settings = ex.ExtractSettings(batch_size={ROWS}, buckets=({BUCKET},))

    def results(lm, mesh):
        res = ex.extract(lm, examples, settings, pad_id=0)
        means = [res.means(w).tolist() for w in ("token", "example")]
        counts = [res.token_count.tolist(), res.example_count.tolist()]
        out = {{k: v.tolist() for k, v in run(lm).items()}}
        out["whole_number_logprobs"] = number_logprobs(lm, JUDGED, trie).logprobs.tolist()
        return means + counts, out

    one = results(tiny_lm(), make_mesh(devices=jax.devices()[:1]))
    gen.prefill, gen.decode = recording("prefill", gen.prefill), recording("decode", gen.decode)
    jitted_step = ex._jitted_step
    ex._jitted_step = lambda *a: recording("extract", jitted_step(*a))
    sharded = tiny_lm(mesh)
    pinned = results(sharded, mesh)
    cache = next(a for a in compiled["decode"].input_shardings[0] if isinstance(a, KVCache)).k
    kv = activation_sharding(mesh, "kv_cache", (sharded.config.num_layers, len(PROMPTS), 2,
                                                8 + NEW_TOKENS + 1, 16))
    print(json.dumps(dict(
        extraction=dict(one=one[0], sharded=pinned[0]),
        generations=dict(one=one[1], sharded=pinned[1]),
        collectives={{name: collectives(name) for name in compiled}},
        decode_cache_batch_split=cache.is_equivalent_to(kv, 5) and kv.spec[1] is not None,
    )))
    """
)


@pytest.fixture(scope="module")
def pinned() -> dict:
    return run_on_simulated_devices(SCRIPT, 8)


def test_sharded_extraction_and_generation_equal_one_device(pinned):
    """Class means (token- and example-weighted sums over counts) to 1e-5, the counts exactly
    (float32 sums of ~50 tokens of size ~1 differ in their last bits with the reduction
    order); greedy and sampled tokens identical, logprobs (and the judge's whole-number
    logprobs, which place their prompts and cache the same way) to 1e-5."""
    one, sharded = pinned["extraction"]["one"], pinned["extraction"]["sharded"]
    for a, b in zip(one[:2], sharded[:2], strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    assert one[2:] == sharded[2:]
    one, sharded = pinned["generations"]["one"], pinned["generations"]["sharded"]
    for key in one:
        if key.endswith("tokens"):
            assert sharded[key] == one[key], key
        else:
            np.testing.assert_allclose(sharded[key], one[key], atol=1e-5, rtol=0, err_msg=key)


def _gathered(collectives: list, in_scan: bool | None = None) -> list[tuple[int, ...]]:
    return [
        tuple(shape)
        for op, shape, body in collectives
        if op == "all-gather" and shape and in_scan in (None, body)
    ]


D, F = LLAMA["hidden_size"], LLAMA["intermediate_size"]
MLP_SHARDS = {(D, F // 2), (F // 2, D)}  # gate/up and down kernels, whole over fsdp


@pytest.mark.parametrize("program", ["extract", "prefill"])
def test_many_token_programs_gather_weights_per_layer_not_activations(pinned, program):
    """Inside the layer scan each device all-gathers the layer's weights (its tensor shard,
    whole over fsdp) and no collective carries the full batch `[B, T, ...]`: rows stay
    split over `fsdp`. Left free, the compiler splits the residual along `D` like the
    weights and moves whole-batch activations instead (every row on every device)."""
    collectives = pinned["collectives"][program]
    batch = (ROWS, BUCKET) if program == "extract" else (len(PROMPTS), 8)
    full_batch = [c for c in collectives if c[2] and c[1] and tuple(c[1][:2]) == batch]
    assert not full_batch, full_batch
    assert MLP_SHARDS <= set(_gathered(collectives, in_scan=True)), collectives


def test_decode_keeps_weights_in_place_and_the_cache_split_over_rows(pinned):
    """A decode step moves `[B, 1, ...]` activations only: no layer weight is all-gathered
    (the prefill gathers them), and the donated KV cache stays split over the batch."""
    prefill_weights = set(_gathered(pinned["collectives"]["prefill"], in_scan=True))
    decode = set(_gathered(pinned["collectives"]["decode"]))
    assert MLP_SHARDS <= prefill_weights
    assert not decode & prefill_weights, decode & prefill_weights
    assert pinned["decode_cache_batch_split"]
