"""Figures, the self-contained HTML page and the `emgeo geometry` command end to end."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from emgeo_jax.geometry import analyze
from emgeo_jax.geometry.report import layer_pca_2d, write_report
from emgeo_jax.vectors.io import save_vectors

L, D = 4, 32

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Six [L, D] vector files in three clusters (safetensors and .npy) and activations."""
    tmp = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, L, D))
    paths = []
    for k, name in enumerate(["med", "med2", "fin", "spo", "pro", "mal"]):
        v = (base[k // 2] + 0.6 * rng.standard_normal((L, D))).astype(np.float32)
        if k % 2:
            np.save(tmp / f"{name}.npy", v)
            paths.append(tmp / f"{name}.npy")
        else:
            save_vectors(tmp / f"{name}.safetensors", {"directions": v}, {"model": "toy"})
            paths.append(tmp / f"{name}.safetensors")
    labels = np.repeat([0, 1], 20)
    pooled = rng.standard_normal((40, L, D)).astype(np.float32)
    pooled[labels == 1] += 0.8 * base[0]
    tokens = rng.integers(3, 30, size=40)  # tokens pooled per example
    acts = {"pooled": pooled, "label": labels, "tokens": tokens}
    save_vectors(tmp / "acts.safetensors", acts, {})
    return tmp, paths


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """`emgeo ...` in a fresh process: absl flags are process-global, so CLIs are not run
    in-process next to other subcommands' modules."""
    cmd = [sys.executable, "-m", "emgeo_jax.cli", *argv[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_cli_writes_json_figures_and_offline_html(files):
    tmp, paths = files
    out = tmp / "out"
    argv = [
        "emgeo",
        "geometry",
        *map(str, paths),
        "--layer",
        "2",
        "--clusters",
        "medical=med,med2;risk=fin,spo;persona=pro,mal",
        "--activations",
        f"md={tmp / 'acts.safetensors'}",
        "--pca_activations",
        f"pc={tmp / 'acts.safetensors'}",
        "--out",
        str(out),
        "--n_null",
        "20",
        "--n_boot",
        "20",
        "--n_perm",
        "20",
    ]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "geometry.json").read_text())
    assert result["inputs"]["names"] == ["med", "med2", "fin", "spo", "pro", "mal", "md", "pc"]
    assert result["inputs"]["weighting"] == "token"  # the default, recorded
    made = result["inputs"]["from_examples"]
    assert made["md"]["weighting"] == "token" and made["md"]["method"] == "mean_diff"
    # the same file: one bootstrap draw for both, so their cosine has an interval
    assert made["pc"]["method"] == "pca" and made["pc"]["resampled_with"] == ["md"]
    names = result["inputs"]["names"]
    lo, hi = result["cosine"]["ci95"][names.index("md")][names.index("pc")]
    assert lo < hi
    assert set(result["independence"]) == {"medical|risk", "medical|persona", "risk|persona"}
    assert result["traces"]["reference"] == "med" and len(result["traces"]["cosine"]["fin"]) == L
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"https?:", page)  # nothing fetched from the network
    expected = ["cosine", "sets", "dendrogram", "mds", "pca", "traces", "disentanglement"]
    for name in expected:
        png = out / f"{name}.png"
        img = imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01, name
        assert base64.b64encode(png.read_bytes()).decode() in page, name  # embedded inline
        assert f"{name}.png" in page
    assert "tests support independent mechanisms" in page
    assert "<td>md</td><td>mean_diff</td><td>40</td><td>20</td><td>token</td>" in page
    assert "<td>shared with md</td>" in page and "1 mean-difference and 1 PCA" in page


def test_cli_needs_layer_for_stacks(files):
    tmp, paths = files
    proc = run_cli(["emgeo", "geometry", *map(str, paths[:2]), "--out", str(tmp / "x")])
    assert proc.returncode != 0 and "pass --layer" in proc.stderr + proc.stdout


def test_report_without_clusters_or_activations(tmp_path):
    rng = np.random.default_rng(1)
    result = analyze({n: rng.standard_normal(16) for n in "ab"}, n_null=10)
    write_report(result, tmp_path)
    page = (tmp_path / "report.html").read_text()
    for name in ("cosine", "dendrogram", "mds", "pca"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert f"{name}.png" in page
    assert not (tmp_path / "disentanglement.png").exists()
    assert not (tmp_path / "sets.png").exists()


def test_layer_pca_matches_numpy():
    rng = np.random.default_rng(2)
    pooled = rng.standard_normal((30, 3, 8))
    scores, ratio = layer_pca_2d(pooled)
    for layer in range(3):
        X = pooled[:, layer] - pooled[:, layer].mean(0)
        u, s, _ = np.linalg.svd(X, full_matrices=False)
        np.testing.assert_allclose(np.abs(scores[layer]), np.abs(u[:, :2] * s[:2]), atol=1e-4)
        np.testing.assert_allclose(ratio[layer], s[:2] ** 2 / np.sum(s**2), atol=1e-5)
