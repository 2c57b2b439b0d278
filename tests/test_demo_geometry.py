"""The demo's geometry stage bootstraps over the contrast pairs: its mean-diff and PCA
directions are given as their examples, all resampled together (so every statistic between
them gets a 95% interval), and equal the token-weighted mean differences the demo steers with
and the PCA directions it computed (`vectors.directions.pca`). Synthetic activations; seconds."""

from __future__ import annotations

import json

import numpy as np

from emgeo_jax.experiments.demo import DemoPlan, _geometry
from emgeo_jax.vectors.directions import pca


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
    pc1 = pca(pooled, md)[0][:, 0]  # as the demo's extraction stage computes it
    dirs = {
        "run_hash": "x",
        "mean_diff": md,
        "pca": pc1,
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
    made = res["inputs"]["from_examples"]
    names = [f"{m}_L{k}" for m in ("mean_diff", "pca") for k in range(3)]
    assert list(made) == names and res["inputs"]["names"] == names
    assert made["pca_L2"]["method"] == "pca"
    assert made["mean_diff_L0"]["resampled_with"] == names[1:]  # one draw for all six
    C = np.array(res["cosine"]["matrix"])
    for k in range(3):
        got = res["inputs"]["norms"][f"mean_diff_L{k}"]
        np.testing.assert_allclose(got, np.linalg.norm(md[k]), rtol=1e-6)
        cos = C[names.index(f"pca_L{k}"), names.index(f"mean_diff_L{k}")]
        want = pc1[k] @ md[k] / np.linalg.norm(md[k])  # the demo's PCA direction
        np.testing.assert_allclose(cos, want, atol=1e-5)
    ci = res["cosine"]["ci95"]
    for a, b in (("mean_diff_L0", "pca_L1"), ("pca_L0", "pca_L2")):
        lo, hi = ci[names.index(a)][names.index(b)]
        assert lo < hi, (a, b)
    assert "basic bootstrap over examples (25 resamples" in page
    assert "3 mean-difference and 3 PCA (first component) directions" in page
    assert "none: both fixed" not in page
