"""Rows of vector and activation files are looked up by real layer, not list position.

`emgeo extract --layers 0,2` writes one row per extracted layer; every reader (sweep,
ablate/generate steering, geometry --layer/--activations, sae-features, SAE training sources)
must take the row *for* layer 2 (row 1 there) and refuse layer 1, naming the file and its
layers (`row_of`, shared by all of them, is tested directly). The reference is the same
extraction over all layers, where row l is layer l.
Seed 000's SAE steering method reads the vector of layer L-1 (it steers there), cosine L's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
from emgeo_jax.extract import ExtractSettings, extract, write_extraction
from emgeo_jax.models.steering import Steering
from emgeo_jax.vectors.directions import data_diff
from emgeo_jax.vectors.io import (
    LayerVectors,
    VectorFileError,
    load_activations,
    load_layer_vectors,
    load_vectors,
    save_vectors,
)
from emgeo_jax.vectors.sae import select
from emgeo_jax.vectors.sae.formats import save_saelens
from emgeo_jax.vectors.sae.model import make_sae
from emgeo_jax.vectors.sae.train import ActivationSource
from tests.cli_util import run_emgeo
from tests.tiny_models import LLAMA, hf_model, save_hf_folder

D = 16


def _stack(tmp_path, layers, name="v.safetensors"):
    """A stack whose row for layer l is l + 1 everywhere (distinguishable rows)."""
    rows = np.stack([np.full(D, layer + 1.0, np.float32) for layer in layers])
    path = tmp_path / name
    save_vectors(path, {"directions": rows}, {"layers": list(layers), "method": "mean_diff"})
    return path


def test_readers_map_real_layers_and_refuse_absent_ones(tmp_path):
    path = _stack(tmp_path, [1, 3])
    vec, meta = load_vectors(path, layer=3)
    np.testing.assert_array_equal(vec, np.full(D, 4.0))
    assert meta["layers"] == [1, 3]
    msg = rf"{path}: no row for layer 2; it holds layers \[1, 3\]"
    with pytest.raises(VectorFileError, match=msg):
        load_vectors(path, layer=2)
    lv = load_layer_vectors(path)
    np.testing.assert_array_equal(lv.at(1), np.full(D, 2.0))
    with pytest.raises(VectorFileError, match=msg):
        lv.at(2)
    # a plain stack (no metadata) has rows 0..L-1; a single vector serves any layer
    np.save(tmp_path / "plain.npy", np.arange(3 * D, dtype=np.float32).reshape(3, D))
    np.testing.assert_array_equal(load_vectors(tmp_path / "plain.npy", layer=2)[0][0], 2 * D)
    np.save(tmp_path / "one.npy", np.ones(D, np.float32))
    np.testing.assert_array_equal(load_layer_vectors(tmp_path / "one.npy").at(7), np.ones(D))
    # metadata that cannot name each row's layer is refused, not guessed around
    save_vectors(tmp_path / "bad.safetensors", {"d": np.ones((2, D))}, {"layers": [4]})
    with pytest.raises(VectorFileError, match=r"bad\.safetensors: metadata 'layers' \[4\]"):
        load_vectors(tmp_path / "bad.safetensors")


def test_activation_readers_map_real_layers(tmp_path):
    pooled = np.stack([np.full((4, D), layer, np.float32) for layer in (5, 9)], axis=1)
    path = tmp_path / "acts.safetensors"
    save_vectors(path, {"pooled": pooled, "label": np.array([0, 1, 0, 1])}, {"layers": [5, 9]})
    acts, _, meta = load_activations(path, layer=9)
    assert meta["layers"] == [5, 9] and np.all(acts == 9)
    src = ActivationSource(path, layer=9)
    assert np.all(np.concatenate(list(src.chunks(3))) == 9)
    for read in (lambda: load_activations(path, layer=1), lambda: ActivationSource(path, layer=1)):
        with pytest.raises(VectorFileError, match=r"no row for layer 1; it holds layers \[5, 9\]"):
            read()


def test_steering_and_sweep_digest_use_the_real_layer():
    from emgeo_jax.experiments.sweep import vector_digest
    from emgeo_jax.models.config import ModelConfig

    cfg = ModelConfig("llama", 8, D, 8, 4, 2, 1, 8, 1e-5, 1e4, 8, False)
    lv = LayerVectors(np.stack([np.full(D, 2.0), np.full(D, 4.0)]).astype(np.float32), (1, 3))
    add = np.asarray(Steering.addition(cfg, lv, scale=0.5).add)
    np.testing.assert_array_equal(add[[1, 3]], [np.full(D, 1.0), np.full(D, 2.0)])
    assert not add[[0, 2]].any()
    with pytest.raises(VectorFileError, match=r"no row for layer 2; it holds layers \[1, 3\]"):
        Steering.addition(cfg, lv, layers=[2])
    ablate = np.asarray(Steering.layer_ablation(cfg, lv).ablate)
    np.testing.assert_allclose(np.abs(ablate[3, 0]), np.full(D, D**-0.5), rtol=1e-6)
    assert not ablate[[0, 2]].any()
    # the same values for other layers are another configuration
    same_rows = LayerVectors(lv.values, (0, 1))
    assert vector_digest(same_rows) == vector_digest(lv.values) != vector_digest(lv)


def test_sae_steering_method_reads_the_vector_of_layer_before_the_sae():
    assert select.vector_layer("cosine", 19) == 19
    assert select.vector_layer("steering", 19) == 18  # seed 000: steer L18 with L18's vector
    with pytest.raises(ValueError, match="no layer before it"):
        select.vector_layer("steering", 0)


@pytest.fixture(scope="module")
def subset(chat_tokenizer, tmp_path_factory):
    """A tiny llama (3 blocks) extracted over layers (0, 2) and over all layers."""
    tmp = tmp_path_factory.mktemp("subset")
    model = hf_model({**LLAMA, "vocab_size": len(chat_tokenizer)}, seed=5)
    save_hf_folder(model, tmp / "model")
    lm = emgeo_jax.load(tmp / "model")
    lines = shipped_contrast_path().read_text().splitlines()[:3]
    (tmp / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    tokenized = tokenize_examples(load_examples(tmp / "pairs.jsonl")[0], chat_tokenizer, 256)[0]
    exts = {}
    for name, layers in (("part", (0, 2)), ("full", None)):
        settings = ExtractSettings(layers=layers, per_example=True, batch_size=2)
        exts[name] = extract(lm, tokenized, settings, progress=False)
        write_extraction(exts[name], tmp / name)
    return tmp, exts


def test_extract_vectors_geometry_and_sae_features_with_a_layer_subset(subset):
    tmp, exts = subset
    full = data_diff(exts["full"].means("example"))  # row l = layer l: the reference
    md = tmp / "md.safetensors"
    run_emgeo("vectors", f"--activations={tmp / 'part'}", "--weighting=example", f"--out={md}")
    vec, meta = load_vectors(md)
    assert vec.shape == (2, full.shape[1]) and meta["layers"] == [0, 2]
    np.testing.assert_allclose(load_vectors(md, layer=2)[0], full[2], rtol=1e-5, atol=1e-6)
    np.save(tmp / "ref2.npy", full[2])
    acts = tmp / "part" / "per_example.safetensors"

    geo = tmp / "geo"
    run_emgeo(
        "geometry", str(md), str(tmp / "ref2.npy"), "--layer=2", f"--activations=ex={acts}",
        "--weighting=example", "--n_null=20", "--n_boot=10", "--n_perm=20", f"--out={geo}",
    )  # fmt: skip
    result = json.loads((geo / "geometry.json").read_text())
    names, m = result["inputs"]["names"], np.asarray(result["cosine"]["matrix"])
    # the file's row for layer 2 and the example-pooled mean-diff at layer 2 are the reference
    assert m[names.index("md"), names.index("ref2")] == pytest.approx(1.0, abs=1e-5)
    assert m[names.index("ex"), names.index("ref2")] == pytest.approx(1.0, abs=1e-5)

    # an SAE at layer 2 whose feature 5 is layer 2's mean-diff; row 7 is layer 0's
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(12, full.shape[1]))
    w_dec[5], w_dec[7] = full[2], full[0]
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    sae = make_sae(w_dec.T, np.zeros(12), w_dec, np.zeros(full.shape[1]), 0.0,
                   architecture="topk", k=2, layer=2)  # fmt: skip
    save_saelens(sae, tmp / "sae")
    out = run_emgeo("sae-features", str(tmp / "sae"), "--method=cosine", f"--vector={md}",
                    "--top=2", "--n_null=10")  # fmt: skip
    ranked = json.loads(out[out.index("{") :])
    assert ranked["features"][0] == 5 and ranked["vector_layer"] == 2
    part_acts = load_activations(acts, layer=2)[0]
    np.testing.assert_array_equal(part_acts, load_activations(
        tmp / "full" / "per_example.safetensors")[0][:, 2])  # fmt: skip


def test_sae_steering_cli_takes_the_row_of_layer_l_minus_1(tmp_path):
    """A file holding only layer 1 serves the steering method of an SAE at layer 2: it gets
    past the vector to the missing --model (the old code read row 2 and failed there)."""
    path = _stack(tmp_path, [1])
    sae = make_sae(np.eye(D), np.zeros(D), np.eye(D), np.zeros(D), 0.0,
                   architecture="topk", k=2, layer=2)  # fmt: skip
    save_saelens(sae, tmp_path / "sae")
    err = run_emgeo("sae-features", str(tmp_path / "sae"), "--method=steering",
                    f"--vector={path}", status=2)  # fmt: skip
    assert "--method steering needs --model and --texts" in err
