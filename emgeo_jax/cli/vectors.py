"""`emgeo vectors --activations DIR --method mean_diff|pca|random --out FILE.safetensors`.

    mean_diff  misaligned minus aligned class mean per layer -> `directions [L, D]`;
               with `--base BASE_DIR` (the same data through a base model): the model-diff,
               this model's mean minus the base model's, on `--label` answers
    pca        per-layer PCA of `DIR/per_example.safetensors` (extract with --per_example):
               `directions [L, D]` = PC1, `components [L, K, D]` when K > 1; sign agrees with
               the mean-diff; variance ratios in the metadata
    random     `--num_controls` isotropic stacks norm-matched to the mean-diff:
               `control_000 ... [L, D]`

Row i is for layer `layers[i]` of the metadata, the layers extracted (`emgeo extract --layers
12,16` -> 2 rows, for layers 12 and 16; layer l = output of block l = HF hidden_states[l+1]);
every reader looks a layer up through it (`emgeo_jax.vectors.io.row_of`). Metadata (model,
layers, method, pooling, weighting, counts, dtype, data hash) is JSON under "emgeo" in the
safetensors header.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

_ACTIVATIONS = flags.DEFINE_string("activations", None, "folder written by `emgeo extract`")
_METHOD = flags.DEFINE_enum("method", "mean_diff", ["mean_diff", "pca", "random"], "method")
_OUT = flags.DEFINE_string("out", None, "output .safetensors file")
_WEIGHTING = flags.DEFINE_enum("weighting", None, ["token", "example"], "default: as extracted")
_BASE = flags.DEFINE_string("base", None, "mean_diff: base model's extraction (model-diff)")
_LABEL = flags.DEFINE_enum(
    "label", "misaligned", ["aligned", "misaligned", "both"], "model-diff: answers compared"
)
_NUM_COMPONENTS = flags.DEFINE_integer("num_components", 1, "pca: components kept")
_NUM_CONTROLS = flags.DEFINE_integer("num_controls", 1, "random: number of control stacks")
_SEED = flags.DEFINE_integer("seed", 0, "random: seed")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo vectors takes no positional arguments, got {argv[1:]}")
    if _ACTIVATIONS.value is None or _OUT.value is None:
        raise SystemExit("usage: emgeo vectors --activations DIR --method METHOD --out FILE")
    import numpy as np

    from emgeo_jax.extract import PER_EXAMPLE_FILE, read_extraction
    from emgeo_jax.vectors import directions as dirs
    from emgeo_jax.vectors.io import load_activations, save_vectors

    ext = read_extraction(_ACTIVATIONS.value)
    weighting = _WEIGHTING.value or ext.metadata.get("weighting", "token")
    means = ext.means(weighting)
    meta = {
        k: ext.metadata.get(k)
        for k in ("model", "data", "data_sha256", "layers", "pooling", "dtype", "run_hash")
    }
    meta.update(
        method=_METHOD.value,
        weighting=weighting,
        counts=ext.counts(weighting).tolist(),
        source=str(_ACTIVATIONS.value),
    )
    mean_diff = dirs.data_diff(means)
    if _METHOD.value == "mean_diff" and _BASE.value is not None:
        base = read_extraction(_BASE.value)
        if base.layers != ext.layers:
            raise SystemExit(f"{_BASE.value}: layers {base.layers} differ from {ext.layers}")
        label = {"aligned": 0, "misaligned": 1, "both": None}[_LABEL.value]
        tensors = {
            "directions": dirs.model_diff(
                (means, ext.counts(weighting)),
                (base.means(weighting), base.counts(weighting)),
                label,
            )
        }
        meta.update(method="model_diff", base=str(_BASE.value), label=_LABEL.value)
    elif _METHOD.value == "mean_diff":
        tensors = {"directions": mean_diff}
    elif _METHOD.value == "pca":
        path = Path(_ACTIVATIONS.value) / PER_EXAMPLE_FILE
        rows, _, _ = load_activations(path)
        comps, ratio = dirs.pca(rows, mean_diff, _NUM_COMPONENTS.value)
        tensors = {"directions": comps[:, 0]}
        if _NUM_COMPONENTS.value > 1:
            tensors["components"] = comps
        meta.update(explained_variance_ratio=ratio.tolist(), sign="positive dot with mean_diff")
    else:
        controls = dirs.random_controls(mean_diff, _NUM_CONTROLS.value, _SEED.value)
        tensors = {f"control_{i:03d}": c for i, c in enumerate(controls)}
        meta.update(seed=_SEED.value, norms="matched to mean_diff per layer")
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    save_vectors(_OUT.value, tensors, meta)
    print(
        f"{_OUT.value}: {meta['method']} {', '.join(f'{k} {v.shape}' for k, v in tensors.items())}"
    )
