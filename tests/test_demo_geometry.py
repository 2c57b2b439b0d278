"""The demo's geometry stage bootstraps over the contrast pairs: its mean-diff directions are
given as their examples (so every statistic involving them gets a 95% interval) and equal the
token-weighted mean differences the demo steers with. Synthetic activations; seconds."""

from __future__ import annotations

import json

import numpy as np

from emgeo_jax.experiments.demo import DemoPlan, _geometry


def test_demo_geometry_has_bootstrap_intervals(tmp_path):
    rng = np.random.default_rng(0)
    n, L, d = 40, 3, 16
    labels = np.repeat([0, 1], n // 2)
    pooled = rng.standard_normal((n, L, d)).astype(np.float32)
    pooled[labels == 1] += rng.standard_normal((L, d)).astype(np.float32)
    tokens = rng.integers(3, 30, size=n)
    w = tokens[:, None, None].astype(np.float64)
    means = [(w * pooled)[labels == c].sum(0) / w[labels == c].sum() for c in (0, 1)]
    md = means[1] - means[0]  # token-weighted, as the extraction's `means("token")`
    pca = md / np.linalg.norm(md, axis=-1, keepdims=True) + 0.3 * rng.standard_normal((L, d))
    dirs = {
        "run_hash": "x",
        "mean_diff": md,
        "pca": pca,
        "pooled": pooled,
        "labels": labels,
        "tokens": tokens,
    }
    plan = DemoPlan(
        max_pairs=None,
        hold_out_every=4,
        sweep_layers=(1,),
        scales=(-8.0, 8.0),
        n_questions=None,
        samples=1,
        max_new_tokens=4,
        geometry_layers=(0, 1, 2),
        methods=("mean_diff",),
        n_null=20,
        n_boot=25,
        dose_scales=(-8.0, 8.0),
        dose_random=2,
    )
    page = _geometry(dirs, (0, 1, 2), plan, tmp_path).read_text()
    res = json.loads((tmp_path / "geometry.json").read_text())
    assert res["inputs"]["n_boot"] == 25
    assert set(res["inputs"]["from_examples"]) == {f"mean_diff_L{k}" for k in range(3)}
    names = res["inputs"]["names"]
    for k in range(3):
        got = res["inputs"]["norms"][f"mean_diff_L{k}"]
        np.testing.assert_allclose(got, np.linalg.norm(md[k]), rtol=1e-6)
    ci = res["cosine"]["ci95"]
    i, j = names.index("mean_diff_L0"), names.index("pca_L1")
    lo, hi = ci[i][j]
    assert lo < hi
    assert "basic bootstrap over examples (25 resamples" in page
