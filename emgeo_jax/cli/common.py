"""The flags `emgeo` commands share, each defined once, and the one way a command loads its
model: `load_model_from_flags()`.

Defined on import (every model-loading command imports this module):

    --model SOURCE     default (the embedded SmolLM2-135M-Instruct), an HF folder, a .gguf
                       file or an `emgeo convert` checkpoint (checkpoints/NAME)
    --dtype            float32 | bfloat16; default per platform: float32 on CPU, bfloat16 on
                       TPU/GPU (resolved when the command runs, not at import)
    --mesh SPEC        the devices the parameters are split over, spelled as `emgeo plan`
                       spells it: `fsdp=8`, `data=2,fsdp=4,tensor=2`, or `auto` (every device
                       on fsdp). Default: `auto` on TPU/GPU, one device on CPU
    --attention        auto | xla | splash | cudnn: the attention implementation (auto: the
                       Pallas splash kernel on TPU, cuDNN on GPU in bfloat16, XLA elsewhere)
    --noscan_layers    unstack the blocks once loaded (`LM.unstacked`: decode reads every
                       weight in place instead of slicing it out of the stack); inference only
    --distributed      start `jax.distributed` first (one process per host); the launch/
                       scripts set `EMGEO_DISTRIBUTED=1`, which means the same.
                       `--coordinator_address/--num_processes/--process_id` (or the
                       `EMGEO_COORDINATOR/EMGEO_NUM_PROCESSES/EMGEO_PROCESS_ID` variables)
                       name the peers where JAX cannot discover them (CPU, plain clusters)

Flag groups a few commands share, defined by the commands that take them (once per process):
`define_sampling_flags` (`--samples --max_new_tokens --temperature --top_p --seed
--batch_size`: generate and the experiment commands), `define_steering_flags` (`--steer
--layer --scale --positions --ablate --ablate_layers --key`: generate and serve).

Everything the flags can get wrong without a model is checked before the model loads: the
mesh against the devices present and against the model's config under the partition rules of
`emgeo_jax.parallel` (read from the config file alone), layers against the config's layer
count, vector widths against its hidden size (`check_layers`, `check_vectors`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from absl import flags

from emgeo_jax.cli.parsing import number_list

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "model",
    "default",
    "model source: default (embedded SmolLM2-135M-Instruct), HF folder, .gguf or checkpoints/NAME",
)
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "parameter dtype (default: float32 on CPU, bfloat16 on TPU/GPU)",
)
flags.DEFINE_string(
    "mesh",
    None,
    "devices the model is split over: auto (every device on fsdp) or AXIS=SIZE,... over "
    "data, fsdp, tensor, e.g. fsdp=8 or data=2,fsdp=4 (default: auto on TPU/GPU and on "
    "several processes, one device on a single CPU process)",
)
flags.DEFINE_enum(
    "attention",
    "auto",
    ["auto", "xla", "splash", "cudnn"],
    "attention implementation: auto (splash on TPU, cuDNN on GPU in bfloat16, XLA elsewhere), "
    "xla, splash (Pallas TPU kernel) or cudnn (GPU)",
)
flags.DEFINE_bool(
    "scan_layers",
    True,
    "run the blocks as one scan over stacked weights (default); --noscan_layers unstacks them "
    "once loaded (one buffer per block, no second copy kept), so each decode step reads the "
    "weights in place: faster generation, longer compiles; inference commands only",
)
flags.DEFINE_bool(
    "distributed",
    False,
    "start jax.distributed before anything else, one process per host (EMGEO_DISTRIBUTED=1, "
    "set by launch/, means the same)",
)
flags.DEFINE_string(
    "coordinator_address", None, "with --distributed: HOST:PORT of process 0 (else discovered)"
)
flags.DEFINE_integer("num_processes", None, "with --coordinator_address: number of processes")
flags.DEFINE_integer("process_id", None, "with --coordinator_address: this process's index")

DISTRIBUTED_ENV = "EMGEO_DISTRIBUTED"

# Old spellings kept working with a warning: flag -> how to say it now (see `deprecated_mesh`).
OLD_MESH_FLAGS = ("fsdp", "tensor")


# --- flag groups --------------------------------------------------------------------------


def _defined(name: str) -> bool:
    return name in FLAGS


def define_positions_flag() -> None:
    """`--positions all|prompt|generated`: the tokens a steering edit touches."""
    from emgeo_jax.models.steering import POSITION_MODES

    if not _defined("positions"):
        flags.DEFINE_enum("positions", "all", sorted(POSITION_MODES), "tokens steering touches")


def define_sampling_flags(batch_size: int, samples_help: str) -> None:
    """The sampling flags, with the calling command's `--batch_size` default and `--samples`
    help (the default of `--samples` is None: the prompt file decides)."""
    if _defined("max_new_tokens"):
        return
    flags.DEFINE_integer("samples", None, samples_help)
    flags.DEFINE_integer("max_new_tokens", 600, "new tokens per response")
    flags.DEFINE_float("temperature", 1.0, "sampling temperature (0 = greedy)")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
    flags.DEFINE_integer("seed", 0, "sampling seed (batch k uses seed + k)")
    flags.DEFINE_integer(
        "batch_size", batch_size, "rows per generation batch (experiments pack all cells into them)"
    )


def define_steering_flags() -> None:
    """`--steer FILE --layer L[,L...] --scale S [--positions ...] [--ablate FILE
    [--ablate_layers L,...]] [--key NAME]` (see `build_steering`)."""
    if _defined("steer"):
        return
    flags.DEFINE_string("steer", None, "steering vector file ([D] or [L, D])")
    flags.DEFINE_list("layer", None, "layer(s) to steer at (output of block l)")
    flags.DEFINE_float("scale", 1.0, "steering scale")
    define_positions_flag()
    flags.DEFINE_string("ablate", None, "direction file to project out ([D] or [L, D])")
    flags.DEFINE_list("ablate_layers", None, "layers to ablate at (default all / the stack's)")
    flags.DEFINE_string("key", None, "tensor name inside a vector file holding several")


# --- numbers, layers, vectors ---------------------------------------------------------------


def check_layers(cfg: Any, layers: Iterable[int] | None, flag: str) -> None:
    """Every layer in `layers` is a block of the model (0..L-1, layer l = output of block l);
    a ValueError naming `--flag` and the model's layer count otherwise."""
    n = cfg.num_layers
    bad = [layer for layer in layers or () if not 0 <= layer < n]
    if bad:
        raise ValueError(
            f"--{flag}: layer {bad[0]} out of range; the model has {n} layers (0..{n - 1})"
        )


def check_vectors(cfg: Any, vectors: dict[str, Any], layers: Iterable[int] | None = None) -> None:
    """Every vector (`LayerVectors`, or a `[D]` / `[L, D]` array) has the model's hidden size,
    and a stack holds a row for each of `layers` (None: nothing to check); errors name the
    file."""
    from emgeo_jax.vectors.io import LayerVectors, row_of

    for name, v in vectors.items():
        lv = LayerVectors.of(v, source=name)
        if lv.width != cfg.hidden_size:
            raise ValueError(
                f"{lv.source}: vectors of width {lv.width}; the model's hidden size is "
                f"{cfg.hidden_size}"
            )
        if lv.is_stack:
            for layer in layers or ():
                row_of(lv.layers, layer, lv.source)


# --- steering -----------------------------------------------------------------------------


def check_vector_files(args: Any, cfg: Any = None) -> None:
    """Read the `--steer` / `--ablate` files once so a bad one fails before the model loads;
    with the model's config, check their widths and the layers asked for too."""
    from emgeo_jax.vectors.io import load_layer_vectors

    for path, layer_flag in ((args.steer, "layer"), (args.ablate, "ablate_layers")):
        if not path:
            continue
        vec = load_layer_vectors(path, key=args.key)
        given = getattr(args, layer_flag)
        layers = number_list(given, layer_flag) if given else None
        if cfg is not None:
            check_layers(cfg, layers, layer_flag)
            check_vectors(cfg, {path: vec}, layers)


def build_steering(cfg: Any, args: Any) -> tuple[Any, dict[str, Any]]:
    """The `Steering` the steering flags describe and a JSON summary of it (None: no
    intervention). `args` carries steer, layer, scale, positions, ablate, ablate_layers, key
    (e.g. FLAGS). A `[D]` vector is added at each `--layer`; a stack adds its vector for
    layer l at each layer l in `--layer` (default: every layer it holds). `--ablate` projects
    a `[D]` direction out at each of `--ablate_layers` (default all layers), or a stack's
    vector for layer l at each layer l in `--ablate_layers` (default: every layer it holds)."""
    from emgeo_jax.models.steering import Steering
    from emgeo_jax.vectors.io import load_layer_vectors

    parts, summary = [], {}
    if args.steer:
        vec = load_layer_vectors(args.steer, key=args.key)
        layers = number_list(args.layer, "layer") if args.layer else None
        parts.append(Steering.addition(cfg, vec, layers=layers, scale=args.scale))
        summary.update(steer=args.steer, layer=layers or list(vec.layers or []), scale=args.scale)
    if args.ablate:
        vec = load_layer_vectors(args.ablate, key=args.key)
        layers = number_list(args.ablate_layers, "ablate_layers") if args.ablate_layers else None
        parts.append(Steering.layer_ablation(cfg, vec, layers=layers))
        summary.update(ablate=args.ablate, ablate_layers=layers or list(vec.layers or []) or None)
    if not parts:
        return None, {}
    summary["positions"] = args.positions
    return Steering.combine(*parts).at_positions(args.positions), summary


# --- platform defaults, the distributed start, the mesh -------------------------------------


def on_accelerator() -> bool:
    """True when JAX's default backend is a TPU or GPU."""
    import jax

    return jax.default_backend() != "cpu"


def resolve_dtype(value: str | None = None) -> str:
    """`--dtype`, or the platform's default: float32 on CPU, bfloat16 on TPU/GPU."""
    value = FLAGS.dtype if value is None else value
    if value:
        return value
    return "bfloat16" if on_accelerator() else "float32"


def deprecated_mesh() -> str | None:
    """The `--mesh` spelling of the old `--fsdp N` / `--tensor N` flags of `emgeo extract`
    when given (a one-line warning on stderr says so), else None."""
    import sys

    given = {n: FLAGS[n].value for n in OLD_MESH_FLAGS if n in FLAGS and FLAGS[n].present}
    if not given:
        return None
    spec = ",".join(f"{k}={v}" for k, v in given.items() if v != 1) or "data=1"
    old = " ".join(f"--{k} {v}" for k, v in given.items())
    if FLAGS.mesh:
        raise ValueError(f"give --mesh or the deprecated {old}, not both")
    print(f"warning: {old} is deprecated; use --mesh {spec}", file=sys.stderr)
    return spec


def distributed_wanted() -> bool:
    """True when `--distributed`, `--coordinator_address` or `EMGEO_DISTRIBUTED=1` asks for a
    multi-process start."""
    wanted = os.environ.get(DISTRIBUTED_ENV) == "1"
    return wanted or FLAGS.distributed or FLAGS.coordinator_address is not None


def start_distributed() -> None:
    """The one distributed start (see the module docstring): `jax.distributed` from the flags
    or the environment, then one collective while the processes are in step (gloo gives up
    on peers that arrive ~30 s apart at the first one). Called by the dispatcher right after
    the flags are parsed, before anything touches a device; a no-op unless asked for."""
    if not distributed_wanted():
        return
    from emgeo_jax.hosts import barrier
    from emgeo_jax.parallel import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    barrier("emgeo_initialized")


def mesh_spec() -> str | None:
    """The mesh the flags ask for (`--mesh`, an old `--fsdp/--tensor`, or the default), as a
    spec string; None = one device. The default is `auto` (every device on `fsdp`) on
    accelerators and whenever several processes run (a model on one process's device cannot
    serve the others); one device on a single CPU process."""
    import jax

    old = deprecated_mesh()  # (refuses --mesh together with an old spelling)
    spec = FLAGS.mesh or old
    if spec:
        return spec
    return "auto" if on_accelerator() or jax.process_count() > 1 else None


def read_config(source: str, flag: str = "model") -> Any:
    """The `ModelConfig` of a model source read from its config alone (no tensor is read):
    an `emgeo convert` checkpoint's config.json, an HF folder's, a GGUF file's metadata, or
    the embedded default's."""
    from emgeo_jax.models.config import ModelConfig

    if source != "default" and not Path(source).exists():
        raise FileNotFoundError(f"--{flag} {source}: no such file or folder (or use 'default')")
    if source == "default" or source.endswith(".gguf"):
        from emgeo_jax.convert.gguf import default_gguf_path, read_gguf

        path = default_gguf_path() if source == "default" else Path(source)
        return ModelConfig.from_hf(read_gguf(path).hf_config, source=str(path))
    path = Path(source)
    from emgeo_jax.convert.checkpoint import is_checkpoint

    if is_checkpoint(path):
        return ModelConfig.from_json((path / "config.json").read_text())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--{flag} {source}: no config.json (not an HF folder, .gguf or emgeo checkpoint)"
        )
    return ModelConfig.from_hf_file(path / "config.json")


def mesh_for(cfg: Any, spec: str | None = None) -> Any:
    """The `jax.sharding.Mesh` of `spec` (default: `mesh_spec()`) over every device, checked
    against the devices present and the config's parameter shapes under the partition rules;
    None for one device."""
    from emgeo_jax.models.lm import abstract_model
    from emgeo_jax.parallel import mesh_from_spec

    spec = mesh_spec() if spec is None else spec
    if spec is None:
        return None
    from flax import nnx

    params = nnx.to_pure_dict(abstract_model(cfg)[1])
    return mesh_from_spec(spec, params, flag="--mesh")


def load_model_from_flags(
    source: str | None = None,
    *,
    adapter: str | None = None,
    config: Any = None,
    training: bool = False,
) -> Any:
    """The model of `source` (default `--model`) with `--dtype`, placed on `--mesh`: the
    config is read first and the mesh validated against it before any tensor is read, then
    `emgeo_jax.load(source, dtype=..., mesh=..., attention=...)` restores or places every
    parameter straight onto its shards and sets `--attention`. `config`: the config already
    read (`read_config`) for earlier checks. `training`: the command trains (stacked
    layers only: `--noscan_layers` is refused before anything loads)."""
    import emgeo_jax

    if training and not FLAGS.scan_layers:
        raise ValueError("--noscan_layers is for inference; training runs on stacked layers")
    source = FLAGS.model if source is None else source
    cfg = read_config(source) if config is None else config
    mesh = mesh_for(cfg)
    return emgeo_jax.load(
        source,
        dtype=resolve_dtype(),
        mesh=mesh,
        adapter=adapter,
        attention=FLAGS.attention,
        scan_layers=FLAGS.scan_layers,
    )
