"""Accelerator attention kernels behind one contract, and the choice between them.

The contract (the same as the model's XLA attention):

- `q [B, T, H, Dh]`, `k, v [B, K, S, Dh]` (head-major, the KV cache's layout) with
  `H = K * G` (grouped-query attention; `G` query heads share one key/value head);
- `key_mask [B, S]` (nonzero = the slot holds a real token; pad and unwritten slots are never
  attended);
- causal masking with the query offset: query `t` sits at slot `offset + t` and sees slots
  `s <= offset + t`. Prefill/extraction is `T == S, offset = 0`; a decode step is `T = 1`
  against `S` cache slots with `offset` = the write index (a traced int is fine); a call of
  `T > 1` tokens at a traced `offset` (prompt into a cache, resume) works too;
- output `[B, T, H, Dh]` in `q.dtype`, scores and softmax in float32, scaled by `Dh ** -0.5`.

Rows with no visible key (queries at left-pad positions) give finite output (the average of
the values the kernel visited, as XLA's uniform weights), never NaN; their values differ
between implementations and must not be read (taps pool over real tokens only).

Implementations (`IMPLEMENTATIONS`, the `--attention` choices):

- `"xla"`: `emgeo_jax.models.attention.attend` (einsums over the head-major K/V with the
  numerics of `jax.nn.dot_product_attention`'s XLA path), every backend.
- `"splash"`: the Pallas TPU splash-attention kernel shipped with JAX
  (`jax.experimental.pallas.ops.tpu.splash_attention`), compiled on TPU; on other backends it
  runs in Pallas interpret mode (slow; how the tests check it on CPU). GQA goes through the
  MQA form of the kernel, one call per KV head (`vmap` over batch and KV heads): K/V are not
  repeated `G` times in HBM. The key mask becomes splash segment ids (queries segment 1, keys
  1 if visible else 0), causality a static `CausalMask`. Sequence lengths that are not a
  multiple of the block are padded (padded keys invisible, padded queries dropped); block
  sizes are picked per shape (`_blocks`). The kernel's layout is head-major, as ours: K/V
  and the cache are read in place; a key length that is not a multiple of 128 is padded (a
  copy per call: allocate caches in multiples of 128).
  Not the older `flash_attention.flash_attention(q, k, v [B, heads, T, Dh], segment_ids,
  causal=...)`: it takes as many K/V heads as query heads, so GQA would repeat K/V `G` times.
- `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention,
  GPU; bfloat16/float16, head_dim <= 128 and a multiple of 8). It takes `[B, S, K, Dh]`: K/V
  are transposed for it (XLA cancels the two transposes of fresh keys; a cache is copied).

Decode kernels (checked in jax 0.10.2, `jax.experimental.pallas.ops.tpu`): neither paged
kernel fits our cache, so decode on TPU uses splash (see `splash_attention`, `T == 1`: each
KV head's cache slots read in place) or XLA.

- `paged_attention.paged_attention(q [B, H, Dh], k_pages [K, P, page, Dh], v_pages, lengths
  [B], page_indices [B, pages_per_seq])` attends slots `[0, lengths[b])` of each row: it has
  no key mask, so the left-pad slots at the start of our rows (one write index shared by all
  rows, prompts left-padded) would be attended; and its pages `[K, pages, page, Dh]` put
  the heads before the rows where our cache is `[B, K, S, Dh]`.
- `ragged_paged_attention.ragged_paged_attention(q [tokens, H, Dh], kv_pages [P, page, 2K,
  Dh], kv_lens, page_indices, cu_q_lens, num_seqs)` also attends a contiguous prefix
  `[0, kv_lens[b])` per sequence (no key mask: left padding is not expressible) and wants K
  and V interleaved in one array along the head axis (`2K` combined heads), where our cache
  keeps `k` and `v` apart: fitting it needs a right-aligned (per-row write index) cache with
  combined K/V pages, i.e. a different cache, not a wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from emgeo_jax.models.attention import attend
from emgeo_jax.parallel import logical_spec

IMPLEMENTATIONS = ("xla", "splash", "cudnn")
"""The `--attention` choices."""

_KERNEL_BACKENDS = {"splash": "tpu", "cudnn": "gpu"}


def attention_implementation(
    requested: str | None,
    backend: str,
    *,
    dtype=None,
    head_dim: int | None = None,
    interpret: bool = False,
) -> str:
    """The attention implementation to run: `requested` (`--attention`) or, when None or
    "auto", the backend's best: "splash" on TPU, "cudnn" on GPU when it applies (`dtype`
    bfloat16/float16 and `head_dim` a multiple of 8 up to 128, when given; else "xla"), "xla"
    elsewhere (ROCm included: no cuDNN). A kernel requested on a backend without it, or that
    this jax lacks, is refused, except "splash" with `interpret=True` on any backend (Pallas
    interpret mode: tests on CPU). `backend`: `jax.default_backend()` ("cuda" counts as
    "gpu"). Pure: no device is touched."""
    backend = backend.lower()
    if backend == "cuda":
        backend = "gpu"
    cudnn_fits = (dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)) and (
        head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
    )
    if requested is None or requested == "auto":
        if backend == "tpu":
            return "splash" if _has_splash() else "xla"
        if backend == "gpu" and cudnn_fits:
            return "cudnn"
        return "xla"
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"--attention {requested!r}: unknown; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    needs = _KERNEL_BACKENDS.get(requested)
    if needs is not None and backend != needs and not (requested == "splash" and interpret):
        usable = [
            name for name in IMPLEMENTATIONS if _KERNEL_BACKENDS.get(name, backend) == backend
        ]
        raise ValueError(
            f"--attention {requested}: needs a {needs.upper()} backend, this one is {backend}; "
            f"choose one of {', '.join(usable)}"
        )
    if requested == "splash" and not _has_splash():
        _splash()  # raises the error naming --attention
    if requested == "cudnn" and not cudnn_fits:
        raise ValueError(
            f"--attention cudnn: cuDNN flash attention needs bfloat16/float16 and a head_dim "
            f"that is a multiple of 8 up to 128 (got dtype {jnp.dtype(dtype).name}, head_dim "
            f"{head_dim}); choose xla or --dtype bfloat16"
        )
    return requested


def visible_keys(key_mask: jax.Array, offset: jax.Array | int, t: int) -> jax.Array:
    """`[B, T, S]` bool: query `t` (at slot `offset + t`) may attend slot `s` (a real token
    and `s <= offset + t`)."""
    slots = jnp.arange(key_mask.shape[1])
    causal = slots[None, :] <= (offset + jnp.arange(t))[:, None]
    return causal[None] & key_mask.astype(bool)[:, None, :]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    offset: jax.Array | int = 0,
    *,
    implementation: str = "xla",
    interpret: bool | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Masked causal grouped-query attention (the module contract) -> `[B, T, H, Dh]`.

    `implementation`: one of `IMPLEMENTATIONS` (resolve it with `attention_implementation`).
    `interpret`, `mesh` (splash only): run the Pallas kernel in interpret mode (default: on
    every backend except TPU); split it over `mesh` (see `splash_attention`). The XLA and
    cuDNN paths are partitioned by the compiler from the inputs' shardings."""
    _check_shapes(q, k, v, key_mask)
    if implementation == "splash":
        return splash_attention(q, k, v, key_mask, offset, interpret=interpret, mesh=mesh)
    if implementation not in ("xla", "cudnn"):
        raise ValueError(
            f"--attention {implementation!r}: unknown; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    mask = visible_keys(key_mask, offset, q.shape[1])  # [B, T, S]
    if implementation == "xla":
        return attend(q, k, v, mask)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # cuDNN's [B, S, K, Dh]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention: q {q.shape} must be [B, T, H, Dh] and k {k.shape}, v {v.shape} the "
            "same [B, K, S, Dh]"
        )
    b, _, h, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or h % k.shape[1]:
        raise ValueError(
            f"attention: q {q.shape} [B, T, H, Dh] does not fit k {k.shape} [B, K, S, Dh] "
            "(same B and Dh, H a multiple of K)"
        )
    if key_mask.shape != (b, k.shape[2]):
        raise ValueError(f"attention: key_mask {key_mask.shape} is not [B, S]={(b, k.shape[2])}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _blocks(n: int, *, lanes: bool) -> tuple[int, int]:
    """(padded length, block) for a sequence of `n`: key blocks are multiples of 128 (the
    kernel's lane width); a short query axis is one block of `n` rounded up to 8 sublanes;
    longer axes use the largest of 512/256/128 that divides the 128-padded length."""
    if not lanes and n <= 512:
        padded = _round_up(n, 8)
        return padded, padded
    padded = _round_up(n, 128)
    return padded, next(b for b in (512, 256, 128) if padded % b == 0)


def _has_splash() -> bool:
    try:
        _splash()
    except RuntimeError:
        return False
    return True


@functools.cache
def _splash():
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise RuntimeError(
            f"--attention splash: jax {jax.__version__} has no "
            "jax.experimental.pallas.ops.tpu.splash_attention; choose xla"
        ) from err
    return splash_attention


@functools.cache
def _kernel(kind: str, rows: int, cols: int, heads: int, offset: int, interpret: bool, mode: str):
    """The splash MQA kernel for `heads` query heads sharing one KV head and a `[rows, cols]`
    mask (`kind` "causal" with the static `offset`, or "full"). `mode`: "grad" carries
    backward blocks (differentiable; its backward kernels need `rows` in blocks of 128),
    "lse" also returns the log-sum-exp, "forward" neither.
    Cached: one kernel object per static shape, its mask tables built in numpy and held as
    concrete arrays (`ensure_compile_time_eval`: the first call may come inside a `jit` trace,
    and a cached kernel must not keep that trace's values)."""
    sa = _splash()
    _, bq = _blocks(rows, lanes=mode == "grad")
    _, bkv = _blocks(cols, lanes=True)
    if kind == "causal":
        one = sa.CausalMask((rows, cols), offset=offset)
    else:
        one = sa.FullMask((rows, cols))
    backward = {}
    if mode == "grad":
        backward = dict(block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv)
        backward.update(block_q_dq=bq, block_kv_dq=bkv)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, **backward)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mqa_single_device(
            mask=sa.MultiHeadMask([one] * heads),
            block_sizes=sizes,
            save_residuals=mode == "lse",
            interpret=interpret,
        )


def _mqa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_seg: jax.Array,
    *,
    kind: str,
    offset: int,
    interpret: bool,
    mode: str = "forward",
):
    """Splash MQA per batch row and KV head: `q [B, K, G, R, Dh]` (already scaled), `k, v
    [B, K, C, Dh]`, `kv_seg [B, C]` (1 = visible) -> `[B, K, G, R, Dh]` (and the float32
    log-sum-exp `[B, K, G, R]` in `mode` "lse"; see `_kernel`). Pads `R` and `C` to the
    kernel's blocks."""
    sa = _splash()
    rows, cols = q.shape[3], k.shape[2]
    rp, _ = _blocks(rows, lanes=mode == "grad")
    cp, _ = _blocks(cols, lanes=True)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, rp - rows), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, cp - cols), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, cp - cols), (0, 0)))
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, cp - cols)))
    q_seg = jnp.ones((q.shape[0], rp), jnp.int32)
    kernel = _kernel(kind, rp, cp, q.shape[2], offset, interpret, mode)

    def one(qh, kh, vh, qs, ks):
        return kernel(qh, kh, vh, segment_ids=sa.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    res = jax.vmap(per_head)(q, k, v, q_seg, kv_seg)
    if mode != "lse":
        return res[..., :rows, :]
    out, (lse,) = res
    return out[..., :rows, :], lse[..., :rows].astype(jnp.float32)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    offset: jax.Array | int = 0,
    *,
    interpret: bool | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """The module contract through the Pallas splash kernel -> `[B, T, H, Dh]` in `q.dtype`.

    Three static cases: `T == 1` (decode: each KV head's cache slots read in place, its `G`
    queries as the kernel's heads, causality in the key segment ids, any `offset`); a static
    int `offset` (prefill: keys `[0, offset + T)`, a causal mask with that offset); a traced
    `offset` with `T > 1` (keys before `offset` with a full mask and this call's own `T` slots
    with a causal mask, the two softmaxes merged exactly by their log-sum-exp). Differentiable
    in the static offset case (the kernel's own backward pass); the other two are for
    inference. `offset + T <= S` is the caller's to keep (a traced offset cannot be checked).

    The kernel has no scale argument: `q` is multiplied by `Dh ** -0.5` in float32 and cast
    back to its dtype first. In bfloat16 that is one more rounding than XLA's (which scales
    the float32 scores) unless the scale is a power of two: float64 reference, T = 64, RMS
    error 0.0023 against XLA's 0.0016 at Dh = 128; 0.0012 against 0.0016 at Dh = 64.

    `mesh`: run the kernel per device with `shard_map` (a Pallas call is not partitioned by
    the compiler; without it, sharded inputs would be gathered onto every device). Rows are
    split like the model's batch (`MESH_RULES["batch"]`) and heads over `tensor` when it
    divides the KV heads (whole groups stay together), both replicated where the mesh does
    not divide them; sequences are never split. Every (row, KV head) is independent, so the
    result is the unsharded one."""
    _check_shapes(q, k, v, key_mask)
    b, t, h, dh = q.shape
    kh, s = k.shape[1], k.shape[2]
    if isinstance(offset, (int, np.integer)) and not 0 <= offset <= s - t:
        raise ValueError(f"attention: offset {offset} + T {t} outside the S={s} key slots")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if mesh is not None and mesh.size > 1:
        return _sharded(q, k, v, key_mask, offset, interpret, mesh)
    g = h // kh
    dtype = q.dtype
    q = (q.astype(jnp.float32) * dh**-0.5).astype(dtype)
    qh = q.reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    visible = key_mask.astype(bool)
    slots = jnp.arange(s)
    if t == 1:
        kv_seg = visible & (slots[None, :] <= offset)
        out = _mqa(qh, k, v, kv_seg, kind="full", offset=0, interpret=interpret)
    elif isinstance(offset, (int, np.integer)):
        offset = int(offset)
        n = offset + t
        out = _mqa(
            qh,
            k[:, :, :n],
            v[:, :, :n],
            visible[:, :n],
            kind="causal",
            offset=offset,
            interpret=interpret,
            mode="grad",
        )
    else:
        past, lse_past = _mqa(
            qh,
            k,
            v,
            visible & (slots[None, :] < offset),
            kind="full",
            offset=0,
            interpret=interpret,
            mode="lse",
        )
        own = [jax.lax.dynamic_slice_in_dim(x, offset, t, axis=2) for x in (k, v)]
        own_visible = jax.lax.dynamic_slice_in_dim(visible, offset, t, axis=1)
        now, lse_now = _mqa(
            qh,
            *own,
            own_visible,
            kind="causal",
            offset=0,
            interpret=interpret,
            mode="lse",
        )
        top = jnp.maximum(lse_past, lse_now)
        w_past, w_now = jnp.exp(lse_past - top), jnp.exp(lse_now - top)
        mixed = (
            past.astype(jnp.float32) * w_past[..., None]
            + now.astype(jnp.float32) * w_now[..., None]
        )
        out = (mixed / (w_past + w_now)[..., None]).astype(dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _sharded(q, k, v, key_mask, offset, interpret: bool, mesh: Mesh) -> jax.Array:
    batch = logical_spec(mesh, ("batch",), (q.shape[0],))[0]
    heads = logical_spec(mesh, ("kv_heads",), (k.shape[1],))[0]
    qs = PartitionSpec(batch, None, heads, None)
    kvs = PartitionSpec(batch, heads, None, None)
    local = functools.partial(splash_attention, interpret=interpret)
    if isinstance(offset, (int, np.integer)):
        body = functools.partial(local, offset=int(offset))
        args, specs = (q, k, v, key_mask), (qs, kvs, kvs, PartitionSpec(batch, None))
    else:
        body = local
        offset = jnp.asarray(offset, jnp.int32)
        args = (q, k, v, key_mask, offset)
        specs = (qs, kvs, kvs, PartitionSpec(batch, None), PartitionSpec())
    run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False)
    return run(*args)
