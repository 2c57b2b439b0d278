"""The three SAE subcommands end to end through the `emgeo` dispatcher (subprocesses)."""

from __future__ import annotations

import json

import numpy as np
from safetensors import safe_open

from tests.cli_util import run_emgeo


def emgeo(*args: str) -> dict:
    out = run_emgeo(*args, timeout=300)
    return json.loads(out[out.index("{") :])


def test_train_check_and_features_cli(tmp_path):
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(16, 12))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = rng.uniform(0.5, 2, size=(1200, 16)) * (rng.random((1200, 16)) < 2 / 16)
    pooled = (codes @ atoms)[:, None, :].repeat(2, axis=1).astype(np.float32)  # [N, L=2, D]
    from safetensors.numpy import save_file

    acts = tmp_path / "acts.safetensors"
    save_file({"pooled": pooled, "label": (np.arange(1200) % 2).astype(np.int64)}, str(acts))
    out = tmp_path / "sae"
    trained = emgeo(
        "train-sae", f"--activations={acts}", "--layer=1", "--width=32", "--k=2",
        "--steps=150", "--batch_size=128", "--lr=0.003", f"--out={out}",
    )  # fmt: skip
    assert trained["heldout"]["fve"] > 0.5
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["k"] == 2

    check = emgeo("sae-check", str(out), f"--activations={acts}")
    assert check["layer"] == 1
    assert abs(check["activations"]["fve"] - trained["heldout"]["fve"]) < 0.1

    with safe_open(str(out / "sae_weights.safetensors"), "numpy") as f:
        w_dec = f.get_tensor("W_dec")
    vec = tmp_path / "v.npy"
    np.save(vec, 2.0 * w_dec[5])
    vectors = tmp_path / "feat.safetensors"
    ranked = emgeo(
        "sae-features", str(out), "--method=cosine", f"--vector={vec}", "--top=3",
        "--n_null=50", f"--out={vectors}",
    )  # fmt: skip
    assert ranked["features"][0] == 5 and abs(ranked["scores"][0] - 1) < 1e-5
    assert ranked["p_values"][0] < 0.05
    with safe_open(str(vectors), "numpy") as f:
        rows = f.get_tensor("feature_directions")
    assert rows.shape == (3, 12)
    np.testing.assert_allclose(rows[0], w_dec[5] / np.linalg.norm(w_dec[5]), atol=1e-6)
