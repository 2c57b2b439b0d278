"""Vector and activation files: round trips, layer/key selection, errors naming file and field."""

import numpy as np
import pytest

from emgeo_jax.vectors.io import VectorFileError, load_activations, load_vectors, save_vectors

RNG = np.random.default_rng(0)


def test_safetensors_roundtrip_metadata_layer_and_key(tmp_path):
    stack = RNG.standard_normal((4, 8)).astype(np.float32)
    meta = {"model": "toy", "layers": [0, 1, 2, 3], "method": "mean_diff", "counts": [3, 5]}
    path = tmp_path / "v.safetensors"
    save_vectors(path, {"directions": stack, "direction": stack[2]}, meta)
    arr, got = load_vectors(path, key="directions")
    np.testing.assert_array_equal(arr, stack)
    assert got["model"] == "toy" and got["counts"] == [3, 5] and got["tensor"] == "directions"
    np.testing.assert_array_equal(load_vectors(path, layer=2, key="directions")[0], stack[2])
    with pytest.raises(VectorFileError, match=r"v\.safetensors.*choose one with key"):
        load_vectors(path)
    with pytest.raises(VectorFileError, match="no tensor 'nope'"):
        load_vectors(path, key="nope")
    for bad in (4, -1):  # layers are real layer numbers, not list positions
        with pytest.raises(VectorFileError, match=rf"no row for layer {bad}; it holds layers"):
            load_vectors(path, layer=bad, key="directions")
    # a single vector serves any layer
    np.testing.assert_array_equal(load_vectors(path, layer=3, key="direction")[0], stack[2])


def test_npy_and_bad_shapes(tmp_path):
    v = RNG.standard_normal(8)
    np.save(tmp_path / "a.npy", v)
    np.testing.assert_allclose(load_vectors(tmp_path / "a.npy")[0], v.astype(np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4)))
    with pytest.raises(VectorFileError, match=r"b\.npy.*shape \(2, 3, 4\)"):
        load_vectors(tmp_path / "b.npy")
    np.save(tmp_path / "c.npy", np.array([1.0, np.nan]))
    with pytest.raises(VectorFileError, match="NaN"):
        load_vectors(tmp_path / "c.npy")
    with pytest.raises(VectorFileError, match="no such file"):
        load_vectors(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(VectorFileError, match="unknown vector file type"):
        load_vectors(tmp_path / "x.txt")


def test_torch_pt_tensor_and_dict(tmp_path):
    torch = pytest.importorskip("torch")
    stack = torch.randn(3, 6)
    torch.save(stack, tmp_path / "t.pt")
    np.testing.assert_allclose(load_vectors(tmp_path / "t.pt", layer=1)[0], stack[1].numpy())
    torch.save({"vec": stack[0], "other": stack}, tmp_path / "d.pt")
    np.testing.assert_allclose(load_vectors(tmp_path / "d.pt", key="vec")[0], stack[0].numpy())


def test_activations(tmp_path):
    pooled = RNG.standard_normal((6, 3, 4)).astype(np.float32)
    label = np.array([0, 1, 0, 1, 1, 0])
    save_vectors(tmp_path / "a.safetensors", {"pooled": pooled, "label": label}, {"pooling": "t"})
    p, lab, meta = load_activations(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(p, pooled)
    np.testing.assert_array_equal(lab, label)
    assert meta["pooling"] == "t"
    save_vectors(tmp_path / "b.safetensors", {"pooled": pooled}, {})
    with pytest.raises(VectorFileError, match=r"b\.safetensors: missing tensor 'label'"):
        load_activations(tmp_path / "b.safetensors")
    save_vectors(tmp_path / "c.safetensors", {"pooled": pooled, "label": label[:5]}, {})
    with pytest.raises(VectorFileError, match="'label' has shape"):
        load_activations(tmp_path / "c.safetensors")
    save_vectors(tmp_path / "d.safetensors", {"pooled": pooled, "label": label * 2}, {})
    with pytest.raises(VectorFileError, match="only 0"):
        load_activations(tmp_path / "d.safetensors")
