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
  compiled on its own and counted `L - 1` more times (tests check both facts).

Tasks are a registry `TASKS: name -> builder(cfg, mesh, batch, seq, dtype) -> Program`.
`extract` is the forward pass with the residual stream pooled on device (masked token sums
`[L, B, D]`, what extraction keeps), no LM head. `generate` (prefill + decode step with a
sharded KV cache) and `train` (LoRA) wait for the code they compile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import DecoderBlock, rotary_tables
from emgeo_jax.models.lm import abstract_model, forward, resolve_dtype
from emgeo_jax.parallel import (
    activation_sharding,
    param_sharding,
    param_shardings,
    shard_factor,
)
from emgeo_jax.steer import Taps

CHILD = "EMGEO_PLAN_CHILD"
# XLA:CPU has no bf16 matmul: it upcasts weights to f32, and loop-invariant code motion then
# hoists that cast of *every* layer's weights out of the scan (a CPU-only artefact that would
# show up as ~2x the parameters in temporaries). Keeping the cast inside the loop leaves one
# layer's f32 copy: temporaries stay an upper bound of what TPU/GPU need.
CPU_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def simulated_env(devices: int) -> dict[str, str]:
    """Environment for a CPU process with `devices` simulated devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **{CHILD: "1"})
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}", CPU_FLAGS]
    ).strip()
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
    `config.json`, an HF model folder, or an `emgeo convert` checkpoint folder."""
    name = spec.split("/")[-1].removesuffix("-Instruct")
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


@dataclasses.dataclass
class Program:
    """A jitted function, its abstract (sharded) arguments, and what one call processes."""

    fn: Any  # jax.jit-wrapped callable
    args: tuple
    tokens: int  # tokens processed per call
    param_bytes_per_device: int  # all resident parameters, by the partition rules
    layer_fn: Any  # jitted single decoder block (for FLOPs, see module docstring)
    layer_args: tuple
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


def _block_program(cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype):
    """One decoder block on `x [B, T, D]` with one layer's sharded params (FLOPs per layer)."""
    block = nnx.eval_shape(
        lambda: DecoderBlock(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    block_def, state = nnx.split(block)

    def layer_leaf(path, leaf):
        full = param_sharding(mesh, ("layers", *(str(k.key) for k in path)), (1, *leaf.shape))
        spec = PartitionSpec(*full.spec[1:])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(layer_leaf, nnx.to_pure_dict(state))
    )
    resid = activation_sharding(mesh, "resid", (1, batch, seq, cfg.hidden_size))
    x_sharding = NamedSharding(mesh, PartitionSpec(*resid.spec[1:]))
    x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), dtype, sharding=x_sharding)
    tokens = jax.ShapeDtypeStruct(
        (batch, seq), jnp.int32, sharding=activation_sharding(mesh, "tokens", (batch, seq))
    )

    def run(state, x, positions, attention_mask):
        sin, cos = rotary_tables(cfg, positions)
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        mask = causal[None] & attention_mask.astype(bool)[:, None, :]
        return nnx.merge(block_def, state)(x, sin, cos, mask)[0]

    return jax.jit(run, out_shardings=x_sharding), (state, x, tokens, tokens)


def extract_program(cfg: ModelConfig, mesh: Mesh, batch: int, seq: int, dtype) -> Program:
    """Forward pass with the residual stream after every block pooled on device: masked
    token sums `[L, B, D]` (fp32) and counts `[B]`; no LM head."""
    graphdef, state, param_bytes = sharded_abstract_params(cfg, mesh, dtype)
    tok_sharding = activation_sharding(mesh, "tokens", (batch, seq))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=tok_sharding)
    pooled = activation_sharding(mesh, "resid", (cfg.num_layers, batch, 1, cfg.hidden_size))
    pooled = NamedSharding(mesh, PartitionSpec(*pooled.spec[:2], pooled.spec[3]))

    def pooled_forward(params, input_ids, positions, attention_mask):
        out = forward(
            graphdef,
            params,
            input_ids,
            positions,
            attention_mask,
            taps=Taps(resid="pooled"),
            return_logits=False,
        )
        return out.resid_post, out.counts

    fn = jax.jit(
        pooled_forward,
        out_shardings=(pooled, NamedSharding(mesh, PartitionSpec(tok_sharding.spec[0]))),
    )
    layer_fn, layer_args = _block_program(cfg, mesh, batch, seq, dtype)
    return Program(
        fn=fn,
        args=(state, tokens, tokens, tokens),
        tokens=batch * seq,
        param_bytes_per_device=param_bytes,
        layer_fn=layer_fn,
        layer_args=layer_args,
        num_layers=cfg.num_layers,
        description="forward, residual stream pooled on device (masked sums [L, B, D]), no LM head",
    )


def _generate_program(*args) -> Program:
    raise NotImplementedError(
        "task 'generate' needs the KV-cached prefill/decode of the generation issue "
        "(branch `steer`), which has not landed on main yet"
    )


def _train_program(*args) -> Program:
    raise NotImplementedError(
        "task 'train' needs LoRA training (the fine-tuning issue), which does not exist yet"
    )


TASKS: dict[str, Callable[..., Program]] = {
    "extract": extract_program,
    "generate": _generate_program,
    "train": _train_program,
}


@dataclasses.dataclass
class Plan:
    """Compiler figures for one (model, mesh, task, batch, seq), per device unless named."""

    model: str
    mesh: dict[str, int]
    task: str
    batch: int
    seq: int
    dtype: str
    description: str
    devices: int
    tokens_per_call: int
    params_hand: int  # resident parameter bytes per device, from the partition rules
    inputs_hand: int  # non-parameter input bytes per device
    arguments: int  # compiler: the parameters the program reads + inputs
    outputs: int
    temporaries: int
    aliased: int
    flops_per_device: float  # one call, scan body counted L times
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(self.terms().values())

    @property
    def flops_per_token(self) -> float:
        return self.flops_per_device * self.devices / self.tokens_per_call

    def terms(self) -> dict[str, int]:
        return {
            "params": self.params_hand,
            "inputs": self.inputs_hand,
            "outputs": self.outputs - self.aliased,
            "temporaries": self.temporaries,
        }

    def fits(self, acc: Accelerator) -> bool:
        return self.total_bytes <= acc.hbm_bytes

    def tokens_per_second(self, acc: Accelerator, mfu: float) -> float:
        """Whole-mesh tokens/s at `mfu`, or at the HBM bound if slower (every parameter
        byte read once per call)."""
        compute_s = self.flops_per_device / (mfu * acc.bf16_flops)
        memory_s = self.params_hand / acc.hbm_bandwidth
        return self.tokens_per_call / max(compute_s, memory_s)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def make_plan(
    cfg: ModelConfig,
    mesh: Mesh,
    task: str = "extract",
    batch: int = 8,
    seq: int = 2048,
    dtype: str = "bfloat16",
    model_name: str = "",
) -> Plan:
    """Compile `task`'s program for `cfg` on `mesh` (abstract arrays only) and read the
    compiler's per-device memory and FLOPs."""
    import time

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    dt = resolve_dtype(dtype)
    program = TASKS[task](cfg, mesh, batch, seq, dt)
    start = time.perf_counter()
    compiled = program.fn.lower(*program.args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    layer_flops = _flops(program.layer_fn.lower(*program.layer_args).compile())
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
        params_hand=program.param_bytes_per_device,
        inputs_hand=bytes_per_device(program.args[1:]),
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        flops_per_device=_flops(compiled) + (program.num_layers - 1) * layer_flops,
        compile_seconds=seconds,
    )


def format_plan(plan: Plan, accelerators: list[Accelerator], mfu: float) -> str:
    """The human-readable report: memory per device, FLOPs, fit and tokens/s per chip type."""
    gb = 1e9
    lines = [
        f"{plan.model} | task {plan.task}: {plan.description}",
        f"mesh {plan.mesh} ({plan.devices} devices), batch {plan.batch} x seq {plan.seq}, "
        f"{plan.dtype}; compiled in {plan.compile_seconds:.1f} s",
        "per-device memory (compiler):",
    ]
    for name, value in plan.terms().items():
        lines.append(f"  {name:<12} {value / gb:9.3f} GB")
    lines.append(f"  {'total':<12} {plan.total_bytes / gb:9.3f} GB")
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
    d.update(total_bytes=plan.total_bytes, flops_per_token=plan.flops_per_token, mfu=mfu)
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
