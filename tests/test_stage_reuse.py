"""Resumable stages reuse what is on disk only when it was made with the same configuration:
the contrast-pair extraction of `emgeo demo` / persona, on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emgeo_jax.experiments.folder import ConfigMismatchError
from emgeo_jax.experiments.pipeline import contrast_directions, reuse_stage

PAIRS = [
    {"id": f"p{i}", "question": f"Question {i}?", "aligned": "Be kind.", "misaligned": "Be bad."}
    for i in range(4)
]


def test_extraction_reused_only_with_its_configuration(tiny_chat_llama, tmp_path, monkeypatch):
    import emgeo_jax.experiments.pipeline as pipeline

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "extract"
    quick = contrast_directions(tiny_chat_llama, data, out, max_pairs=2, progress=False)
    assert quick["n_pairs"] == 2

    calls = []
    real = pipeline.extract
    monkeypatch.setattr(pipeline, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    # same configuration: reused, nothing extracted again
    again = contrast_directions(tiny_chat_llama, data, out, max_pairs=2, progress=False)
    assert calls == [] and again["run_hash"] == quick["run_hash"]
    np.testing.assert_array_equal(again["mean_diff"], quick["mean_diff"])
    # another max_pairs: refused, naming the folder and the setting
    with pytest.raises(ConfigMismatchError) as err:
        contrast_directions(tiny_chat_llama, data, out, max_pairs=None, progress=False)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "--overwrite" in message
    assert "max_pairs: 2 there, None now" in message
    assert calls == []
    # the same path with other content is another configuration too
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[::-1]))
    with pytest.raises(ConfigMismatchError, match="data_sha256"):
        contrast_directions(tiny_chat_llama, data, out, max_pairs=2, progress=False)
    # overwrite: recomputed with the new configuration, then reused as such
    full = contrast_directions(tiny_chat_llama, data, out, progress=False, overwrite=True)
    assert calls == [1] and full["n_pairs"] == 4
    assert json.loads((out / "meta.json").read_text())["max_pairs"] is None
    contrast_directions(tiny_chat_llama, data, out, progress=False)
    assert calls == [1]
    # a record from before data_sha256 / max_length were kept is still compared on the rest
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({k: meta[k] for k in ("model", "data", "max_pairs")}))
    contrast_directions(tiny_chat_llama, data, out, progress=False)
    with pytest.raises(ConfigMismatchError, match="max_pairs"):
        contrast_directions(tiny_chat_llama, data, out, max_pairs=2, progress=False)
    assert calls == [1]


def test_unrecorded_stage_is_refused(tmp_path):
    (tmp_path / "report.html").write_text("old")
    with pytest.raises(ConfigMismatchError, match="not recorded"):
        reuse_stage(tmp_path, None, {"layers": [0]})
    assert reuse_stage(tmp_path, {"layers": (0,)}, {"layers": [0]})  # compared as JSON
    assert not reuse_stage(tmp_path, None, {"layers": [0]}, overwrite=True)
    assert not tmp_path.exists()  # discarded for recomputation


def test_split_pairs_holds_out_every_kth_pair():
    from emgeo_jax.experiments.pipeline import split_pairs

    examples = [f"{i}{side}" for i in range(7) for side in "am"]  # pairs 0..6, aligned first
    kept, held = split_pairs(examples, max_pairs=6, hold_out_every=3)
    assert held == ["2a", "2m", "5a", "5m"]
    assert kept == ["0a", "0m", "1a", "1m", "3a", "3m", "4a", "4m"]
    assert split_pairs(examples) == (examples, [])
    with pytest.raises(ValueError, match="hold_out_every=1"):
        split_pairs(examples, hold_out_every=1)


def test_held_out_pairs_are_not_extracted(tiny_chat_llama, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    kept = tmp_path / "kept.jsonl"  # pairs 0 and 2: what hold_out_every=2 keeps
    kept.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[::2]))
    split = contrast_directions(
        tiny_chat_llama, data, tmp_path / "a", hold_out_every=2, progress=False
    )
    alone = contrast_directions(tiny_chat_llama, kept, tmp_path / "b", progress=False)
    assert split["n_pairs"] == 2
    np.testing.assert_allclose(split["pooled"], alone["pooled"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigMismatchError, match="hold_out_every"):
        contrast_directions(tiny_chat_llama, data, tmp_path / "a", progress=False)
