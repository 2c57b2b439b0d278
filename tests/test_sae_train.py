"""Training TopK / BatchTopK SAEs on streamed activations with a planted sparse dictionary,
the activation reader, and (slow) an SAE trained on the embedded default model."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from emgeo_jax.vectors.sae import SAEError, encode, load_sae, save_saelens
from emgeo_jax.vectors.sae.metrics import activation_fit
from emgeo_jax.vectors.sae.train import ActivationSource, TrainConfig, train_sae

D, ATOMS, K_TRUE, N, N_TRAIN = 32, 64, 3, 9000, 8000


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """x = sparse non-negative codes (K_TRUE of ATOMS unit atoms) + offset + small noise."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    coef = np.zeros((N, ATOMS))
    for i in range(N):
        coef[i, rng.choice(ATOMS, K_TRUE, replace=False)] = rng.uniform(0.5, 2.0, K_TRUE)
    x = coef @ atoms + 0.5 + 0.02 * rng.normal(size=(N, D))
    path = tmp_path_factory.mktemp("acts") / "x.npy"
    np.save(path, x.astype(np.float32))
    return path, atoms


@pytest.mark.parametrize(
    "arch,min_fve,min_recovered", [("topk", 0.9, 0.95), ("batchtopk", 0.85, 0.8)]
)
def test_training_recovers_a_planted_dictionary(planted, tmp_path, arch, min_fve, min_recovered):
    path, atoms = planted
    cfg = TrainConfig(
        width=128, k=K_TRUE, architecture=arch, steps=600, batch_size=256, lr=3e-3, warmup_steps=20
    )
    sae = train_sae(ActivationSource(path, rows=(0, N_TRAIN)), cfg, layer=4)
    held_out = ActivationSource(path, rows=(N_TRAIN, N))
    stats = activation_fit(sae, held_out.chunks(500))
    assert stats.fve > min_fve
    assert stats.l0 == pytest.approx(K_TRUE, abs=0.5)
    best_cos = np.abs(atoms @ np.asarray(sae.W_dec).T).max(axis=1)
    assert (best_cos > 0.9).mean() >= min_recovered
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=1), 1.0, atol=1e-5)
    if arch == "batchtopk":
        assert float(sae.threshold[0]) > 0  # the learned inference threshold is kept
    # saved in the SAELens format and read back identically
    again = load_sae(save_saelens(sae, tmp_path / arch), d_model=D, layer=4)
    x = held_out.read(0, 64)
    np.testing.assert_array_equal(np.asarray(encode(again, x)), np.asarray(encode(sae, x)))


def test_activation_source_reads_pooled_layers_in_chunks(tmp_path):
    pooled = np.random.default_rng(1).normal(size=(50, 3, 8)).astype(np.float32)
    path = tmp_path / "acts.safetensors"
    save_file({"pooled": pooled, "label": np.arange(50) % 2}, str(path))
    src = ActivationSource(path, layer=2, rows=(10, 50))
    assert (src.n, src.d) == (40, 8)
    np.testing.assert_array_equal(np.concatenate(list(src.chunks(7))), pooled[10:, 2])
    batch = next(src.batches(16, seed=0, buffer_rows=32))
    assert batch.shape == (16, 8)
    assert all(any(np.array_equal(r, p) for p in pooled[10:, 2]) for r in batch)
    with pytest.raises(SAEError, match="needs a layer"):
        ActivationSource(path)
    with pytest.raises(SAEError, match="choose a tensor"):
        save_file({"a": pooled[:, 0], "b": pooled[:, 1]}, str(tmp_path / "two.safetensors"))
        ActivationSource(tmp_path / "two.safetensors")
    with pytest.raises(SAEError, match="k <= width"):
        train_sae(src, TrainConfig(width=4, k=8))


def test_interrupted_training_resumes_to_the_same_sae(planted, tmp_path):
    path, _ = planted
    cfg = TrainConfig(
        width=32, k=2, architecture="batchtopk", steps=24, batch_size=64, lr=3e-3, warmup_steps=4
    )
    src = ActivationSource(path, rows=(0, 2000))
    straight = train_sae(src, cfg)
    ckpt = tmp_path / "ckpt"
    train_sae(src, cfg, checkpoint=ckpt, checkpoint_every=5, stop_at=13)  # saved at 10 and 13
    resumed = train_sae(src, cfg, checkpoint=ckpt)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        np.testing.assert_allclose(getattr(resumed, name), getattr(straight, name), atol=1e-6)
    with pytest.raises(SAEError, match="checkpoint was written with"):
        train_sae(src, TrainConfig(**{**cfg.__dict__, "k": 3}), checkpoint=ckpt)
