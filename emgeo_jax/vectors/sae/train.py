"""Train a TopK or BatchTopK SAE with optax on activations streamed from disk.

Data: `ActivationSource` reads rows `[n, D]` of a `.npy` file (memory-mapped) or of one
tensor of a safetensors file (chunked `get_slice` reads): `[N, D]`, or `[N, L, D]` with a
real `layer` (the extraction pipeline's `pooled [N, L, D]`, whose L rows are for the layers of
its metadata `layers`, else 0..L-1; `emgeo_jax.vectors.io.row_of`). Training draws random
contiguous blocks of `buffer_rows` rows, shuffles each block and cuts it into minibatches,
so memory holds one block, never the file.

Recipe (as in the TopK/BatchTopK papers and dictionary_learning's trainers):
- init: decoder rows random unit vectors, `W_enc = W_dec^T`, `b_enc = 0`, `b_dec` = geometric
  median of the first batch;
- loss: `mean_n ||x - x_hat||^2` + `auxk_alpha` * AuxK, where AuxK reconstructs the
  residual `x - x_hat` from the `D // 2` largest pre-activations of *dead* features (no
  activation for `dead_tokens` tokens), normalised by the batch's total variance;
- Adam with linear warmup and a linear decay over the last 20% of steps, gradient clipped to
  global norm 1, the gradient component parallel to each decoder row removed, and decoder
  rows renormalised to unit norm after every step;
- BatchTopK keeps an exponential moving average of the smallest active value in each batch
  as its inference threshold (saved; SAELens' converter would drop it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emgeo_jax.runs import read_settings, settings_diff, write_bytes_atomic, write_json_atomic
from emgeo_jax.vectors.io import parse_metadata, row_layers, row_of
from emgeo_jax.vectors.sae.model import (
    SAE,
    SAEError,
    batch_topk,
    make_sae,
    pre_activations,
    row_topk,
)

log = logging.getLogger(__name__)


class ActivationSource:
    """Rows `[start, stop)` of activations `[N, D]` in `path` (see module docstring)."""

    def __init__(
        self,
        path: str | Path,
        key: str | None = None,
        layer: int | None = None,
        rows: tuple[int, int] | None = None,
    ):
        self.path, self.layer = Path(path), layer
        meta: dict = {}
        if self.path.suffix == ".npy":
            self._array = np.load(self.path, mmap_mode="r")
            self._slice = self._array
        elif self.path.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(self.path), framework="numpy")
            names = list(handle.keys())
            key = key or (
                "pooled" if "pooled" in names else (names[0] if len(names) == 1 else None)
            )
            if key not in names:
                raise SAEError(f"{self.path}: choose a tensor with key= among {names}")
            self._handle, self._slice = handle, handle.get_slice(key)
            meta = parse_metadata(handle.metadata(), self.path)
        else:
            raise SAEError(f"{self.path}: activations must be .npy or .safetensors")
        shape = tuple(
            self._slice.get_shape() if hasattr(self._slice, "get_shape") else self._slice.shape
        )
        if len(shape) == 3:
            layers = row_layers(shape[1], meta, self.path)
            if layer is None:
                raise SAEError(f"{self.path}: [N, L, D] = {shape} needs a layer in {list(layers)}")
            self._row = row_of(layers, layer, self.path)
        elif len(shape) != 2:
            raise SAEError(f"{self.path}: activations must be [N, D] or [N, L, D], got {shape}")
        self._three_d = len(shape) == 3
        self.d = shape[-1]
        start, stop = rows or (0, shape[0])
        if not 0 <= start < stop <= shape[0]:
            raise SAEError(f"{self.path}: rows {start}:{stop} outside 0:{shape[0]}")
        self.start, self.stop = start, stop

    @property
    def n(self) -> int:
        return self.stop - self.start

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` relative to this source, float32 `[n, D]`."""
        block = self._slice[self.start + start : self.start + min(stop, self.n)]
        block = np.asarray(block)
        return np.asarray(block[:, self._row] if self._three_d else block, np.float32)

    def chunks(self, size: int = 4096) -> Iterator[np.ndarray]:
        """All rows in order, `size` at a time."""
        for s in range(0, self.n, size):
            yield self.read(s, s + size)

    def batches(
        self, batch_size: int, seed: int = 0, buffer_rows: int = 65536
    ) -> Iterator[np.ndarray]:
        """Endless shuffled minibatches `[batch_size, D]` (see module docstring)."""
        if self.n < batch_size:
            raise SAEError(f"{self.path}: {self.n} rows, fewer than one batch of {batch_size}")
        rng = np.random.default_rng(seed)
        buffer_rows = max(batch_size, min(buffer_rows, self.n))
        while True:
            s = int(rng.integers(0, self.n - buffer_rows + 1))
            block = self.read(s, s + buffer_rows)[rng.permutation(buffer_rows)]
            for b in range(0, buffer_rows - batch_size + 1, batch_size):
                yield block[b : b + batch_size]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    width: int
    k: int
    architecture: str = "topk"  # or "batchtopk"
    steps: int = 2000
    batch_size: int = 1024
    lr: float | None = None  # default 2e-4 / sqrt(width / 2**14)
    warmup_steps: int = 100
    auxk_alpha: float = 1 / 32
    dead_tokens: int | None = None  # default min(10M, rows in the training data)
    threshold_beta: float = 0.999
    threshold_start: int | None = None  # default steps // 4
    seed: int = 0


def geometric_median(x: jax.Array, iters: int = 30) -> jax.Array:
    """Weiszfeld iterations for the geometric median of rows `x [N, D]`."""

    def step(guess, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - guess, axis=1), 1e-8)
        return (w[:, None] * x).sum(0) / w.sum(), None

    return jax.lax.scan(step, x.mean(0), None, length=iters)[0]


def _sparse(cfg: TrainConfig, post: jax.Array) -> jax.Array:
    if cfg.architecture == "batchtopk":
        return batch_topk(post, cfg.k)
    return row_topk(post, cfg.k)


def _loss(params, x, dead, cfg: TrainConfig):
    sae = SAE(**params, threshold=jnp.zeros(()))
    pre = pre_activations(sae, x)
    f = _sparse(cfg, jax.nn.relu(pre))
    err = x - (f @ params["W_dec"] + params["b_dec"])
    l2 = jnp.mean(jnp.sum(err**2, axis=-1))
    total_var = jnp.mean(jnp.sum((x - x.mean(0)) ** 2, axis=-1))

    def auxk_loss(_):
        vals, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(x.shape[1] // 2, cfg.width))
        aux_f = jnp.put_along_axis(
            jnp.zeros_like(pre), idx, jax.nn.relu(vals), axis=-1, inplace=False
        )
        aux_err = jax.lax.stop_gradient(err) - aux_f @ params["W_dec"]
        return jnp.mean(jnp.sum(aux_err**2, axis=-1)) / total_var

    auxk = jax.lax.cond(jnp.any(dead), auxk_loss, lambda _: jnp.zeros((), jnp.float32), None)
    return l2 + cfg.auxk_alpha * auxk, (f, l2 / total_var)


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnums=(0,))
def _train_step(state, x, cfg: TrainConfig, opt: optax.GradientTransformation):
    params, opt_state, since, thr, step = state
    dead = since >= (cfg.dead_tokens or 0)
    grads, (f, rel_l2) = jax.grad(_loss, has_aux=True)(params, x, dead, cfg)
    w = params["W_dec"]
    grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * w, -1, keepdims=True) * w
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params["W_dec"] = _unit_rows(params["W_dec"])
    active = f > 0
    since = jnp.where(jnp.any(active, 0), 0, since + x.shape[0])
    smallest = jnp.min(jnp.where(active, f, jnp.inf))
    ema = jnp.where(
        thr < 0, smallest, cfg.threshold_beta * thr + (1 - cfg.threshold_beta) * smallest
    )
    thr = jnp.where(step >= (cfg.threshold_start or 0), ema, thr)
    metrics = dict(fvu=rel_l2, l0=jnp.mean(jnp.sum(active, -1)), dead=jnp.sum(dead))
    return (params, opt_state, since, thr, step + 1), metrics


@functools.lru_cache(maxsize=8)  # one optimizer per config, so the jitted step is reused
def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr = cfg.lr or 2e-4 / (cfg.width / 2**14) ** 0.5
    decay_start = int(cfg.steps * 0.8)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(cfg.warmup_steps, 1)),
            optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, max(cfg.steps - decay_start, 1)),
        ],
        [cfg.warmup_steps, decay_start],
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _save_state(folder: Path, state, cfg: TrainConfig) -> None:
    """Write the training state (msgpack, no pickle) atomically, with the config beside it."""
    from flax import serialization

    write_bytes_atomic(
        folder / "train_state.msgpack", serialization.to_bytes(jax.device_get(state))
    )
    write_json_atomic(folder / "train_config.json", dataclasses.asdict(cfg), indent=None)


def _restore_state(folder: Path, template, cfg: TrainConfig):
    """The saved training state shaped like `template`, or None if there is none; refuses a
    checkpoint written with a different config."""
    from flax import serialization

    path = folder / "train_state.msgpack"
    if not path.exists():
        return None
    saved = read_settings(folder / "train_config.json") or {}
    diff = settings_diff(saved, dataclasses.asdict(cfg))
    if diff:
        raise SAEError(
            f"{folder}/train_config.json: checkpoint was written with other settings ({diff})"
        )
    return jax.tree.map(jnp.asarray, serialization.from_bytes(template, path.read_bytes()))


def train_sae(
    source: ActivationSource,
    cfg: TrainConfig,
    layer: int | None = None,
    log_every: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    stop_at: int | None = None,
) -> SAE:
    """Train on `source` with `cfg` and return the `SAE` (arch `cfg.architecture`; a
    BatchTopK SAE carries its learned threshold). `layer` is recorded in the SAE.

    With `checkpoint` (a folder), the state is saved every `checkpoint_every` steps and at
    the end, and a later call with the same config resumes from it on the same data stream,
    so an interrupted run ends exactly where an uninterrupted one would. `stop_at` ends this
    call after that many total steps (time-boxed or preemptible jobs)."""
    if cfg.architecture not in ("topk", "batchtopk"):
        raise SAEError(f"train_sae: architecture must be topk or batchtopk, got {cfg.architecture}")
    if not 0 < cfg.k <= cfg.width:
        raise SAEError(f"train_sae: need 0 < k <= width, got k={cfg.k}, width={cfg.width}")
    cfg = dataclasses.replace(
        cfg,
        dead_tokens=cfg.dead_tokens or min(10_000_000, source.n),
        threshold_start=cfg.threshold_start if cfg.threshold_start is not None else cfg.steps // 4,
    )
    batches = source.batches(cfg.batch_size, cfg.seed)
    first = jnp.asarray(next(batches))
    w_dec = _unit_rows(jax.random.normal(jax.random.key(cfg.seed), (cfg.width, source.d)))
    params = dict(
        W_enc=w_dec.T,
        b_enc=jnp.zeros(cfg.width),
        W_dec=w_dec,
        b_dec=geometric_median(first),
    )
    opt = _optimizer(cfg)
    state = (params, opt.init(params), jnp.zeros(cfg.width, jnp.int32), jnp.float32(-1.0), 0)
    state = jax.tree.map(jnp.asarray, state)
    folder = Path(checkpoint) if checkpoint else None
    restored = _restore_state(folder, state, cfg) if folder else None
    x, start = first, 0
    if restored is not None:
        state, start = restored, int(restored[-1])
        for _ in range(start):  # replay the data stream up to the saved step
            x = next(batches)
        x = jnp.asarray(x)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step in range(start, end):
        state, metrics = _train_step(state, x, cfg, opt)
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log.info("step %d %s", step, {k: float(v) for k, v in metrics.items()})
        if folder and checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save_state(folder, state, cfg)
        x = jnp.asarray(next(batches))
    if folder:
        _save_state(folder, state, cfg)
    params, _, _, thr, _ = state
    return make_sae(
        params["W_enc"],
        params["b_enc"],
        params["W_dec"],
        params["b_dec"],
        thr if cfg.architecture == "batchtopk" else None,
        architecture=cfg.architecture,
        k=cfg.k,
        apply_b_dec_to_input=True,
        layer=layer,
        source=f"trained on {source.path}",
    )
