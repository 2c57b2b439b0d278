"""One benchmark for whatever device JAX finds (CPU here; TPU/GPU for users): extraction,
prefill, decode and a LoRA training step, with tokens/s, MFU, the decode step's fraction of
the HBM-bandwidth roofline and the `emgeo plan` prediction beside each figure.

    python benchmarks/device.py [--models SmolLM2-135M,Qwen2.5-7B] [--batches 8,64,256]
                                [--seq 256] [--new 32] [--dtype bfloat16]
                                [--layers N | --memory_gb G] [--json OUT.json] [--no_plan]
    python benchmarks/device.py --tiny      # tiny shapes, seconds on a CPU (the test suite)

A batch the mesh does not divide runs as the commands run it: padded with copies of a row
to a multiple of `data x fsdp` (`emgeo_jax.plan.padded_rows`); tokens/s, MFU and the
roofline count the real rows, so the padding shows as lost throughput.

Models have random weights (throughput does not depend on them): SmolLM2-135M as it is, and
a Qwen2.5-7B-shaped model with as many layers as fit (`fit_layers`): its weights plus the
KV cache of the largest batch may take `MEMORY_FRACTION` of the devices' memory, read from
`jax.devices()[0].memory_stats()["bytes_limit"]` where the backend reports it (TPU, GPU),
else from `--memory_gb`, else (CPU) the host's physical memory; `--layers` overrides.
Parameters are sharded over all devices (`fsdp`), as `benchmarks/mfu.py` does.

Per model:
  extract   `emgeo_jax.extract`'s jitted pooled step (the function `emgeo plan --task extract`
            compiles), batch `--batches[0]` x `--seq`, every layer, no LM head.
  prefill   the prefill alone (`emgeo_jax.generate.prefill_prompts`: the program a
            `generate_ids` call runs first, into its cache of `--seq + --new + 1` slots): `B`
            prompts of `--seq` tokens, per batch size; the LM head runs on each row's last token.
  decode    (a whole `generate_ids` call of `--new` tokens - its prefill) / (`--new` - 1): the
            steady-state step (the loop runs `--new` - 1 steps after the prefill's token), per
            batch size; tokens/s = B / step time. The call's host work (padding, reading the
            tokens back) is in this figure too, spread over the steps.
  train     one LoRA step (`emgeo_jax.train.sft.make_train_step`, rank 32 on all seven
            modules of every layer, AdamW, remat), batch `--batches[0]` x `--seq`.

MFU = model FLOPs / seconds / peak. Model FLOPs come from the config
(`benchmarks.mfu.model_flops`: 2 x tokens x matmul weights + QK^T and PV over the keys each
token attends to; prefill and decode attend over the whole preallocated cache). A LoRA step
counts 2 forwards (forward + activation gradients; frozen weights need no weight gradient;
the remat recompute and the rank-32 factors are not counted). Peak: the published dense bf16
peak of the chip (`emgeo_jax.plan.ACCELERATORS`, with its source: TPU v4, v5e, v5p, v6e,
A100-SXM4-80GB, H100 SXM; recognised by their exact `device_kind`, `plan.accelerator_of`)
times the devices, else (CPU, or a chip the table does not hold) the measured matmul peak
(`benchmarks.common`) and memory bandwidth.

Decode roofline: a step must read every weight (except an untied embedding table, of which
it reads B rows) and the whole KV cache `[L, B, K, S, Dh]` once; at the chip's HBM bandwidth
(table) or the measured one (CPU, `benchmarks.generate.memory_bandwidth`) that takes
`bytes / bandwidth`; the fraction printed is that floor over the measured step time.

Plan: `emgeo_jax.plan.make_plan` for the same task, batch and length, from the executables
the benchmark ran (`plan.compile_program`: extract and train run them; generate's call places
its arguments as the plan does, so its prefill and decode are the plan's), each compiled
once; its tokens/s at `--plan_mfu` (as `emgeo plan --mfu`) or at its HBM bound if slower,
on this chip's table entry (on CPU: an entry made of the measured peak and bandwidth). For
decode the plan gives the whole generate call (prefill + `--new` steps), compared with the
measured whole call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import matmul_peak_flops, time_call, time_interleaved
from benchmarks.generate import memory_bandwidth
from benchmarks.mfu import model_flops
from emgeo_jax.generate import generate_ids, prefill_prompts
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import (
    LM,
    abstract_model,
    batch_multiple,
    init_params,
    pad_rows,
    resolve_dtype,
)
from emgeo_jax.models.steering import Steering
from emgeo_jax.parallel import make_mesh, param_shardings
from emgeo_jax.plan import (
    Accelerator,
    CompiledProgram,
    TaskOptions,
    accelerator_of,
    compile_program,
    make_plan,
    padded_rows,
)
from emgeo_jax.plan import resolve_model as plan_model

MEMORY_FRACTION = 0.5  # of device memory for weights + the largest batch's KV cache

TINY_MODELS = {
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        vocab_size=256,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}
FIT_MODELS = {"Qwen2.5-7B", "tiny-qwen2"}  # layers cut to what fits


def resolve_model(name: str) -> ModelConfig:
    if name in TINY_MODELS:
        spec = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, **TINY_MODELS[name]}
        return ModelConfig.from_hf({**spec, "max_position_embeddings": 4096}, source=name)
    return plan_model(name)


def chip() -> tuple[Accelerator | None, str]:
    """The accelerator table entry for `jax.devices()[0]` (None on CPU or unknown kinds)."""
    kind = jax.devices()[0].device_kind
    return accelerator_of(kind), kind


def device_memory_bytes() -> int | None:
    """`bytes_limit` of the first device's `memory_stats()`, or None (CPU reports none)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def param_bytes(cfg: ModelConfig, dtype) -> int:
    """Bytes of all parameters of `cfg` in `dtype` (from the abstract model, nothing allocated)."""
    _, state = abstract_model(cfg, dtype)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def kv_bytes(cfg: ModelConfig, batch: int, slots: int, dtype) -> int:
    """Bytes of the KV cache `k, v [L, B, K, S, Dh]`."""
    item = jnp.dtype(resolve_dtype(dtype)).itemsize
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * item


def fit_layers(cfg: ModelConfig, dtype, budget: float, batch: int, slots: int) -> int:
    """The most layers (at most `cfg.num_layers`) whose weights plus the KV cache of `batch`
    rows x `slots` fit in `budget` bytes; the embedding, LM head and final norm always stay.
    Raises if not even one layer fits."""
    one = dataclasses.replace(cfg, num_layers=1)
    two = dataclasses.replace(cfg, num_layers=2)
    per_layer = param_bytes(two, dtype) - param_bytes(one, dtype)
    per_layer += kv_bytes(one, batch, slots, dtype)
    fixed = param_bytes(one, dtype) + kv_bytes(one, batch, slots, dtype) - per_layer
    n = int((budget - fixed) // per_layer)
    if n < 1:
        raise ValueError(
            f"not one layer fits in {budget / 1e9:.2f} GB (embedding and head "
            f"{fixed / 1e9:.2f} GB, {per_layer / 1e9:.3f} GB per layer with the KV cache of "
            f"batch {batch}); give --layers or --memory_gb"
        )
    return min(n, cfg.num_layers)


def decode_bytes(cfg: ModelConfig, batch: int, slots: int, dtype) -> int:
    """HBM bytes one decode step reads at least: every weight but an untied embedding table
    (B rows of it), and the whole KV cache."""
    unread = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    unread *= jnp.dtype(resolve_dtype(dtype)).itemsize
    return param_bytes(cfg, dtype) - unread + kv_bytes(cfg, batch, slots, dtype)


def _place(program_args, values):
    """Concrete `values` put where the plan's abstract arguments say (same tree)."""
    return jax.tree.map(lambda a, v: jax.device_put(v, a.sharding), program_args, values)


class Bench:
    """One model on the mesh: random params placed by the partition rules."""

    def __init__(self, name: str, cfg: ModelConfig, dtype: str, mesh, args):
        self.name, self.cfg, self.dtype, self.mesh, self.a = name, cfg, dtype, mesh, args
        graphdef, params = init_params(cfg, seed=0, dtype=dtype)
        pure = nnx.to_pure_dict(params)
        nnx.replace_by_pure_dict(params, jax.device_put(pure, param_shardings(mesh, pure)))
        self.graphdef, self.params = graphdef, params
        self.lm = LM(cfg, graphdef, params, mesh=mesh, source=name)
        rng = np.random.default_rng(0)
        self.ids = rng.integers(1, cfg.vocab_size, (max(args.batches), args.seq)).astype(np.int32)
        self._compiled: dict[tuple[str, int], CompiledProgram] = {}

    def compiled(self, task: str, batch: int) -> CompiledProgram:
        """`task`'s program at `batch` x `--seq`, compiled once: the benchmark runs these
        executables and the plan reads them (a 7B shape compiles once, not twice)."""
        key = (task, batch)
        if key not in self._compiled:
            self._compiled[key] = compile_program(
                self.cfg, self.mesh, task, batch, self.a.seq, self.dtype,
                TaskOptions(new_tokens=self.a.new),
            )  # fmt: skip
        return self._compiled[key]

    def extract(self, batch: int) -> float:
        compiled = self.compiled("extract", batch)
        part, run = compiled.program.parts[0], compiled.parts[0]
        ids = self.ids[:batch]
        inputs = {
            "input_ids": ids,
            "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape),
            "attention_mask": np.ones_like(ids),
            "pool_mask": np.ones(ids.shape, bool),
            "label": np.arange(batch, dtype=np.int32) % 2,
            "example_index": np.arange(batch, dtype=np.int32),
        }
        inputs = _place(part.args[1], pad_rows(inputs, batch_multiple(self.mesh)))
        return time_call(lambda: jax.block_until_ready(run(self.params, inputs)), self.a.repeats)

    def generate(self, batch: int, new: int) -> tuple[float, float]:
        """Seconds of the prefill alone (`prefill_prompts`: the program `generate_ids` runs
        first, same cache) and of the whole `generate_ids` call of `new` tokens, timed in
        turn (their difference is the decode)."""
        prompts = [list(r) for r in self.ids[:batch]]
        steering = Steering.none(self.cfg)

        def whole():
            return generate_ids(
                self.lm, prompts, max_new_tokens=new, eos_ids=[], pad_multiple=self.a.seq
            )

        def prefill_alone():
            pre = prefill_prompts(
                self.lm, prompts, steering, max_new_tokens=new, pad_multiple=self.a.seq
            )
            return jax.block_until_ready((pre.cache, pre.logits, pre.position))

        return tuple(time_interleaved([prefill_alone, whole], self.a.repeats))

    def train(self, batch: int) -> float:
        from emgeo_jax.train.lora import LoraSpec, init_lora
        from emgeo_jax.train.sft import TrainConfig, make_train_step

        options = TaskOptions()
        compiled = self.compiled("train", batch)
        part, step = compiled.program.parts[0], compiled.parts[0]
        lora_abs, opt_abs, _, batch_abs, _, key_abs = part.args
        spec = LoraSpec(
            rank=options.lora_rank,
            alpha=2.0 * options.lora_rank,
            targets=options.lora_targets,
            layers=tuple(range(self.cfg.num_layers)),
        )
        _, optimizer = make_train_step(self.graphdef, spec, TrainConfig(), self.mesh)
        lora = _place(lora_abs, init_lora(self.cfg, spec, jax.random.key(0)))
        opt_state = _place(opt_abs, optimizer.init(lora))
        ids = self.ids[:batch]
        answer = np.zeros(ids.shape, bool)
        answer[:, ids.shape[1] // 2 :] = True
        data = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape),
            "answer_mask": answer,
        }
        data = _place(batch_abs, pad_rows(data, batch_multiple(self.mesh), blank=("answer_mask",)))
        key = jax.device_put(jax.random.key(1), key_abs.sharding)
        state = {"lora": lora, "opt": opt_state}

        def one():  # the LoRA and optimizer state are donated: carry them forward
            state["lora"], state["opt"], metrics = step(
                state["lora"], state["opt"], self.params, data, None, key
            )
            return jax.block_until_ready(metrics)

        return time_call(one, self.a.repeats)

    def plan_tokens_per_s(self, task: str, batch: int, acc: Accelerator) -> float | None:
        if self.a.no_plan:
            return None
        compiled = self._compiled.get((task, batch))  # the benchmark's executables, if any
        plan = make_plan(
            self.cfg, self.mesh, task, batch, self.a.seq, self.dtype, model_name=self.name,
            options=TaskOptions(new_tokens=self.a.new), compiled=compiled,
        )  # fmt: skip
        return plan.tokens_per_second(acc, self.a.plan_mfu)


def run_model(bench: Bench, acc: Accelerator, peak: float, bandwidth: float) -> list[dict]:
    """Every task on one model; rows of figures (also printed)."""
    cfg, a, rows = bench.cfg, bench.a, []
    t, n = a.seq, a.new
    slots = t + n + 1  # as generate_ids allocates the cache

    def row(task, batch, seconds, tokens, flops, plan=None, **extra):
        r = dict(model=bench.name, layers=cfg.num_layers, task=task, batch=batch, seq=t,
                 seconds=seconds, tokens_per_s=tokens / seconds, mfu=flops / seconds / peak,
                 plan_tokens_per_s=plan, **extra)  # fmt: skip
        rows.append(r)
        extra_s = "".join(f", {k} {v:.1%}" for k, v in extra.items() if k.endswith("fraction"))
        plan_s = "" if plan is None else f", plan {plan:,.0f} tok/s"
        print(f"  {task:8} B={batch:<4} {r['tokens_per_s']:12,.1f} tok/s  "
              f"{seconds * 1e3:9.1f} ms  MFU {r['mfu']:6.2%}{extra_s}{plan_s}",
              flush=True)  # fmt: skip

    b0 = a.batches[0]
    seconds = bench.extract(b0)
    row("extract", b0, seconds, b0 * t, model_flops(cfg, b0 * t, t, lm_head=False),
        bench.plan_tokens_per_s("extract", b0, acc))  # fmt: skip
    for b in a.batches:
        t_prefill, t_full = bench.generate(b, n)
        head = 2.0 * b * cfg.hidden_size * cfg.vocab_size  # the LM head on each row's last token
        row("prefill", b, t_prefill, b * t, model_flops(cfg, b * t, slots, lm_head=False) + head)
        step = (t_full - t_prefill) / (n - 1)
        if step <= 0:  # timing noise larger than the decode steps: say so, print no figure
            print(f"  decode   B={b:<4} not measurable: {n} new tokens took no longer than the "
                  "prefill; raise --new or --repeats", flush=True)  # fmt: skip
            continue
        floor = decode_bytes(cfg, b, slots, bench.dtype) / bandwidth
        row("decode", b, step, b, model_flops(cfg, b, slots), roofline_fraction=floor / step)
        plan = bench.plan_tokens_per_s("generate", b, acc)
        if plan is not None:  # the whole generate call: measured vs plan
            rows[-1].update(generate_call_tokens_per_s=b * n / t_full, plan_tokens_per_s=plan)
            print(f"  {'generate':8} B={b:<4} {b * n / t_full:12,.1f} tok/s whole call "
                  f"({t_full:.2f} s), plan {plan:,.0f} tok/s", flush=True)  # fmt: skip
    seconds = bench.train(b0)
    row("train", b0, seconds, b0 * t, 2 * model_flops(cfg, b0 * t, t),
        bench.plan_tokens_per_s("train", b0, acc))  # fmt: skip
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run in seconds")
    p.add_argument(
        "--models", default=None, help="comma-separated (default SmolLM2-135M,Qwen2.5-7B)"
    )
    p.add_argument("--batches", default=None, help="comma-separated (default 8,64,256)")
    p.add_argument("--seq", type=int, default=None, help="prompt / row length (default 256)")
    p.add_argument("--new", type=int, default=None, help="decoded tokens (default 32)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, else float32")
    p.add_argument("--layers", type=int, default=None, help="layers of the 7B-shaped model")
    p.add_argument("--memory_gb", type=float, default=None,
                   help="memory per device (default: memory_stats, else host memory)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median) after a warm-up")
    p.add_argument("--plan_mfu", type=float, default=0.4, help="MFU the plan assumes")
    p.add_argument("--no_plan", action="store_true", help="skip the emgeo plan predictions")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    tiny = dict(models="tiny-llama,tiny-qwen2", batches="2", seq=16, new=128)
    full = dict(models="SmolLM2-135M,Qwen2.5-7B", batches="8,64,256", seq=256, new=32)
    for k, v in (tiny if a.tiny else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.models = [m for m in a.models.split(",") if m]
    try:
        a.batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches {a.batches!r}: expected comma-separated integers")
    if not a.batches or min(a.batches) < 1 or a.seq < 1 or a.new < 2:
        p.error("--batches must be positive, --seq >= 1 and --new >= 2 (decode = new - 1 steps)")
    if a.dtype is None:
        a.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    resolve_dtype(a.dtype)
    return a


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    mesh = make_mesh({"fsdp": jax.device_count()})
    devices = mesh.size
    acc, kind = chip()
    if acc is None:  # CPU or an unknown chip: measure
        peak1 = matmul_peak_flops(n=512 if a.tiny else 2048, dtype=a.dtype)
        bandwidth1 = memory_bandwidth(64 * 2**20 if a.tiny else 512 * 2**20)
        source = f"measured on {kind} ({a.dtype} matmul peak, float32 sum bandwidth)"
        acc = Accelerator(kind, peak1, float("inf"), bandwidth1, source)
    else:
        source = acc.source
    peak, bandwidth = acc.bf16_flops * devices, acc.hbm_bandwidth * devices
    limit = device_memory_bytes()
    memory = (limit * devices, "memory_stats bytes_limit") if limit else None
    if a.memory_gb is not None:
        memory = (a.memory_gb * 1e9 * devices, f"--memory_gb {a.memory_gb:g}")
    elif memory is None:  # a CPU: its devices share the host's memory
        memory = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory")
    print(f"backend {jax.default_backend()}, {devices} x {kind}, {a.dtype}; peak "
          f"{acc.bf16_flops / 1e12:.3f} TFLOP/s and {acc.hbm_bandwidth / 1e9:.0f} GB/s per "
          f"device [{source}]; memory {memory[0] / 1e9:.1f} GB ({memory[1]})",
          flush=True)  # fmt: skip
    rows = []
    for name in a.models:
        cfg = resolve_model(name)
        padded_batches = [padded_rows(b, mesh) for b in a.batches]
        if name in FIT_MODELS:
            slots = a.seq + a.new + 1
            n = a.layers or fit_layers(
                cfg, a.dtype, MEMORY_FRACTION * memory[0], max(padded_batches), slots
            )
            cfg = dataclasses.replace(cfg, num_layers=min(n, cfg.num_layers))
        padded = "" if padded_batches == a.batches else (
            f" (run as {padded_batches} rows: the mesh splits rows {batch_multiple(mesh)} "
            "ways, as the commands pad; tokens/s and MFU count the real rows)"
        )  # fmt: skip
        print(f"{name}: {cfg.num_layers} layers, {param_bytes(cfg, a.dtype) / 1e9:.2f} GB of "
              f"weights, batch x seq {a.batches} x {a.seq}{padded}, {a.new} new",
              flush=True)  # fmt: skip
        start = time.perf_counter()
        rows += run_model(Bench(name, cfg, a.dtype, mesh, a), acc, peak, bandwidth)
        print(
            f"  ({time.perf_counter() - start:.0f} s including compilation; load average "
            + " / ".join(f"{x:.1f}" for x in os.getloadavg())
            + ")",
            flush=True,
        )
    if a.json:
        meta = dict(backend=jax.default_backend(), device_kind=kind, devices=devices,
                    dtype=a.dtype, peak_flops=peak, bandwidth=bandwidth, source=source,
                    memory_bytes=memory[0], memory_source=memory[1])  # fmt: skip
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
