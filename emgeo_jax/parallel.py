"""Meshes and partition rules.

A mesh has up to three named axes: `data` (batch), `fsdp` (batch too, plus parameter
shards gathered per layer), `tensor` (heads / MLP columns / vocabulary). Parameters are
sharded in two steps, both data tables:

1. each parameter's *logical* axes, e.g. `q_proj.kernel -> (layer, embed, heads)`: the `axes`
   column of the parameter table `emgeo_jax.models.params.PARAMS`;
2. `MESH_RULES`: logical axis -> mesh axis (or None = replicated).

Activations and the KV cache have logical axes too (`ACTIVATION_AXES`). Their `act_embed`
axis is *not* `embed`: the batch already uses `fsdp`, so activations keep `D` whole and
only parameters are split along it (gathered one layer at a time inside the scan).
Inference pins the residual so: extraction and the generation prefill (`hidden`, many
tokens per row) all-gather each layer's weights and split the batch (left free, the
compiler splits the residual along `D` like the weights and all-reduces whole-batch
activations on every device). A decode step is the exception (`step_hidden`): its `B`
tokens carry far fewer bytes than a layer's weights (`B` well below `D`), so its residual
is split along `D` like the weights' `embed` side, the weights stay in place and only
`[B, 1, ...]` activations move.
Qwen2.5-7B, B=8, S=2305 on 8 simulated devices: pinning a decode step to `hidden` instead
all-gathers 1.6 GB (fsdp=4 x tensor=2) / 3.1 GB (fsdp=8) per layer-scan body plus LM head,
against 15 MB, and needs 1.7 / 3.4 GB of temporaries against 0.39 GB. The KV cache stays
split over the batch either way.

A dimension whose size the mesh axis does not divide is replicated instead, so every
model runs on every mesh; the plan is only about speed and memory, never correctness.

What the rules give for the models users run (bf16, mesh `fsdp x tensor`): every matrix is
split along both `fsdp` (its `embed` side) and `tensor` (its heads / MLP / vocab side), so
parameter bytes per device are the model size over `fsdp * tensor`, up to norm scales and
biases. Qwen2.5-7B (4 KV heads) and Llama-3.1-70B (8 KV heads) keep their KV projections
split over `tensor` because the split is over `K * Dh` columns; the KV *cache* splits over
whole KV heads, so with `tensor` > K it is replicated over `tensor` (`emgeo plan` shows it).
LoRA factors and their optimizer state split their wide side over `fsdp x tensor`
(`LORA_AXES`), so LoRA training adds (1 + 3) x LoRA bytes / (fsdp * tensor) per device
(factors, then AdamW's two moments and the gradient accumulator of `optax.MultiSteps`).

Multi-process runs (TPU pod slices, Slurm, several processes on one machine) call
`initialize_distributed()` once before touching devices; `emgeo` does so with `--distributed`
or when `EMGEO_DISTRIBUTED=1` is set (the scripts in `launch/` set it). Users spell meshes as
`--mesh fsdp=8` / `data=2,fsdp=4,tensor=2` / `auto`: `parse_mesh_spec`, `mesh_shape` and
`check_param_split` (at the end of this file) turn that into a checked `make_mesh` call.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.models.params import leaves, param

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of activations and caches (shapes in the notation of models/config.py).
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "seq"),  # input_ids, positions, attention_mask [B, T]
    "resid": ("layer", "batch", "seq", "act_embed"),  # resid_post [L, B, T, D]
    "hidden": ("batch", "seq", "act_embed"),  # the residual inside the scan [B, T, D]
    "step_hidden": ("step_batch", "seq", "embed"),  # a decode step's residual [B, 1, D]
    "logits": ("batch", "seq", "vocab"),  # [B, T, V]
    "kv_cache": ("layer", "batch", "kv_heads", "cache_seq", "head_dim"),  # [L, B, K, S, Dh]
    "cache_mask": ("batch", "cache_seq"),  # KVCache.mask [B, S]
}

# Logical axes of a LoRA factor (`emgeo_jax.train.lora`: a [n, in, r], b [n, r, out]). The
# factors and their optimizer state are tiny next to the model, so their wide side is split
# over every parameter axis at once (ZeRO-style) whatever the kernel's own axes are.
LORA_AXES: dict[str, tuple[str, ...]] = {
    "a": ("layer", "lora_features", "lora_rank"),
    "b": ("layer", "lora_rank", "lora_features"),
}

MESH_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "step_batch": "data",  # decode rows: fsdp splits their D instead (see module docstring)
    "layer": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "seq": None,
    "act_embed": None,
    "cache_seq": None,
    "head_dim": None,
    "lora_features": ("fsdp", "tensor"),
    "lora_rank": None,
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data, fsdp, tensor`.

    `shape` gives sizes for some axes, e.g. `{"fsdp": 4, "tensor": 2}`; `data` takes what is
    left. Default: every device on `data` (pure data parallelism)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    fixed = math.prod(v for k, v in shape.items() if k != "data")
    if len(devices) % fixed:
        raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
    shape.setdefault("data", len(devices) // fixed)
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    if math.prod(sizes) != len(devices):
        mesh_shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh {mesh_shape} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_spec(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`, replicating dims the mesh cannot divide."""
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axes = MESH_RULES.get(axis) if axis else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            if size % math.prod(mesh.shape[n] for n in names):
                mesh_axes = None
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh, path: tuple[str, ...], shape: Sequence[int]) -> NamedSharding:
    """Sharding of the parameter at `path` (pure-dict path, e.g. `("layers","attn","q_proj",
    "kernel")`) with the given full shape. A block of unstacked layers (`("layers", "3",
    ...)`, `LM.unstacked`) is split as that block's row of the stacked parameter."""
    if len(path) > 1 and path[0] == "layers" and str(path[1]).isdigit():
        stacked = param((path[0], *path[2:])).full_axes
        spec = logical_spec(mesh, stacked, (1, *shape))
        return NamedSharding(mesh, PartitionSpec(*spec[1:]))
    return NamedSharding(mesh, logical_spec(mesh, param(path).full_axes, shape))


def param_shardings(mesh: Mesh, tree: dict, prefix: tuple[str, ...] = ()) -> dict:
    """The same pure-dict tree with each leaf (anything with `.shape`) replaced by its
    `NamedSharding` under the rules."""
    out = {}
    for key, leaf in tree.items():
        path = (*prefix, str(key))
        if isinstance(leaf, dict):
            out[key] = param_shardings(mesh, leaf, path)
        else:
            out[key] = param_sharding(mesh, path, leaf.shape)
    return out


def default_sharding() -> jax.sharding.SingleDeviceSharding:
    """Where a model goes without a mesh: this process's first device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def put_sharded(host: np.ndarray, sharding: jax.sharding.Sharding, dtype: Any = None) -> jax.Array:
    """`host` (a numpy array, or a transposed view of one such as an HF weight seen as our
    kernel) placed on `sharding` one device shard at a time, as `dtype` (default: the host
    dtype): each addressable device receives only its own slice, cut, transposed and
    converted on the host just before its transfer. No device ever holds more of the array
    than its shard, and the host holds at most one slice besides `host`. Works across
    processes (each places its own devices' shards; all must pass the same values)."""
    dtype = np.dtype(dtype or host.dtype)
    transpose = host.ndim > 1 and host.T.flags.c_contiguous and not host.flags.c_contiguous
    stored = host.T if transpose else host
    # numpy copies extension dtypes (bfloat16) element by element, several times slower than
    # an unsigned integer of the same width: cut and transpose through such a view
    same = dtype == stored.dtype and stored.dtype.itemsize in (1, 2, 4, 8)
    raw = stored.view(f"u{stored.dtype.itemsize}") if same else stored

    def piece(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (host.ndim - len(index))
        if transpose:  # copy the stored block (rows stay contiguous), then transpose it
            block = np.ascontiguousarray(raw[index[::-1]]).T
        else:
            block = raw[index]
        return np.ascontiguousarray(block).view(stored.dtype).astype(dtype, copy=False)

    return jax.make_array_from_callback(host.shape, sharding, piece)


def move_to(x: jax.Array, sharding: NamedSharding, *, donate: bool = False) -> jax.Array:
    """`x`, a device array, split by `sharding`: the same buffers under the new name when the
    split is the same (a compiler's `P(None, 'fsdp')` for a layout's `P(None, ('data',
    'fsdp'), 'tensor')`, one device's array for a one-device mesh: nothing copied, on one
    process or several), else copied device to device (`device_put`; `donate`: `x` is
    consumed, its buffers reused where they can be). A jitted function's compiled program is
    keyed on its arguments' shardings by name, so arguments placed with the names a plan
    compiled with run that plan's executable."""
    if x.sharding == sharding:
        return x
    if x.sharding.is_equivalent_to(sharding, x.ndim):
        shards = [s.data for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)
    return jax.device_put(x, sharding, donate=donate)


def stack_on_devices(
    tensors: Iterable[np.ndarray],
    shape: Sequence[int],
    dtype: Any,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    """A stacked `[L, ...]` parameter of `shape` built on its devices one layer at a time:
    `tensors` yields the `L` host tensors `shape[1:]` in layer order (read lazily by the
    caller), each placed by `put_sharded` with the layer's sharding and written into a
    buffer that was allocated already sharded (donated at every step). The host holds one
    layer, and each device its shard of the result plus one layer's shard. The leading
    `layer` axis must not be split (`MESH_RULES["layer"] is None`)."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    layer_sharding = sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError(f"cannot stack layer by layer along a split axis ({sharding.spec})")
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    out = sharded_zeros(jax.ShapeDtypeStruct(shape, dtype), sharding)
    count = 0
    for layer, t in enumerate(tensors):
        if tuple(t.shape) != shape[1:] or layer >= shape[0]:
            raise ValueError(f"layer {layer}: tensor {t.shape} does not fit stacked {shape}")
        out = _set_layer_fn(sharding)(out, put_sharded(t, layer_sharding, dtype), np.int32(layer))
        del t  # before the next layer is read
        count += 1
    if count != shape[0]:
        raise ValueError(f"got {count} layers for a stacked parameter {shape}")
    return out


def sharded_zeros(shapes: Any, shardings: Any) -> Any:
    """Zeros of `shapes` (a pytree of `jax.ShapeDtypeStruct`) allocated where `shardings` (the
    same tree) put them, each device only its shard; one compiled allocator per (shapes,
    shardings), made once (a KV cache on every generation call, a stacked parameter)."""
    return _zeros_fn(shapes, shardings)()


@functools.lru_cache(maxsize=256)
def _zeros_fn(shapes: Any, shardings: Any):
    def zeros():
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    return jax.jit(zeros, out_shardings=shardings)


@functools.lru_cache(maxsize=256)
def _set_layer_fn(sharding: jax.sharding.Sharding):
    def set_layer(stacked, layer, index):
        return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def lora_shardings(mesh: Mesh, tree):
    """Shardings for a LoRA (`{target: {"a": [n, in, r], "b": [n, r, out]}}`) or any pytree
    holding such dicts (e.g. its optax state): a leaf under a key "a"/"b" with 3 dims gets
    `LORA_AXES`, every other leaf (step counts) is replicated."""

    def one(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys and keys[-1] in LORA_AXES and len(leaf.shape) == 3:
            return NamedSharding(mesh, logical_spec(mesh, LORA_AXES[keys[-1]], leaf.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree)


def activation_sharding(mesh: Mesh, kind: str, shape: Sequence[int]) -> NamedSharding:
    """Sharding of an activation of `kind` (a key of `ACTIVATION_AXES`) with `shape`."""
    if kind not in ACTIVATION_AXES:
        raise ValueError(f"unknown activation {kind!r}; known: {sorted(ACTIVATION_AXES)}")
    return NamedSharding(mesh, logical_spec(mesh, ACTIVATION_AXES[kind], shape))


def params_mesh(params) -> Mesh | None:
    """The mesh a parameter tree (any pytree of arrays) lives on when it spans more than one
    device, else None: inference pins activations only then, so single-device programs
    stay unconstrained."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def shard_factor(sharding: NamedSharding) -> int:
    """How many pieces the sharding cuts an array into (product of the mesh axes it uses);
    bytes per device = array bytes / shard_factor."""
    names = [n for entry in sharding.spec if entry is not None for n in _names(entry)]
    return math.prod(sharding.mesh.shape[n] for n in names)


def _names(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize`, once per process (later calls do nothing).

    The coordinator, process count and id come from the arguments, else from
    `EMGEO_COORDINATOR=host:port`, `EMGEO_NUM_PROCESSES`, `EMGEO_PROCESS_ID` (launch/local.sh
    sets them); with neither, JAX discovers its peers itself (TPU VM slices, Slurm). On CPU,
    collectives between processes go through gloo. `emgeo --distributed` (or
    `EMGEO_DISTRIBUTED=1`, which the scripts in `launch/` set) calls this before anything
    touches a device."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    coordinator = coordinator or os.environ.get("EMGEO_COORDINATOR")
    if coordinator is None:
        jax.distributed.initialize()
        return
    try:
        num = num_processes if num_processes is not None else int(os.environ["EMGEO_NUM_PROCESSES"])
        pid = process_id if process_id is not None else int(os.environ["EMGEO_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"a coordinator ({coordinator}) needs the process count and id: --num_processes and "
            f"--process_id, or EMGEO_NUM_PROCESSES and EMGEO_PROCESS_ID as integers ({e})"
        ) from None
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for a `[B, ...]` input: batch over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MESH_RULES["batch"], *([None] * (ndim - 1))))


# --- mesh specs as users write them (`--mesh fsdp=8`, `emgeo plan --mesh data=2,fsdp=4`) -------

AUTO_MESH = "auto"


def parse_mesh_spec(text: str, flag: str = "--mesh") -> dict[str, int] | str:
    """`"data=2,fsdp=4,tensor=2"` -> `{"data": 2, "fsdp": 4, "tensor": 2}`; `"auto"` -> `"auto"`
    (every device on `fsdp`). A ValueError naming `flag` for anything else: a missing `=`, a
    size that is not a positive integer, an axis not in `MESH_AXES`, an axis given twice."""
    text = text.strip()
    if text == AUTO_MESH:
        return AUTO_MESH
    out: dict[str, int] = {}
    example = "e.g. fsdp=8, data=2,fsdp=4,tensor=2 or auto"
    for part in text.split(","):
        axis, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not size.isdigit() or int(size) < 1:
            raise ValueError(f"{flag} {text!r}: {part!r} is not AXIS=SIZE ({example})")
        if axis not in MESH_AXES:
            raise ValueError(
                f"{flag} {text!r}: unknown axis {axis!r}; the axes are {', '.join(MESH_AXES)}"
            )
        if axis in out:
            raise ValueError(f"{flag} {text!r}: axis {axis!r} given twice")
        out[axis] = int(size)
    return out


def mesh_shape(spec: dict[str, int] | str, num_devices: int, flag: str = "--mesh") -> dict:
    """Sizes of all of `MESH_AXES` for a parsed spec on `num_devices` devices: `auto` puts
    every device on `fsdp`; an axis left out is 1, except `data`, which takes the devices the
    others leave (as `make_mesh`). A ValueError naming `flag` and the devices present when the
    spec needs more devices than there are or its sizes do not divide them."""
    if spec == AUTO_MESH:
        return {"data": 1, "fsdp": num_devices, "tensor": 1}
    text = ",".join(f"{k}={v}" for k, v in spec.items())
    fixed = math.prod(v for k, v in spec.items() if k != "data")
    total = fixed * spec.get("data", 1)
    if total > num_devices:
        raise ValueError(f"{flag} {text}: needs {total} devices, {num_devices} present")
    if "data" not in spec:
        if num_devices % fixed:
            raise ValueError(
                f"{flag} {text}: {fixed} does not divide the {num_devices} devices present "
                f"(data would take the rest)"
            )
        spec = {**spec, "data": num_devices // fixed}
    elif total != num_devices:
        raise ValueError(
            f"{flag} {text}: uses {total} of the {num_devices} devices present; leave out "
            f"data= to let it take the rest"
        )
    return {a: spec.get(a, 1) for a in MESH_AXES}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_param_split(shape: dict[str, int], params: dict, flag: str = "--mesh") -> None:
    """Refuse a mesh on which some parameter dimension the rules shard cannot be split:
    `params` is the pure-dict parameter tree (leaves with `.shape`, e.g. the abstract model),
    `shape` the mesh axis sizes. Each dimension's logical axis (`models.params`) maps to mesh
    axes (`MESH_RULES`) whose product must divide it; otherwise a ValueError naming `flag`,
    the parameter and the sizes of that axis that would split every parameter (e.g.
    `tensor=3` on a model whose KV projections have 2 heads x 64 = 128 columns)."""
    sizes: dict[str, list[int]] = {}  # mesh axis -> dims it splits
    bad = []
    for path, leaf in leaves(params):
        axes = param(path).full_axes
        for axis, size in zip(axes, leaf.shape, strict=True):
            rule = MESH_RULES.get(axis)
            if rule is None:
                continue
            names = _names(rule)
            for name in names:
                sizes.setdefault(name, []).append(size)
            ways = math.prod(shape.get(n, 1) for n in names)
            if ways > 1 and size % ways:
                bad.append((math.prod(leaf.shape), path, axis, size, names, ways))
    if not bad:
        return
    _, path, axis, size, names, ways = max(bad, key=lambda b: b[0])  # a kernel, not its bias
    text = ",".join(f"{k}={v}" for k, v in shape.items() if v > 1)
    fits = {n: _divisors(math.gcd(*sizes[n])) for n in names}
    hint = "; ".join(f"{n} must be one of {', '.join(map(str, d))}" for n, d in fits.items())
    raise ValueError(
        f"{flag} {text}: {'.'.join(path)} has {size} {axis} entries, which "
        f"{'x'.join(names)}={ways} cannot split evenly; for this model {hint}"
    )


def mesh_from_spec(
    text: str, params: dict | None = None, devices: Sequence | None = None, flag: str = "--mesh"
) -> Mesh:
    """The mesh a `--mesh` value describes over `devices` (default: all, every process's),
    checked first against the device count and, given the abstract parameter tree `params`,
    against the partition rules (`check_param_split`); errors name `flag`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(parse_mesh_spec(text, flag), len(devices), flag)
    if params is not None:
        check_param_split(shape, params, flag)
    return make_mesh(shape, devices)
