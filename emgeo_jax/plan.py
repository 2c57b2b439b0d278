"""`emgeo plan`: will a model fit a mesh, and how fast will it run? Answered by the compiler.

The real jitted program of a task is lowered and compiled on *abstract* sharded arrays
(`jax.ShapeDtypeStruct` with `NamedSharding`s from `emgeo_jax.parallel`): no weights are
read or allocated, so Llama-3.1-70B on 64 devices plans on a laptop CPU whose process
simulates 64 devices (`JAX_NUM_CPU_DEVICES=64`).

From the compiled executable (one SPMD program = what *each device* runs):

- `memory_analysis()`: argument bytes (parameters + inputs), output bytes, temporaries,
  aliased (donated) bytes, per device.
- `cost_analysis()["flops"]`: per-device FLOPs of one call. XLA's cost analysis counts the
  body of a `while` loop once, and our layers run in one `lax.scan`, so one decoder block is
  compiled on its own (with the same cache length, or its gradient for training) and counted
  `L - 1` more times (tests check both facts against hand counts). Attention over more than
  `RunOptions.query_chunk` queries is itself a loop over query chunks (`chunked_attention`),
  so that block is compiled in one shot for its true count, and once more as the program
  runs it, to replace the one block the whole program's count holds.

Tasks are a registry `TASKS: name -> builder(cfg, mesh, batch, seq, dtype, options) ->
Program`. A program is one or more compiled `Part`s (each run `calls` times per task call)
plus hand-counted resident terms (parameters, KV cache, LoRA, optimizer state):

- `extract`: `emgeo_jax.extract`'s jitted step itself: the forward pass with the residual
  stream pooled on device into per-class sums `[2, L, D]`, no LM head. Tokens = `B * T`.
- `generate`: steered generation as `emgeo_jax.generate` runs it: the jitted `prefill` of
  `B` prompts of `T` tokens into a KV cache `[L, B, K, S, Dh]` (`S = T + N + 1`) and the
  jitted `decode` loop of `N = options.new_tokens` steps (its body counted `N` times), both
  with the cache donated, and tokens, cache and residual laid out by
  `generate.generation_layout`. Tokens = the `B * N` generated ones; memory is that of
  whichever phase needs more.
- `train`: one LoRA step of `emgeo_jax.train.sft.make_train_step` (answer-token loss,
  gradients to the fp32 factors only, clip + AdamW in `optax.MultiSteps`) on frozen
  params, the factors and optimizer state sharded by `parallel.LORA_AXES`, activations and
  logits split over the batch, blocks rematerialised (`TrainConfig.remat`: its FLOPs include
  the recomputed forward, ~8 rather than 6 FLOPs per matmul parameter). Tokens = `B * T`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.hosts import simulated_cpu_env
from emgeo_jax.models.attention import chunked_attention
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import DecoderBlock, KVCache, LoraInput, cache_shapes, rotary_tables
from emgeo_jax.models.lm import abstract_model, batch_multiple, resolve_dtype
from emgeo_jax.models.scan import DEFAULT_RUN, RunOptions
from emgeo_jax.models.steering import Steering
from emgeo_jax.parallel import (
    activation_sharding,
    batch_sharding,
    lora_shardings,
    param_sharding,
    param_shardings,
    shard_factor,
)

CHILD = "EMGEO_PLAN_CHILD"
# XLA:CPU has no bf16 matmul: it upcasts weights to f32, and loop-invariant code motion then
# hoists that cast of *every* layer's weights out of the scan (a CPU-only artefact that would
# show up as ~2x the parameters in temporaries). Keeping the cast inside the loop leaves one
# layer's f32 copy: temporaries stay an upper bound of what TPU/GPU need.
CPU_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def simulated_env(devices: int) -> dict[str, str]:
    """Environment for the plan's CPU process with `devices` simulated devices
    (`hosts.simulated_cpu_env`), marked as the plan's child, with `CPU_FLAGS`."""
    env = simulated_cpu_env(devices)
    env[CHILD] = "1"
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {CPU_FLAGS}"
    return env


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip (TPU) or GPU: dense bf16 peak FLOP/s, HBM capacity and bandwidth."""

    name: str
    bf16_flops: float
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    source: str


GiB = 2**30
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in [
        Accelerator("v4", 275e12, 32 * GiB, 1.2e12, "cloud.google.com/tpu/docs/v4 (per chip)"),
        Accelerator("v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e (per chip)"),
        Accelerator("v5p", 459e12, 95 * GiB, 2.765e12, "cloud.google.com/tpu/docs/v5p (per chip)"),
        Accelerator("v6e", 918e12, 32 * GiB, 1.64e12, "cloud.google.com/tpu/docs/v6e (per chip)"),
        Accelerator("a100-80g", 312e12, 80e9, 2.039e12, "NVIDIA A100 datasheet (SXM, dense bf16)"),
        Accelerator("h100-80g", 989e12, 80e9, 3.35e12, "NVIDIA H100 datasheet (SXM, dense bf16)"),
    ]
}

# `jax.Device.device_kind` -> `ACCELERATORS` name, exact strings only: "TPU v5" is a v5p
# ("TPU v5 lite" the v5e), "TPU v4 lite" is the 8 GiB inference v4 (not in the table), and
# GPUs name their memory and form factor ("NVIDIA H100 PCIe" has less peak and bandwidth
# than the SXM part the table holds). A kind not listed here is unknown, not guessed.
DEVICE_KINDS: dict[str, str] = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "NVIDIA A100-SXM4-80GB": "a100-80g",
    "NVIDIA H100 80GB HBM3": "h100-80g",
}


def accelerator_of(device_kind: str) -> Accelerator | None:
    """The `ACCELERATORS` entry of a device whose `device_kind` is this (`DEVICE_KINDS`), or
    None for CPU and for any chip the table does not hold exactly."""
    name = DEVICE_KINDS.get(device_kind.strip())
    return None if name is None else ACCELERATORS[name]


# HF config.json fields of the models users run (from their public config files), so that
# `emgeo plan --model Qwen2.5-7B` needs no download.
_QWEN = dict(model_type="qwen2", vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6)
_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)


def _shape(d, f, layers, heads, kv) -> dict:
    return dict(
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )


KNOWN_MODELS: dict[str, dict] = {
    "SmolLM2-135M": {
        **_shape(576, 1536, 30, 9, 3),
        "model_type": "llama",
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "Qwen2.5-7B": {**_QWEN, **_shape(3584, 18944, 28, 28, 4), "max_position_embeddings": 32768},
    "Qwen2.5-14B": {**_QWEN, **_shape(5120, 13824, 48, 40, 8), "max_position_embeddings": 32768},
    "Qwen2.5-32B": {**_QWEN, **_shape(5120, 27648, 64, 40, 8), "max_position_embeddings": 32768},
    "Llama-3.1-8B": {**_LLAMA3, **_shape(4096, 14336, 32, 32, 8)},
    "Llama-3.1-70B": {**_LLAMA3, **_shape(8192, 28672, 80, 64, 8)},
}


def resolve_model(spec: str) -> ModelConfig:
    """A `ModelConfig` from a known name (`KNOWN_MODELS`, `-Instruct` suffix allowed), an HF
    `config.json`, an HF model folder, or an `emgeo convert` checkpoint folder; `default` is
    the embedded SmolLM2-135M-Instruct, as everywhere else."""
    name = "SmolLM2-135M" if spec == "default" else spec.split("/")[-1].removesuffix("-Instruct")
    if name in KNOWN_MODELS and not Path(spec).exists():
        return ModelConfig.from_hf(KNOWN_MODELS[name], source=name)
    path = Path(spec)
    if path.is_file():
        return ModelConfig.from_hf_file(path)
    if (path / "COMPLETE").exists():
        return ModelConfig.from_json((path / "config.json").read_text())
    if (path / "config.json").exists():
        return ModelConfig.from_hf_file(path / "config.json")
    raise ValueError(
        f"--model {spec}: not a known model ({', '.join(KNOWN_MODELS)}), config.json, "
        "HF folder or emgeo checkpoint"
    )


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Task settings beyond batch and length: generated tokens per prompt (`generate`,
    `sweep`), LoRA rank and targets (`train`; adapters on every layer, alpha = 2 * rank),
    and the local judge of `sweep`: its model (`judge`; None = a remote judge, nothing to
    compile; `judge_is_model` = the swept model judges itself, so no second copy of the
    parameters), tokens of the judge prompt + answer (`judge_seq`), rows per scoring call
    (`judge_batch`, default the sweep's batch), metrics scored per answer
    (`judge_metrics`: aligned and coherent) and nodes of the whole-number token trie
    (`judge_trie`: 1 + 10 + 90 + 1 = 102 for 0..100 spelled digit by digit, as Qwen2.5,
    Llama-3 and SmolLM2 tokenizers do up to 3 digits or fewer; see `generate.numbers`)."""

    new_tokens: int = 256
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    judge: ModelConfig | None = None
    judge_is_model: bool = False
    judge_seq: int = 512
    judge_batch: int | None = None
    judge_metrics: int = 2
    judge_trie: int = 102


@dataclasses.dataclass
class Part:
    """One jitted function of a task with its abstract (sharded) arguments, run `calls`
    times per task call; `layer_fn(*layer_args)` is one decoder block of it (FLOPs), with
    attention in one shot; `looped_layer_fn` (same arguments), when attention loops over
    query chunks, is the block as `fn` runs it (XLA counts one chunk of that loop)."""

    name: str
    fn: Any
    args: tuple
    calls: int
    layer_fn: Any
    layer_args: tuple
    looped_layer_fn: Any = None
    static: dict = dataclasses.field(default_factory=dict)  # keyword arguments of `fn`
    # bytes per device that exist only while this part's phase runs (its KV cache, inputs),
    # added to `Program.resident` for the part that needs the most memory
    resident: dict = dataclasses.field(default_factory=dict)
    num_layers: int | None = None  # of this part's model, when not the program's (a judge)

    def lower(self):
        return self.fn.lower(*self.args, **self.static)


@dataclasses.dataclass
class Program:
    """A task: its compiled parts and hand counts of what each device keeps resident.

    `resident`: bytes per device by the partition rules, e.g. `{"params", "kv_cache",
    "inputs"}`; `in_temporaries`: hand counts the compiler reports inside its temporaries
    (e.g. LoRA gradients), shown for reference only. `bytes_read`: HBM bytes one task call
    reads at least (every parameter once per forward, backward or decode step)."""

    parts: list[Part]
    tokens: int  # tokens produced (generate) or processed per task call
    resident: dict[str, int]
    in_temporaries: dict[str, int]
    bytes_read: int
    num_layers: int
    description: str


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    return sum(
        math.prod(leaf.shape) * leaf.dtype.itemsize // shard_factor(leaf.sharding)
        for leaf in jax.tree.leaves(tree)
    )


def sharded_abstract_params(cfg: ModelConfig, mesh: Mesh, dtype) -> tuple[Any, Any, int]:
    """`(graphdef, abstract nnx.State with NamedShardings, param bytes per device)`."""
    graphdef, state = abstract_model(cfg, dtype)
    pure = nnx.to_pure_dict(state)
    shardings = param_shardings(mesh, pure)
    sharded = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), pure, shardings
    )
    per_device = bytes_per_device(sharded)
    nnx.replace_by_pure_dict(state, sharded)
    return graphdef, state, per_device


def _sharded(tree, shardings):
    """Abstract arrays of `tree`'s shapes and dtypes carrying `shardings` (same structure)."""
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings
    )


def _replicated(mesh: Mesh, tree):
    return _sharded(tree, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree))


def _drop_layer_axis(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _block_program(
    cfg: ModelConfig,
    mesh: Mesh,
    batch: int,
    seq: int,
    dtype,
    cache_len: int | None = None,
    lora: dict | None = None,
    remat: bool = False,
    x_sharding: NamedSharding | None = None,
):
    """One decoder block on `x [B, T, D]` with one layer's sharded params (FLOPs per layer):
    `(jitted block, its abstract arguments, looped)`. The block's attention runs in one shot
    (whole FLOPs); when the model attends in query chunks (`T > RunOptions.query_chunk`),
    `looped` is the same block with that loop (else None).

    `x_sharding`: of `x` and the block output (default: the "resid" rule, rows split).
    `cache_len = S`: attention runs over a KV cache `[B, K, S, Dh]` (prefill and decode).
    `lora` (one layer's `LoraInput.factors`, abstract and sharded): the block's step as in
    LoRA training instead, i.e. the summed output and its gradient with respect to `x` and
    the factors (frozen kernels get none), the block recomputed in the backward pass when
    `remat` (as `Transformer(remat=True)` does)."""
    block = nnx.eval_shape(
        lambda: DecoderBlock(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    block_def, state = nnx.split(block)
    chunk = DEFAULT_RUN.query_chunk
    looped = seq > chunk  # attention loops over query chunks: count it in one shot too

    def layer_leaf(path, leaf):
        full = param_sharding(mesh, ("layers", *(str(k.key) for k in path)), (1, *leaf.shape))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_drop_layer_axis(full))

    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(layer_leaf, nnx.to_pure_dict(state))
    )
    if x_sharding is None:
        resid = activation_sharding(mesh, "resid", (1, batch, seq, cfg.hidden_size))
        x_sharding = _drop_layer_axis(resid)
    x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), dtype, sharding=x_sharding)
    tokens = jax.ShapeDtypeStruct(
        (batch, seq), jnp.int32, sharding=activation_sharding(mesh, "tokens", (batch, seq))
    )
    kv = None
    if cache_len is not None:
        shape = (1, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
        kv_sharding = _drop_layer_axis(activation_sharding(mesh, "kv_cache", shape))
        kv = (jax.ShapeDtypeStruct(shape[1:], dtype, sharding=kv_sharding),) * 2

    def program(query_chunk: int):
        def block_out(state, x, positions, attention_mask, kv, factors=None):
            sin, cos = rotary_tables(cfg, positions)
            keys = seq if kv is None else cache_len  # this call's tokens go to slots 0..T-1
            causal = jnp.arange(keys)[None, :] <= jnp.arange(seq)[:, None]
            valid = jnp.pad(attention_mask, ((0, 0), (0, keys - seq))).astype(bool)
            mask = causal[None] & valid[:, None]
            adapters = None if factors is None else LoraInput(factors)
            block = nnx.merge(block_def, state)
            attend = functools.partial(chunked_attention, mask=mask, chunk=query_chunk)
            return block(x, sin, cos, attend, kv, 0, adapters)[0].resid_post

        if lora is None:
            return jax.jit(block_out, out_shardings=x_sharding)
        run = block_out
        if remat:
            run = jax.checkpoint(block_out, policy=jax.checkpoint_policies.nothing_saveable)

        def loss(x, factors, state, positions, attention_mask):
            out = run(state, x, positions, attention_mask, None, factors)
            return jnp.sum(out.astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    args = (state, x, tokens, tokens, kv) if lora is None else (x, lora, state, tokens, tokens)
    return program(max(seq, chunk)), args, program(chunk) if looped else None


def _tokens(mesh: Mesh, batch: int, seq: int, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    sharding = activation_sharding(mesh, "tokens", (batch, seq))
    return jax.ShapeDtypeStruct((batch, seq), dtype, sharding=sharding)


def extract_program(
    cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype, options: TaskOptions
) -> Program:
    """`emgeo_jax.extract`'s jitted step over every layer (inputs as its runner places them):
    the residual stream pooled on device into per-class sums `[2, L, D]`; no LM head."""
    from emgeo_jax.extract import _jitted_step

    graphdef, state, param_bytes = sharded_abstract_params(cfg, mesh, dtype)
    inputs = {
        "input_ids": _tokens(mesh, batch, seq),
        "positions": _tokens(mesh, batch, seq),
        "attention_mask": _tokens(mesh, batch, seq),
        "pool_mask": _tokens(mesh, batch, seq, jnp.bool_),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding(mesh, 1)),
        "example_index": jax.ShapeDtypeStruct(
            (batch,), jnp.int32, sharding=batch_sharding(mesh, 1)
        ),
    }
    fn = _jitted_step(graphdef, tuple(range(cfg.num_layers)), False, mesh)
    layer = _block_program(cfg, mesh, batch, seq, dtype)
    return Program(
        parts=[Part("forward", fn, (state, inputs), 1, *layer)],
        tokens=batch * seq,
        resident={"params": param_bytes, "inputs": bytes_per_device(inputs)},
        in_temporaries={},
        bytes_read=param_bytes,
        num_layers=cfg.num_layers,
        description="forward, residual stream pooled on device (per-class sums [2, L, D]), "
        "no LM head",
    )


def abstract_kv_cache(cfg: ModelConfig, shardings: KVCache, batch: int, length: int, dtype):
    """`KVCache` of abstract arrays (`k, v [L, B, K, S, Dh]`, `mask [B, S]`, `index []`)
    carrying `shardings` (`generate.generation_layout(...).cache`)."""
    return _sharded(cache_shapes(cfg, batch, length, dtype), shardings)


def generate_program(
    cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype, options: TaskOptions
) -> Program:
    """Steered generation of `N = options.new_tokens` tokens for `B` prompts of `T` tokens:
    `emgeo_jax.generate.prefill` and `decode` (a `while_loop` whose body, one decode step,
    XLA counts once: the part runs `N` times)."""
    from emgeo_jax.generate import (
        DecodeInputs,
        SamplingParams,
        decode,
        decode_inputs,
        generation_layout,
        prefill,
    )

    n = options.new_tokens
    if n < 1:
        raise ValueError(f"new_tokens={n} must be >= 1")
    graphdef, state, param_bytes = sharded_abstract_params(cfg, mesh, dtype)
    length = seq + n + 1  # as generate_ids allocates it
    layout = generation_layout(mesh, cfg, batch, seq, length)
    cache = abstract_kv_cache(cfg, layout.cache, batch, length, dtype)
    steering = _replicated(mesh, jax.eval_shape(lambda: Steering.none(cfg)))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=layout.tokens)
    prefill_pin, decode_pin = layout.prefill_resid, layout.decode_resid  # None on one device
    # decode's arguments are what the real functions make of these, placed as generate_ids
    # places them (`generate.place_decode_args`): prefill's outputs, decode_inputs, sampling
    run_prefill = functools.partial(
        prefill, graphdef, options=RunOptions(resid_sharding=prefill_pin)
    )
    cache_out, logits, position = jax.eval_shape(
        run_prefill, state, tokens, tokens, steering, cache
    )
    rows, one = layout.rows, layout.replicated
    inputs = _sharded(
        jax.eval_shape(lambda lg, pos: decode_inputs(cfg, lg, pos, eos_ids=[0]), logits, position),
        DecodeInputs(first_logits=rows, position=rows, eos_ids=one, monitor_layer=one,
                     monitor_dir=one),
    )  # fmt: skip
    sampling = SamplingParams.make(rows=batch)  # small host-made arrays: their shapes
    sampling = _replicated(mesh, jax.eval_shape(lambda: sampling))
    prefill_layer = _block_program(
        cfg, mesh, batch, seq, dtype, cache_len=length, x_sharding=prefill_pin
    )
    decode_layer = _block_program(
        cfg, mesh, batch, 1, dtype, cache_len=length, x_sharding=decode_pin
    )
    kv_bytes = bytes_per_device((cache.k, cache.v))
    decode_static = dict(
        max_new_tokens=n, top_k=0, monitor=False, options=RunOptions(resid_sharding=decode_pin)
    )
    parts = [
        Part("prefill", prefill, (graphdef, state, tokens, tokens, steering, cache), 1,
             *prefill_layer, static=dict(options=RunOptions(resid_sharding=prefill_pin))),
        Part("decode", decode, (graphdef, state, _sharded(cache_out, layout.cache), steering,
                                inputs, sampling),
             n, *decode_layer, static=decode_static),
    ]  # fmt: skip
    return Program(
        parts=parts,
        tokens=batch * n,
        resident={
            "params": param_bytes,
            "kv_cache": kv_bytes,
            "inputs": bytes_per_device((tokens, tokens, steering, cache.mask)),
        },
        in_temporaries={},
        bytes_read=(n + 1) * (param_bytes + kv_bytes),
        num_layers=cfg.num_layers,
        description=(
            f"steered generation: prefill of T={seq} prompt tokens + {n} decode steps, "
            f"KV cache [L, B, K, S={length}, Dh] sharded; tokens = generated tokens"
        ),
    )


def train_program(
    cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype, options: TaskOptions
) -> Program:
    """One LoRA training step (`emgeo_jax.train.sft.make_train_step`) on `B` rows of `T`
    tokens: frozen params, fp32 factors on every layer, AdamW state in `optax.MultiSteps`."""
    from emgeo_jax.train.lora import PEFT_MODULES, LoraSpec, init_lora
    from emgeo_jax.train.sft import TrainConfig, make_train_step

    spec = LoraSpec(
        rank=options.lora_rank,
        alpha=2.0 * options.lora_rank,
        targets=options.lora_targets,
        layers=tuple(range(cfg.num_layers)),
    )
    graphdef, state, param_bytes = sharded_abstract_params(cfg, mesh, dtype)
    tc = TrainConfig()
    step, optimizer = make_train_step(graphdef, spec, tc, mesh)
    lora = jax.eval_shape(lambda: init_lora(cfg, spec, jax.random.key(0)))
    lora = _sharded(lora, lora_shardings(mesh, lora))
    opt_state = jax.eval_shape(optimizer.init, lora)
    opt_state = _sharded(opt_state, lora_shardings(mesh, opt_state))
    tokens = _tokens(mesh, batch, seq)
    batch_args = {
        "input_ids": tokens,
        "attention_mask": tokens,
        "positions": tokens,
        "answer_mask": _tokens(mesh, batch, seq, jnp.bool_),
    }
    one_layer = {
        PEFT_MODULES[t]: {
            k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=_drop_layer_axis(v.sharding))
            for k, v in lora[t].items()
        }
        for t in spec.targets
    }
    layer = _block_program(cfg, mesh, batch, seq, dtype, lora=one_layer, remat=tc.remat)
    key = _replicated(mesh, jax.eval_shape(lambda: jax.random.key(0)))  # LoRA dropout key
    lora_bytes = bytes_per_device(lora)
    args = (lora, opt_state, state, batch_args, None, key)
    return Program(
        parts=[Part("train step", step, args, 1, *layer)],
        tokens=batch * seq,
        resident={
            "params": param_bytes,
            "lora": lora_bytes,
            "opt_state": bytes_per_device(opt_state),
            "inputs": bytes_per_device(batch_args),
        },
        in_temporaries={"lora_grads": lora_bytes},
        bytes_read=(3 if tc.remat else 2) * param_bytes,  # forward, (recompute,) backward
        num_layers=cfg.num_layers,
        description=(
            f"LoRA step: rank {spec.rank} on {','.join(spec.targets)} of every layer, fp32 "
            "factors + AdamW (MultiSteps) state, forward + backward of frozen params"
            + (", blocks recomputed in the backward pass (remat)" if tc.remat else "")
        ),
    )


def judge_part(judge: ModelConfig, mesh: Mesh, dtype, options: TaskOptions, state=None):
    """The local judge's scoring call (`generate.numbers.score_trie`, run once per metric): a
    prefill of `judge_batch` rows of `judge_seq - 1` tokens (judge prompt + answer, without
    the last token) into a cache of `judge_seq - 1 + judge_trie` slots, then one forward of
    the whole-number trie. `state`: the judge's abstract sharded params when already built
    (the swept model judging itself). Returns `(Part, judge param bytes per device)`."""
    from emgeo_jax.generate import JUDGE_NUMBERS, NumberTrie, generation_layout
    from emgeo_jax.generate.numbers import score_trie

    batch, seq, m = options.judge_batch, options.judge_seq - 1, options.judge_trie
    if seq < 1 or m < 2:
        raise ValueError(f"judge_seq={options.judge_seq} must be >= 2, judge_trie={m} >= 2")
    graphdef, state_, param_bytes = sharded_abstract_params(judge, mesh, dtype)
    state = state_ if state is None else state
    length = seq + m
    layout = generation_layout(mesh, judge, batch, seq, length)
    cache = abstract_kv_cache(judge, layout.cache, batch, length, dtype)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=layout.tokens)
    blank = NumberTrie.blank(m, len(JUDGE_NUMBERS), judge.vocab_size)
    trie = _replicated(mesh, jax.eval_shape(blank.arrays))  # the argument number_logprobs passes
    last = _replicated(mesh, jax.ShapeDtypeStruct((batch,), jnp.int32))
    steering = _replicated(mesh, jax.eval_shape(lambda: Steering.none(judge)))
    pin = layout.prefill_resid  # None on one device
    prompt_block = _block_program(judge, mesh, batch, seq, dtype, cache_len=length, x_sharding=pin)
    trie_block = _block_program(judge, mesh, batch, m, dtype, cache_len=length)
    layer_fn, layer_args, looped = _both_blocks(prompt_block, trie_block)
    args = (graphdef, state, tokens, tokens, last, steering, cache, trie)
    part = Part(
        "judge scoring",
        score_trie,
        args,
        options.judge_metrics,
        layer_fn,
        layer_args,
        looped,
        static=dict(top_k=20, options=RunOptions(resid_sharding=pin)),
        resident={
            "judge_kv_cache": bytes_per_device((cache.k, cache.v)),
            "judge_inputs": bytes_per_device((tokens, tokens, last, trie, cache.mask)),
        },
        num_layers=judge.num_layers,
    )
    return part, param_bytes


def _both_blocks(first, second):
    """One jitted function running two `_block_program` blocks (a part with two layer
    scans, e.g. the judge's prompt pass and trie pass): `(fn, args, looped or None)`."""
    (f1, a1, l1), (f2, a2, l2) = first, second
    fn = jax.jit(lambda x, y: (f1(*x), f2(*y)))
    looped = None
    if l1 is not None or l2 is not None:
        looped = jax.jit(lambda x, y: ((l1 or f1)(*x), (l2 or f2)(*y)))
    return fn, (a1, a2), looped


def sweep_program(
    cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype, options: TaskOptions
) -> Program:
    """One cell of `emgeo sweep` (`experiments`): steered generation of `B` answers as in
    `generate` (`generate_program`), then, with a local judge (`options.judge`), its
    whole-number scoring of those answers, once per metric (`judge_part`). The two phases
    run one after the other, so each keeps its own KV cache and inputs only while it runs;
    the parameters (and a second model's, when the judge is another model) stay resident."""
    gen = generate_program(cfg, mesh, batch, seq, dtype, options)
    for part in gen.parts:
        part.resident = {k: gen.resident[k] for k in ("kv_cache", "inputs")}
    resident = {"params": gen.resident["params"]}
    parts, bytes_read = list(gen.parts), gen.bytes_read
    judged = "remote judge (nothing compiled for it)"
    if options.judge is not None:
        judge_opts = dataclasses.replace(options, judge_batch=options.judge_batch or batch)
        state = gen.parts[0].args[1] if options.judge_is_model else None
        judge, judge_bytes = judge_part(options.judge, mesh, dtype, judge_opts, state)
        parts.append(judge)
        if not options.judge_is_model:
            resident["judge_params"] = judge_bytes
        bytes_read += options.judge_metrics * 2 * judge_bytes  # prompt pass + trie pass
        who = "the model itself" if options.judge_is_model else "a second model on the mesh"
        judged = (
            f"local judge ({who}): {options.judge_metrics} scoring passes of "
            f"{judge_opts.judge_batch} x {options.judge_seq} tokens + a {options.judge_trie}-node "
            "number trie"
        )
    return Program(
        parts=parts,
        tokens=gen.tokens,
        resident=resident,
        in_temporaries={},
        bytes_read=bytes_read,
        num_layers=cfg.num_layers,
        description=f"sweep cell: {gen.description}; {judged}",
    )


TASKS: dict[str, Callable[..., Program]] = {
    "extract": extract_program,
    "generate": generate_program,
    "train": train_program,
    "sweep": sweep_program,
}


@dataclasses.dataclass
class Plan:
    """Compiler figures for one (model, mesh, task, batch, seq), per device unless named.

    `resident` (hand counts by the partition rules: params, kv_cache, lora, opt_state,
    inputs) + the compiler's outputs (not aliased to donated inputs) and temporaries of the
    part that needs the most (`memory_part`) make up the total."""

    model: str
    mesh: dict[str, int]
    task: str
    batch: int
    seq: int
    dtype: str
    description: str
    devices: int
    tokens_per_call: int
    resident: dict[str, int]
    in_temporaries: dict[str, int]  # hand counts inside `temporaries`, for reference
    bytes_read: int  # HBM bytes read per call at least (for the bandwidth bound)
    memory_part: str
    arguments: int  # compiler: the parameters the program reads + inputs
    outputs: int
    temporaries: int
    aliased: int
    flops_per_device: float  # one call, scan/loop bodies counted as often as they run
    part_flops: dict[str, float]  # the same, per part (all its calls)
    compile_seconds: float
    rows: int | None = None  # rows the program runs: `batch` padded for the mesh

    @property
    def params_hand(self) -> int:
        return self.resident["params"]

    @property
    def total_bytes(self) -> int:
        return sum(self.terms().values())

    @property
    def flops_per_token(self) -> float:
        return self.flops_per_device * self.devices / self.tokens_per_call

    def terms(self) -> dict[str, int]:
        return {
            **self.resident,
            "outputs": self.outputs - self.aliased,
            "temporaries": self.temporaries,
        }

    def fits(self, acc: Accelerator) -> bool:
        return self.total_bytes <= acc.hbm_bytes

    def tokens_per_second(self, acc: Accelerator, mfu: float) -> float:
        """Whole-mesh tokens/s at `mfu`, or at the HBM bound if slower (`bytes_read` per
        call: every parameter once per forward, backward or decode step, plus the cache)."""
        compute_s = self.flops_per_device / (mfu * acc.bf16_flops)
        memory_s = self.bytes_read / acc.hbm_bandwidth
        return self.tokens_per_call / max(compute_s, memory_s)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@dataclasses.dataclass
class CompiledProgram:
    """A task's `Program` and its parts compiled (`jax.stages.Compiled`, one per part, in
    order): what `make_plan` reads, and what a caller holding concrete arrays placed as the
    parts' abstract arguments can run (`benchmarks/device.py` times them) without compiling
    the same program a second time."""

    program: Program
    parts: list[Any]
    seconds: float  # compiling all parts


def padded_rows(batch: int, mesh: Mesh) -> int:
    """The rows a command runs for a batch of `batch` on `mesh`: `batch` rounded up to a
    multiple of `data x fsdp` (`models.lm.batch_multiple`). Every command pads so (copies of
    a row: `LM.place_rows`, `generate.pad_prompts`, extraction's runner), so a plan compiles
    that many rows, split over the mesh as the command places them."""
    multiple = batch_multiple(mesh)
    return -(-batch // multiple) * multiple


def compile_program(
    cfg: ModelConfig,
    mesh: Mesh,
    task: str,
    batch: int,
    seq: int,
    dtype: str,
    options: TaskOptions | None = None,
) -> CompiledProgram:
    """Build `task`'s program for `cfg` on `mesh` (abstract arrays only) and compile its parts.
    The program runs `padded_rows(batch, mesh)` rows (and judge rows), as the command would;
    its `tokens` count the `batch` real rows only."""
    import time

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    options = options or TaskOptions()
    rows = padded_rows(batch, mesh)
    if options.judge_batch:
        options = dataclasses.replace(options, judge_batch=padded_rows(options.judge_batch, mesh))
    program = TASKS[task](cfg, mesh, rows, seq, resolve_dtype(dtype), options)
    if rows != batch:  # the padding rows' tokens are work, not output
        program.tokens = program.tokens // rows * batch
        program.description += (
            f"; batch {batch} padded to {rows} rows (the mesh splits rows "
            f"{batch_multiple(mesh)} ways), as the commands pad their batches"
        )
    start = time.perf_counter()
    parts = [part.lower().compile() for part in program.parts]
    return CompiledProgram(program, parts, time.perf_counter() - start)


def make_plan(
    cfg: ModelConfig,
    mesh: Mesh,
    task: str = "extract",
    batch: int = 8,
    seq: int = 2048,
    dtype: str = "bfloat16",
    model_name: str = "",
    options: TaskOptions | None = None,
    compiled: CompiledProgram | None = None,
) -> Plan:
    """Compile `task`'s program for `cfg` on `mesh` (abstract arrays only; or take `compiled`,
    made by `compile_program` with the same arguments) and read the compiler's per-device
    memory and FLOPs."""
    if compiled is None:
        compiled = compile_program(cfg, mesh, task, batch, seq, dtype, options)
    program, seconds, executables = compiled.program, compiled.seconds, compiled.parts
    part_flops = {}
    for part, c in zip(program.parts, executables, strict=True):
        layer = _flops(part.layer_fn.lower(*part.layer_args).compile())
        counted = layer  # the block inside `c`, as XLA counted it
        if part.looped_layer_fn is not None:
            counted = _flops(part.looped_layer_fn.lower(*part.layer_args).compile())
        layers = part.num_layers or program.num_layers
        part_flops[part.name] = part.calls * (_flops(c) - counted + layers * layer)
    mems = [c.memory_analysis() for c in executables]
    peak = max(
        range(len(mems)),
        key=lambda i: mems[i].temp_size_in_bytes + mems[i].output_size_in_bytes
        - mems[i].alias_size_in_bytes + sum(program.parts[i].resident.values()),
    )  # fmt: skip
    mem = mems[peak]
    return Plan(
        model=model_name,
        mesh=dict(mesh.shape),
        task=task,
        batch=batch,
        seq=seq,
        dtype=str(dtype),
        description=program.description,
        devices=mesh.size,
        tokens_per_call=program.tokens,
        resident={**program.resident, **program.parts[peak].resident},
        in_temporaries=program.in_temporaries,
        bytes_read=program.bytes_read,
        memory_part=program.parts[peak].name,
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        flops_per_device=sum(part_flops.values()),
        part_flops=part_flops,
        compile_seconds=seconds,
        rows=padded_rows(batch, mesh),
    )


def format_plan(plan: Plan, accelerators: list[Accelerator], mfu: float) -> str:
    """The human-readable report: memory per device, FLOPs, fit and tokens/s per chip type."""
    gb = 1e9
    lines = [
        f"{plan.model} | task {plan.task}: {plan.description}",
        f"mesh {plan.mesh} ({plan.devices} devices), batch {plan.batch} x seq {plan.seq}"
        + (f" (run as {plan.rows} rows)" if plan.rows and plan.rows != plan.batch else "")
        + f", {plan.dtype}; compiled in {plan.compile_seconds:.1f} s",
        f"per-device memory (outputs and temporaries: compiler, {plan.memory_part}):",
    ]
    for name, value in plan.terms().items():
        lines.append(f"  {name:<12} {value / gb:9.3f} GB")
    lines.append(f"  {'total':<12} {plan.total_bytes / gb:9.3f} GB")
    for name, value in plan.in_temporaries.items():
        lines.append(f"  (of the temporaries: {name} {value / gb:.3f} GB)")
    lines.append(
        f"  (params = every resident parameter under the partition rules; the compiled program "
        f"reads {plan.arguments / gb:.3f} GB of arguments)"
    )
    lines.append(
        f"FLOPs per token {plan.flops_per_token / 1e9:.2f} GFLOP "
        f"({plan.flops_per_device / 1e12:.2f} TFLOP per device per call)"
    )
    lines.append(f"expected throughput at MFU {mfu:.0%} (or the HBM bound if slower):")
    largest = max(plan.terms().items(), key=lambda kv: kv[1])
    for acc in accelerators:
        if plan.fits(acc):
            verdict = f"{plan.tokens_per_second(acc, mfu):12,.0f} tokens/s"
        else:
            verdict = (
                f"does not fit: {plan.total_bytes / gb:.1f} GB > {acc.hbm_bytes / gb:.1f} GB HBM; "
                f"largest term {largest[0]} {largest[1] / gb:.1f} GB"
            )
        lines.append(f"  {acc.name:<9} {verdict}   [{acc.source}]")
    return "\n".join(lines)


def plan_json(plan: Plan, accelerators: list[Accelerator], mfu: float) -> str:
    d = dataclasses.asdict(plan)
    d.update(
        total_bytes=plan.total_bytes,
        flops_per_token=plan.flops_per_token,
        params_hand=plan.params_hand,
        mfu=mfu,
    )
    d["accelerators"] = {
        a.name: {
            "fits": plan.fits(a),
            "tokens_per_second": plan.tokens_per_second(a, mfu) if plan.fits(a) else None,
        }
        for a in accelerators
    }
    return json.dumps(d, indent=2)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=4,fsdp=8"` -> `{"data": 4, "fsdp": 8}`."""
    out = {}
    for part in filter(None, text.split(",")):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs like data=4,fsdp=8")
        out[axis.strip()] = int(size)
    return out
