"""Which SAE features a direction or a contrast turns on, each ranking beside its null.

Three methods, all batched on device, each returning a `FeatureRanking` whose `p_values` are
family-wise: the fraction of null draws whose best score over *all* F features reaches the
feature's score (max-statistic correction, `(1 + #{null max >= score}) / (1 + n_null)`).

- `cosine`: decoder rows most aligned with a direction `v [D]` (signed cosine; features are
  non-negative, so only positive alignment means "turned on"). Null: isotropic random
  directions (Gaussian, normalised), not uniform [0, 1) noise.
- `class_diff`: mean feature activation on misaligned rows minus aligned rows (`label` 1 vs 0)
  of activations `[N, D]`. Null: random permutations of the labels (of whole groups, e.g.
  examples, when rows are tokens).
- `steering` (seed 000, done right): add `v` to the residual after block L-1, encode the
  residual after block L, and count over real tokens the features active with steering and
  inactive without. Null: random isotropic directions of the same norm as `v`.

Which layer's vector (`vector_layer`), for an SAE at layer L (output of block L) and a
per-layer stack such as the mean-diff: `cosine` compares the decoder rows with the vector for
layer L (the space the SAE reads); `steering` adds the vector for layer L-1, where it is
added: seed 000 "steer[s] activations in Layer 18 with the mean-diff vector for Layer 18" and
reads its SAE at layer 19.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from emgeo_jax.vectors.sae.model import SAE, encode
from emgeo_jax.vectors.sae.runner import ResidFn


def vector_layer(method: str, sae_layer: int) -> int:
    """The layer whose vector `method` uses with an SAE at `sae_layer` (see the module
    docstring): L for cosine, L - 1 for steering (refused for an SAE at layer 0)."""
    if method != "steering":
        return sae_layer
    if sae_layer < 1:
        raise ValueError(f"steering: the SAE's layer {sae_layer} has no layer before it to steer")
    return sae_layer - 1


@dataclasses.dataclass
class FeatureRanking:
    """Top features of one method: `features [K]` (indices), `scores [K]`, `p_values [K]`,
    and `null_max [n_null]` (the best score over all features in each null draw)."""

    method: str
    features: np.ndarray
    scores: np.ndarray
    p_values: np.ndarray
    null_max: np.ndarray

    def as_dict(self) -> dict:
        return dict(
            method=self.method,
            features=self.features.tolist(),
            scores=self.scores.tolist(),
            p_values=self.p_values.tolist(),
            null_max_mean=float(self.null_max.mean()) if self.null_max.size else None,
        )


def _rank(method: str, scores: jax.Array, null_max: np.ndarray, k: int) -> FeatureRanking:
    top_scores, top = jax.lax.top_k(scores, k)
    top_scores = np.asarray(top_scores, np.float64)
    null_max = np.asarray(null_max, np.float64)
    p = (1 + (null_max[None, :] >= top_scores[:, None]).sum(axis=1)) / (1 + null_max.size)
    return FeatureRanking(method, np.asarray(top), top_scores, p, null_max)


def _unit(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


@jax.jit
def _cosines(sae: SAE, directions: jax.Array) -> jax.Array:
    """`directions [M, D]` -> signed cosines with every decoder row `[M, F]`."""
    return _unit(directions) @ _unit(sae.W_dec).T


def cosine(
    sae: SAE, direction, k: int = 10, n_null: int = 1000, seed: int = 0, null_batch: int = 64
) -> FeatureRanking:
    """Features whose decoder rows have the largest cosine with `direction [D]`."""
    scores = _cosines(sae, jnp.asarray(direction, jnp.float32)[None])[0]
    key = jax.random.key(seed)
    null = []
    for start in range(0, n_null, null_batch):
        m = min(null_batch, n_null - start)
        rand = jax.random.normal(jax.random.fold_in(key, start), (m, sae.d_in))
        null.append(jnp.max(_cosines(sae, rand), axis=1))
    null_max = np.concatenate([np.asarray(x) for x in null]) if null else np.zeros(0)
    return _rank("cosine", scores, null_max, k)


@jax.jit
def _class_sums(sae: SAE, x: jax.Array, weights: jax.Array) -> jax.Array:
    """`weights [P, n] @ encode(x [n, D])` -> `[P, F]`."""
    return weights @ encode(sae, x)


def class_diff(
    sae: SAE,
    acts,
    labels,
    k: int = 10,
    n_perm: int = 200,
    seed: int = 0,
    chunk: int = 1024,
    groups=None,
) -> FeatureRanking:
    """Features whose mean activation on `acts [N, D]` is larger on `labels == 1`
    (misaligned) than on `labels == 0` (aligned); rows may be examples or tokens.

    `groups [N]` (int, e.g. the example each token row comes from): the null permutes labels
    between groups, not rows, since tokens of one example are not exchangeable; each group
    must carry one label. The class means stay row-weighted (token-weighted for tokens)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    acts = np.asarray(acts)
    if acts.ndim != 2 or acts.shape[0] != labels.shape[0]:
        raise ValueError(f"acts {acts.shape} and labels {labels.shape} do not match as [N, D], [N]")
    if not set(np.unique(labels)) <= {0, 1} or len(np.unique(labels)) != 2:
        raise ValueError("labels must contain both classes, 0 (aligned) and 1 (misaligned)")
    groups = np.arange(labels.size) if groups is None else np.asarray(groups).reshape(-1)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ in length")
    ids, row_group = np.unique(groups, return_inverse=True)
    group_label = np.zeros(ids.size, np.int64)
    group_label[row_group] = labels
    if np.any(group_label[row_group] != labels):
        raise ValueError("class_diff: a group holds rows of both labels")
    rng = np.random.default_rng(seed)
    perms = [group_label] + [rng.permutation(group_label) for _ in range(n_perm)]
    perms = np.stack(perms)[:, row_group]  # [1+P, N]
    n1 = perms.sum(axis=1, keepdims=True)
    weights = perms / n1 - (1 - perms) / (labels.size - n1)
    total = jnp.zeros((n_perm + 1, sae.d_sae), jnp.float32)
    for start in range(0, acts.shape[0], chunk):
        stop = start + chunk
        total = total + _class_sums(
            sae, jnp.asarray(acts[start:stop]), jnp.asarray(weights[:, start:stop], jnp.float32)
        )
    return _rank("class_diff", total[0], np.asarray(jnp.max(total[1:], axis=1)), k)


@jax.jit
def _newly_active(sae: SAE, clean: jax.Array, steered: jax.Array, mask: jax.Array) -> jax.Array:
    """Per feature, the number of real tokens active in `steered` and not in `clean`."""
    on = (encode(sae, steered) > 0) & (encode(sae, clean) <= 0) & mask[..., None].astype(bool)
    return jnp.sum(on, axis=(0, 1), dtype=jnp.int32)


def steering(
    sae: SAE,
    resid_fn: ResidFn,
    batches: Iterable,
    vector,
    layer: int,
    k: int = 10,
    n_null: int = 8,
    seed: int = 0,
) -> FeatureRanking:
    """Seed 000's method: steer the residual after block `layer - 1` with `vector [D]` (the
    vector for layer `layer - 1`, `vector_layer("steering", layer)`),
    encode the residual after block `layer` (the SAE's layer) for `batches` of
    `(input_ids, attention_mask)`, count newly active features over real tokens, rank."""
    vector = jnp.asarray(vector, jnp.float32)
    rand = jax.random.normal(jax.random.key(seed), (n_null, vector.shape[0]))
    vectors = jnp.concatenate([vector[None], _unit(rand) * jnp.linalg.norm(vector)])
    counts = jnp.zeros((n_null + 1, sae.d_sae), jnp.int32)
    for ids, mask in batches:
        clean = resid_fn(ids, mask, layer, None)
        rows = [
            _newly_active(sae, clean, resid_fn(ids, mask, layer, v), jnp.asarray(mask))
            for v in vectors
        ]
        counts = counts + jnp.stack(rows)
    return _rank("steering", counts[0], np.asarray(jnp.max(counts[1:], axis=1)), k)
