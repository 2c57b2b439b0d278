"""`emgeo plan --model Qwen2.5-7B --mesh data=4,fsdp=8 --task extract|generate|train|sweep
--batch 8 --seq 2048 [--new_tokens 256] [--lora_rank 32 --lora_targets all]
[--judge_model same|NAME --judge_seq 512 --judge_batch B]`.

Compiles the task's program on abstract arrays over a mesh of that size and prints per-device
memory, FLOPs per token and tokens/s per accelerator (see `emgeo_jax.plan`). On CPU it re-runs
itself in a subprocess whose CPU simulates the mesh's devices (`JAX_NUM_CPU_DEVICES`,
`--xla_force_host_platform_device_count`); on TPU/GPU it compiles for the devices present.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

from absl import flags

from emgeo_jax.plan import CHILD, simulated_env

FLAGS = flags.FLAGS
# Required flags are checked in main(), not by absl validators: validators are global and would
# fire for every other subcommand parsed in the same process (tests run several in-process).
flags.DEFINE_string("model", None, "known name, config.json, HF folder or checkpoint (required)")
flags.DEFINE_string(
    "mesh",
    "fsdp=8",
    "mesh axis sizes, e.g. data=4,fsdp=8,tensor=2 (auto: the accelerators present)",
)
flags.DEFINE_enum(
    "task", "extract", ["extract", "generate", "train", "sweep"], "program to compile"
)
flags.DEFINE_integer("batch", 8, "global batch size B")
flags.DEFINE_integer("seq", 2048, "sequence length T")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "parameter/activation dtype")
flags.DEFINE_list("accelerator", None, "accelerators to report (default: all known)")
flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for tokens/s")
flags.DEFINE_bool("json", False, "print the plan as JSON")
flags.DEFINE_integer("new_tokens", 256, "generate: tokens generated per prompt")
flags.DEFINE_integer("lora_rank", 32, "train: LoRA rank (adapters on every layer)")
flags.DEFINE_list("lora_targets", ["all"], "train: LoRA targets (q,k,v,o,gate,up,down or all)")
flags.DEFINE_string(
    "judge_model",
    None,
    "sweep: the local judge ('same' = the model judges itself, or a known name, config.json "
    "or folder); default: a remote judge, nothing to compile",
)
flags.DEFINE_integer("judge_seq", 512, "sweep: tokens of judge prompt + answer")
flags.DEFINE_integer("judge_batch", None, "sweep: rows per judge scoring call (default --batch)")


def main(argv: list[str]) -> None:
    if not FLAGS.model:
        raise SystemExit("emgeo plan: --model is required (a known name, config.json or folder)")
    import jax

    from emgeo_jax.parallel import check_param_split, make_mesh, parse_mesh_spec
    from emgeo_jax.plan import (
        ACCELERATORS,
        TaskOptions,
        format_plan,
        make_plan,
        plan_json,
        resolve_model,
    )

    if len(argv) > 1:
        raise SystemExit(f"emgeo plan takes no positional arguments (got {argv[1:]})")
    shape = parse_mesh_spec(FLAGS.mesh)
    if shape == "auto":  # the devices present, all on fsdp (on CPU there is nothing to plan for)
        if jax.default_backend() == "cpu":
            raise SystemExit(
                "emgeo plan: --mesh auto plans for the accelerators present; on CPU give "
                "sizes, e.g. --mesh fsdp=8"
            )
        shape = {"fsdp": jax.device_count()}
    size = math.prod(shape.values())
    names = FLAGS.accelerator or list(ACCELERATORS)
    unknown = [n for n in names if n not in ACCELERATORS]
    if unknown:
        raise SystemExit(f"--accelerator {unknown}: unknown; known: {sorted(ACCELERATORS)}")
    cfg = resolve_model(FLAGS.model)  # bad --model fails here, before any re-exec
    from flax import nnx

    from emgeo_jax.models.lm import abstract_model

    full = {a: shape.get(a, 1) for a in ("data", "fsdp", "tensor")}
    check_param_split(full, nnx.to_pure_dict(abstract_model(cfg)[1]))  # e.g. tensor=3, 2 KV heads
    judge = FLAGS.judge_model
    judge_cfg = cfg if judge == "same" else resolve_model(judge) if judge else None
    if not os.environ.get(CHILD) and (jax.default_backend() == "cpu" or jax.device_count() < size):
        cmd = [sys.executable, "-m", "emgeo_jax.cli", "plan", *sys.argv[2:]]
        sys.exit(subprocess.run(cmd, env=simulated_env(size)).returncode)
    if jax.device_count() < size:
        raise SystemExit(f"could not simulate {size} devices (have {jax.device_count()})")
    shape.setdefault("data", 1)
    mesh = make_mesh(shape, jax.devices()[:size])
    from emgeo_jax.train.lora import parse_targets

    options = TaskOptions(
        new_tokens=FLAGS.new_tokens,
        lora_rank=FLAGS.lora_rank,
        lora_targets=parse_targets(FLAGS.lora_targets),
        judge=judge_cfg,
        judge_is_model=judge == "same",
        judge_seq=FLAGS.judge_seq,
        judge_batch=FLAGS.judge_batch,
    )
    plan = make_plan(
        cfg, mesh, FLAGS.task, FLAGS.batch, FLAGS.seq, FLAGS.dtype, FLAGS.model, options
    )
    accs = [ACCELERATORS[n] for n in names]
    print(plan_json(plan, accs, FLAGS.mfu) if FLAGS.json else format_plan(plan, accs, FLAGS.mfu))
