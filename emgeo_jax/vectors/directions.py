"""Directions per layer from pooled activations: mean-diff, PCA, random controls.

Row `i` of every `[L, D]` stack is for the i-th layer given (the layers extracted; all layers:
row l = output of decoder block l, HF `hidden_states[l + 1]`). Class 0 = aligned,
1 = misaligned.

- `data_diff`: misaligned mean minus aligned mean of one model, `[2, L, D] -> [L, D]`.
- `model_diff`: the same data through two models; tuned model's mean minus the base model's
  (one class, or both classes pooled with their counts), as in the reference code.
- `pca`: per-layer PCA of per-example rows `[N, L, D]` by exact SVD (`jnp.linalg.svd`, no
  randomized solver, so repeated runs agree), each component's sign fixed so that it has a
  positive dot product with a reference direction (the mean-diff), variance ratios recorded.
- `random_controls`: isotropic Gaussian directions with the per-layer norms of a reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def data_diff(means: np.ndarray) -> np.ndarray:
    """`means [2, L, D]` (aligned, misaligned) -> misaligned minus aligned `[L, D]`."""
    means = np.asarray(means)
    if means.ndim != 3 or means.shape[0] != 2:
        raise ValueError(f"class means must be [2, L, D], got {means.shape}")
    return means[1] - means[0]


def pooled_mean(means: np.ndarray, counts: np.ndarray, label: int | None = None) -> np.ndarray:
    """`[L, D]`: class `label`'s mean, or (None) both classes pooled by their `counts [2]`
    (exact for either weighting: counts are tokens or examples)."""
    means, counts = np.asarray(means, np.float64), np.asarray(counts, np.float64)
    if label is not None:
        return means[label]
    return np.einsum("c,cld->ld", counts, means) / counts.sum()


def model_diff(
    tuned: tuple[np.ndarray, np.ndarray],
    base: tuple[np.ndarray, np.ndarray],
    label: int | None = None,
) -> np.ndarray:
    """Tuned minus base model on the same data, `[L, D]`. Each argument is `(means [2, L, D],
    counts [2])`; `label` picks one class (e.g. 1 = the misaligned answers), None pools both."""
    if np.asarray(tuned[0]).shape != np.asarray(base[0]).shape:
        raise ValueError(
            f"model_diff: class means of shapes {np.shape(tuned[0])} and {np.shape(base[0])}"
        )
    if not np.array_equal(tuned[1], base[1]):
        raise ValueError(f"model_diff: counts differ ({tuned[1]} vs {base[1]}); not the same data")
    return pooled_mean(*tuned, label) - pooled_mean(*base, label)


@jax.jit
def _pca_layer(x: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [N, D]`, `reference [D]` -> all components `[min(N, D), D]` (sign-fixed) and their
    explained-variance ratios."""
    centered = x - jnp.mean(x, axis=0)
    _, s, vt = jnp.linalg.svd(centered, full_matrices=False)
    proj = vt @ reference
    # sign rule: positive projection on the reference; if it is 0, positive largest entry
    pivot = jnp.take_along_axis(vt, jnp.argmax(jnp.abs(vt), axis=1)[:, None], axis=1)[:, 0]
    sign = jnp.where(proj != 0, jnp.sign(proj), jnp.sign(pivot))
    var = s**2
    return vt * sign[:, None], var / jnp.sum(var)


def pca(
    rows: np.ndarray, reference: np.ndarray, num_components: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer PCA of centered per-example rows.

    Args:
      rows: `[N, L, D]` pooled activations (both classes).
      reference: `[L, D]` direction fixing each component's sign (e.g. the mean-diff):
        component `k` of layer `l` has `components[l, k] . reference[l] > 0` (ties: its
        largest-magnitude entry is positive).
      num_components: K.

    Returns:
      components `[L, K, D]` unit vectors (float32), explained-variance ratio `[L, K]`.
    """
    rows = np.asarray(rows, np.float32)
    reference = np.asarray(reference, np.float32)
    if rows.ndim != 3 or reference.shape != rows.shape[1:]:
        raise ValueError(
            f"pca: rows must be [N, L, D] and reference [L, D]; got "
            f"{rows.shape} and {reference.shape}"
        )
    n, _, d = rows.shape
    if not 1 <= num_components <= min(n, d):
        raise ValueError(f"pca: num_components={num_components} must be in 1..{min(n, d)}")
    comps, ratio = jax.vmap(_pca_layer, in_axes=(1, 0))(jnp.asarray(rows), jnp.asarray(reference))
    return np.asarray(comps[:, :num_components]), np.asarray(ratio[:, :num_components])


def random_controls(reference: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """`num` isotropic random stacks `[num, L, D]`, each row with the norm of `reference [L, D]`
    at that layer (Gaussian draws normalised: uniform on the sphere)."""
    reference = np.asarray(reference, np.float32)
    if reference.ndim != 2:
        raise ValueError(f"random_controls: reference must be [L, D], got {reference.shape}")
    if num < 1:
        raise ValueError(f"random_controls: num must be >= 1, got {num}")
    g = jax.random.normal(jax.random.key(seed), (num, *reference.shape), jnp.float32)
    g = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    return np.asarray(g * jnp.linalg.norm(reference, axis=-1)[None, :, None])
