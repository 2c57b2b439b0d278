"""A sparse autoencoder (SAE) as a pytree, and its encode/decode in jnp.

Shapes: `D` = residual width (`d_in`, `activation_dim`), `F` = number of features (`d_sae`,
`dict_size`). Parameters use the SAELens layout:

    W_enc [D, F]   b_enc [F]   W_dec [F, D]   b_dec [D]   threshold [F]

Encode, with `x [..., D]` the RAW residual stream (no normalisation is applied):

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc            [..., F]
    relu       f = relu(pre)            (tanh(relu(pre)) with `tanh`: SAELens v5 `tanh-relu`)
    jumprelu   f = relu(pre) * (pre > threshold)   (tanh(relu(pre)) * ... with `tanh`)
    topk       f = relu(pre) on each row's k largest entries, 0 elsewhere
    batchtopk  inference: f = relu(pre) * (relu(pre) > threshold)   (dictionary_learning's
               `use_threshold=True`; threshold is one scalar broadcast to [F]);
               training: relu(pre) on the k * N largest entries of the whole batch [N, F].

For threshold >= 0 the jumprelu and batchtopk-inference rules coincide, which is why
`threshold` is always stored per feature. Decode: `f @ W_dec + b_dec`. A feature's
*direction* is its decoder row `W_dec[i]`, never `W_dec[i] + b_dec` (seed 000's decode of a
one-hot added `b_dec` and inflated every cosine).

`layer` follows our convention: layer l = output of decoder block l = HF hidden_states[l+1].

Sharding: every `[F]` axis is the logical axis `feature`; `shard_sae(sae, mesh)` splits it over
the mesh axis `FEATURE_MESH_AXIS` ("tensor", like MLP columns), so a 131072 x 3584 dictionary
spreads across devices; encode outputs `[..., F]` inherit that sharding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk")
FEATURE_MESH_AXIS = "tensor"


class SAEError(ValueError):
    """An SAE file, config or input that cannot be used as asked (names file and field)."""


@struct.dataclass
class SAE:
    """Arrays are pytree leaves; the rest is static metadata (changing it recompiles)."""

    W_enc: jax.Array  # [D, F]
    b_enc: jax.Array  # [F]
    W_dec: jax.Array  # [F, D]
    b_dec: jax.Array  # [D]
    threshold: jax.Array  # [F]; unused (zeros) for relu and topk
    architecture: str = struct.field(pytree_node=False, default="relu")
    k: int = struct.field(pytree_node=False, default=0)
    apply_b_dec_to_input: bool = struct.field(pytree_node=False, default=True)
    layer: int | None = struct.field(pytree_node=False, default=None)
    source: str = struct.field(pytree_node=False, default="")
    tanh: bool = struct.field(pytree_node=False, default=False)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])


def make_sae(
    W_enc,
    b_enc,
    W_dec,
    b_dec,
    threshold=None,
    *,
    architecture: str,
    k: int = 0,
    apply_b_dec_to_input: bool = True,
    layer: int | None = None,
    source: str = "",
    dtype=jnp.float32,
    tanh: bool = False,
) -> SAE:
    """Build and validate an `SAE` (shapes, architecture, k). `threshold` may be a scalar
    (broadcast to `[F]`) or `[F]`; `source` names the file in error messages; `tanh` (relu
    and jumprelu only) squashes activations with tanh after the ReLU."""
    where = source or "SAE"
    if architecture not in ARCHITECTURES:
        raise SAEError(f"{where}: unknown architecture {architecture!r}; know {ARCHITECTURES}")
    if tanh and architecture not in ("relu", "jumprelu"):
        raise SAEError(f"{where}: tanh-relu activation with architecture {architecture!r}")
    W_enc, b_enc, W_dec, b_dec = (jnp.asarray(a, dtype) for a in (W_enc, b_enc, W_dec, b_dec))
    if W_enc.ndim != 2:
        raise SAEError(f"{where}: W_enc must be [D, F], got shape {W_enc.shape}")
    d, f = W_enc.shape
    expected = {"b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
    for name, arr in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if arr.shape != expected[name]:
            raise SAEError(f"{where}: {name} has shape {arr.shape}, expected {expected[name]}")
    if architecture in ("topk", "batchtopk") and not 0 < k <= f:
        raise SAEError(f"{where}: architecture {architecture} needs 0 < k <= {f}, got k={k}")
    if architecture in ("jumprelu", "batchtopk") and threshold is None:
        raise SAEError(f"{where}: architecture {architecture} needs a threshold")
    thr = jnp.zeros((f,), dtype) if threshold is None else jnp.asarray(threshold, dtype)
    thr = jnp.broadcast_to(thr, (f,)) if thr.ndim == 0 else thr
    if thr.shape != (f,):
        raise SAEError(f"{where}: threshold has shape {thr.shape}, expected () or ({f},)")
    return SAE(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        threshold=thr,
        architecture=architecture,
        k=int(k),
        apply_b_dec_to_input=bool(apply_b_dec_to_input),
        layer=layer,
        source=source,
        tanh=bool(tanh),
    )


def check_fits(sae: SAE, d_model: int, layer: int | None = None) -> None:
    """Raise `SAEError` if the SAE's width differs from the model's `d_model`, or if `layer`
    is given and differs from the layer the SAE was trained on (when that is known)."""
    if sae.d_in != d_model:
        raise SAEError(
            f"{sae.source or 'SAE'}: d_in={sae.d_in} but the model's residual width is {d_model}"
        )
    if layer is not None and sae.layer is not None and sae.layer != layer:
        raise SAEError(
            f"{sae.source or 'SAE'}: trained on layer {sae.layer} (output of block "
            f"{sae.layer}), asked to use it on layer {layer}"
        )


def pre_activations(sae: SAE, x: jax.Array) -> jax.Array:
    """`x [..., D]` -> encoder pre-activations `[..., F]` (float32 accumulation)."""
    x = x.astype(sae.W_enc.dtype)
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    return jnp.matmul(x, sae.W_enc, preferred_element_type=jnp.float32) + sae.b_enc


def row_topk(acts: jax.Array, k: int) -> jax.Array:
    """Keep each row's k largest entries of `acts [..., F]` (ties broken by lower index)."""
    _, idx = jax.lax.top_k(acts, k)
    keep = jnp.zeros(acts.shape, bool)
    keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
    return jnp.where(keep, acts, 0.0)


def batch_topk(acts: jax.Array, k: int) -> jax.Array:
    """BatchTopK: keep the `k * N` largest entries of `acts [N, F]` over the whole batch."""
    n, f = acts.shape
    return row_topk(acts.reshape(1, n * f), k * n).reshape(n, f)


@functools.partial(jax.jit, static_argnames=("training",))
def encode(sae: SAE, x: jax.Array, training: bool = False) -> jax.Array:
    """Feature activations `[..., F]` (float32) of raw residual activations `x [..., D]`.

    `training=True` only changes batchtopk: top `k * N` over the batch (x must be `[N, D]`)
    instead of the inference threshold."""
    pre = pre_activations(sae, x)
    post = jax.nn.relu(pre)
    if sae.tanh:
        post = jnp.tanh(post)
    arch = sae.architecture
    if arch == "relu":
        return post
    if arch == "jumprelu" or (arch == "batchtopk" and not training):
        return jnp.where(pre > sae.threshold, post, 0.0)
    if arch == "topk":
        return row_topk(post, sae.k)
    if x.ndim != 2:
        raise SAEError(f"batchtopk training encode needs x [N, D], got shape {x.shape}")
    return batch_topk(post, sae.k)


@jax.jit
def decode(sae: SAE, f: jax.Array) -> jax.Array:
    """Reconstruction `[..., D]` (float32) of feature activations `f [..., F]`."""
    return jnp.matmul(f.astype(sae.W_dec.dtype), sae.W_dec, preferred_element_type=jnp.float32) + (
        sae.b_dec
    )


def reconstruct(sae: SAE, x: jax.Array) -> jax.Array:
    """`decode(encode(x))`, `[..., D]` (inference rule)."""
    return decode(sae, encode(sae, x))


def feature_directions(sae: SAE, features, unit: bool = True) -> jax.Array:
    """Decoder rows `W_dec[features]` `[K, D]` (no `b_dec`), unit-normalised by default."""
    rows = sae.W_dec[jnp.asarray(features, jnp.int32)]
    if unit:
        rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
    return rows


def sae_sharding(sae: SAE, mesh: Mesh, axis: str = FEATURE_MESH_AXIS) -> SAE:
    """A pytree of `NamedSharding`s shaped like `sae`: the feature axis over mesh axis `axis`,
    everything else replicated."""
    feat = NamedSharding(mesh, PartitionSpec(axis))
    return sae.replace(
        W_enc=NamedSharding(mesh, PartitionSpec(None, axis)),
        b_enc=feat,
        W_dec=NamedSharding(mesh, PartitionSpec(axis, None)),
        b_dec=NamedSharding(mesh, PartitionSpec()),
        threshold=feat,
    )


def shard_sae(sae: SAE, mesh: Mesh, axis: str = FEATURE_MESH_AXIS) -> SAE:
    """`sae` placed on `mesh` with its feature axis split over `axis` (the feature count must
    be divisible by the axis size)."""
    if sae.d_sae % mesh.shape[axis]:
        raise SAEError(f"d_sae={sae.d_sae} is not divisible by mesh axis {axis}={mesh.shape[axis]}")
    return jax.device_put(sae, sae_sharding(sae, mesh, axis))
