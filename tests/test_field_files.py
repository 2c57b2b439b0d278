"""The field's own files, built in the exact layout their projects save, read exactly.

Layouts are rebuilt here from the reference projects' saving code (no text of theirs copied):

- persona_vectors `generate_vec.py`: `torch.save(torch.stack([diff of layer l for l in
  range(num_hidden_layers + 1)]))`, a `[L+1, D]` tensor in HF `hidden_states` order;
- model-organisms-for-EM (MO4EM): forward hooks on `model.model.layers[i]` keyed
  `layer_{i}`, saved as `{"answer": {"layer_i": [D]}, "question": {...}}`, a list of `[D]`
  per layer, or a dict of such lists.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.steer import Steering
from emgeo_jax.vectors.io import VectorFileError, load_layer_vectors, load_vectors

torch = pytest.importorskip("torch")

L, D = 6, 16
CFG = ModelConfig("llama", 8, D, 8, L, 2, 1, 8, 1e-5, 1e4, 8, False)


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _add(vector, layers, scale=2.0) -> np.ndarray:
    return np.asarray(Steering.addition(CFG, vector, layers=layers, scale=scale).add)


def test_persona_vectors_file_steers_like_its_row_l_plus_1_at_layer_l(tmp_path, caplog):
    hs = _rows(L + 1)  # row 0 = embeddings, row l+1 = output of block l
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.from_numpy(hs), path)
    vec = load_layer_vectors(path)
    for layer in (0, 3, L - 1):
        with caplog.at_level(logging.WARNING, logger="emgeo_jax.vectors.io"):
            got = _add(vec, [layer])
        np.testing.assert_array_equal(got, _add(hs[layer + 1], [layer]))
        assert "persona_vectors" in caplog.text and "row 0 = embeddings" in caplog.text
    # every layer of the stack at once: row l+1 at layer l, the embedding row never used
    np.testing.assert_array_equal(_add(vec, None, 1.0), hs[1:])
    # the CLI path (emgeo generate / serve --steer FILE --layer 3) builds the same steering
    from emgeo_jax.cli.steer_flags import build_steering

    args = types.SimpleNamespace(
        steer=str(path), layer=["3"], scale=2.0, positions="all", ablate=None,
        ablate_layers=None, key=None,
    )  # fmt: skip
    steering, _ = build_steering(CFG, args)
    np.testing.assert_array_equal(np.asarray(steering.add), _add(hs[4], [3]))
    # with the layer count known at read time, the reader resolves it too
    np.testing.assert_array_equal(load_vectors(path, layer=3, num_layers=L)[0], hs[4])


@pytest.mark.parametrize("rows", [L - 1, L + 2, 2 * L])
def test_a_stack_of_any_other_row_count_is_refused_naming_shape_and_layouts(tmp_path, rows):
    path = tmp_path / "v.pt"
    torch.save(torch.from_numpy(_rows(rows)), path)
    with pytest.raises(VectorFileError) as e:
        _add(load_layer_vectors(path), [2])
    msg = str(e.value)
    assert f"({rows}, {D})" in msg and str(path) in msg
    assert f"[{L}, D]" in msg and f"[{L + 1}, D]" in msg and "persona_vectors" in msg


def test_a_plain_stack_of_L_rows_is_layers_0_to_L_minus_1(tmp_path):
    v = _rows(L)
    np.save(tmp_path / "v.npy", v)
    np.testing.assert_array_equal(
        _add(load_layer_vectors(tmp_path / "v.npy"), [2]), _add(v[2], [2])
    )


def test_mo4em_nested_layouts_read_with_key(tmp_path):
    ans, q = _rows(L, 1), _rows(L, 2)
    nested = {
        "answer": {f"layer_{i}": torch.from_numpy(ans[i]) for i in range(L)},
        "question": {f"layer_{i}": torch.from_numpy(q[i]) for i in range(L)},
    }
    torch.save(nested, tmp_path / "nested.pt")
    with pytest.raises(VectorFileError, match=r"\['answer', 'question'\]; choose one with key="):
        load_layer_vectors(tmp_path / "nested.pt")
    vec = load_layer_vectors(tmp_path / "nested.pt", key="answer")
    assert vec.layers == tuple(range(L)) and not vec.implicit
    np.testing.assert_array_equal(_add(vec, [4]), _add(ans[4], [4]))
    np.testing.assert_array_equal(load_vectors(tmp_path / "nested.pt", 2, key="question")[0], q[2])

    # a subset of layers, keys unordered: rows follow the layer named by the key
    torch.save({f"layer_{i}": torch.from_numpy(ans[i]) for i in (5, 1)}, tmp_path / "sub.pt")
    vec = load_layer_vectors(tmp_path / "sub.pt")
    assert vec.layers == (1, 5)
    np.testing.assert_array_equal(vec.at(5), ans[5])
    with pytest.raises(VectorFileError, match=r"no row for layer 2; it holds layers \[1, 5\]"):
        vec.at(2)

    # a list of [D] tensors per layer, and a dict of such lists
    torch.save([torch.from_numpy(r) for r in ans], tmp_path / "list.pt")
    np.testing.assert_array_equal(
        _add(load_layer_vectors(tmp_path / "list.pt"), [0]), _add(ans[0], [0])
    )
    lists = {
        "answer": [torch.from_numpy(r) for r in ans],
        "question": [torch.from_numpy(r) for r in q],
    }
    torch.save(lists, tmp_path / "lists.pt")
    vec = load_layer_vectors(tmp_path / "lists.pt", key="question")
    np.testing.assert_array_equal(_add(vec, [5]), _add(q[5], [5]))


def test_unreadable_torch_objects_are_refused_by_name(tmp_path):
    torch.save({"note": "hello", "n": 3}, tmp_path / "x.pt")
    with pytest.raises(VectorFileError, match="expected a tensor"):
        load_layer_vectors(tmp_path / "x.pt")
