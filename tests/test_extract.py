"""Activation extraction: pooled per-class means against transformers' hidden_states (fp32),
8 simulated devices and 2 processes against 1, resume, CLI, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
from emgeo_jax.extract import (
    POOLS,
    ExtractSettings,
    ResumeError,
    extract,
    read_extraction,
    write_extraction,
)
from emgeo_jax.vectors.io import load_activations, load_vectors
from tests.cli_util import cpu_env
from tests.tiny_models import LLAMA, QWEN2, hf_forward, hf_model, save_hf_folder

ROOT = Path(__file__).resolve().parents[1]
NUM_PAIRS = 3


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first NUM_PAIRS shipped contrast pairs, as a file of their own."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = shipped_contrast_path().read_text().splitlines()[:NUM_PAIRS]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny(spec, tokenizer, folder: Path):
    """HF model with the chat tokenizer's vocabulary, saved with the tokenizer; our LM of it."""
    model = hf_model({**spec, "vocab_size": len(tokenizer)}, seed=3)
    save_hf_folder(model, folder)
    tokenizer.save_pretrained(str(folder))
    return model, emgeo_jax.load(folder), folder


@pytest.fixture(scope="module")
def llama(chat_tokenizer, tmp_path_factory):
    return _tiny(LLAMA, chat_tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenized(data_file, chat_tokenizer):
    examples, _ = load_examples(data_file)
    return tokenize_examples(examples, chat_tokenizer, max_length=512)[0]


def _block_outputs(model, tokenized) -> list[np.ndarray]:
    """transformers, one unpadded example at a time: block outputs `[L, T, D]` float64 (HF
    `hidden_states[l + 1]`, read by hooks on `model.layers[l]`, because transformers applies
    the final norm to the last `hidden_states` entry)."""
    out = []
    for ex in tokenized:
        _, resid, hidden = hf_forward(model, ex.input_ids[None], np.ones((1, ex.length), int))
        np.testing.assert_array_equal(resid[0, 0], hidden[1][0])  # the layer convention
        out.append(resid[:, 0].astype(np.float64))
    return out


@pytest.fixture(scope="module")
def llama_blocks(llama, tokenized):
    return _block_outputs(llama[0], tokenized)


def _reference(blocks, tokenized, pool: str, layers):
    """Per-example pooled rows [N, L, D] and per-class token- and example-weighted means."""
    d = blocks[0].shape[-1]
    rows, sums, counts = [], np.zeros((2, len(layers), d)), np.zeros(2)
    for ex, resid in zip(tokenized, blocks, strict=True):
        h = resid[list(layers)]
        mask = {
            "answer": ex.answer_mask,
            "question": ex.question_mask,
            "all": np.ones(ex.length, bool),
            "last_prompt": np.arange(ex.length) == ex.last_prompt_index,
        }[pool]
        rows.append(h[:, mask].mean(axis=1))
        sums[ex.label] += h[:, mask].sum(axis=1)
        counts[ex.label] += mask.sum()
    rows = np.stack(rows)
    labels = np.array([ex.label for ex in tokenized])
    token_means = sums / counts[:, None, None]
    example_means = np.stack([rows[labels == c].mean(axis=0) for c in (0, 1)])
    return rows, token_means, example_means


@pytest.mark.parametrize("pool", POOLS)
def test_means_match_transformers_hidden_states(llama, llama_blocks, tokenized, pool):
    model, lm, _ = llama
    layers = (0, 2)
    # batch 4 over 6 examples: empty padding rows in the last batch of a bucket
    settings = ExtractSettings(pool=pool, layers=layers, per_example=True, batch_size=4)
    res = extract(lm, tokenized, settings)
    rows, token_means, example_means = _reference(llama_blocks, tokenized, pool, layers)
    np.testing.assert_allclose(res.pooled, rows, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(res.example_index, np.arange(len(tokenized)))
    np.testing.assert_allclose(res.means("token"), token_means, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(res.means("example"), example_means, atol=2e-5, rtol=1e-5)
    assert res.example_count.tolist() == [NUM_PAIRS, NUM_PAIRS]
    if pool != "last_prompt":  # the two weightings differ (unequal token counts)
        assert not np.allclose(res.means("token"), res.means("example"), atol=1e-4)


def test_qwen2_answer_means_match_transformers(chat_tokenizer, tokenized, tmp_path):
    model, lm, _ = _tiny(QWEN2, chat_tokenizer, tmp_path)
    res = extract(lm, tokenized, ExtractSettings(batch_size=4))
    layers = tuple(range(QWEN2["num_hidden_layers"]))
    blocks = _block_outputs(model, tokenized)
    _, token_means, example_means = _reference(blocks, tokenized, "answer", layers)
    assert res.layers == layers
    np.testing.assert_allclose(res.means("token"), token_means, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(res.means("example"), example_means, atol=2e-5, rtol=1e-5)


# --- resume --------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _files(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for name in ("activations", "per_example"):
        out.update({f"{name}/{k}": v for k, v in load_file(folder / f"{name}.safetensors").items()})
    return out


def test_resume_after_interruption_gives_identical_outputs(llama, tokenized, tmp_path):
    _, lm, _ = llama
    settings = ExtractSettings(layers=(1, 2), per_example=True, batch_size=2, chunk_batches=1)
    meta = {"model": "tiny"}
    whole = extract(lm, tokenized, settings, tmp_path / "whole", metadata=meta)
    write_extraction(whole, tmp_path / "whole")

    def stop_after_chunk_1(c):
        if c == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(
            lm, tokenized, settings, tmp_path / "cut", metadata=meta, on_chunk=stop_after_chunk_1
        )
    assert sorted(p.name for p in (tmp_path / "cut" / "chunks").glob("*.safetensors")) == [
        "00000.safetensors",
        "00001.safetensors",
    ]
    # a crash while chunk 2 was being written leaves only its temporary file behind
    (tmp_path / "cut" / "chunks" / "00002.safetensors.tmp").write_bytes(b"partial")
    ran = []
    resumed = extract(lm, tokenized, settings, tmp_path / "cut", metadata=meta, on_chunk=ran.append)
    assert ran[0] == 2  # finished chunks were not recomputed
    write_extraction(resumed, tmp_path / "cut")
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    meta_a = json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert meta_a == json.loads((tmp_path / "cut" / "meta.json").read_text())
    # the per-example file is what load_activations and the geometry suite read
    pooled, label, _ = load_activations(tmp_path / "cut" / "per_example.safetensors")
    assert pooled.shape == (2 * NUM_PAIRS, 2, lm.config.hidden_size)
    np.testing.assert_array_equal(label, [ex.label for ex in tokenized])
    back = read_extraction(tmp_path / "cut")
    assert settings.pool == "answer"  # tokens pooled per example = its answer tokens
    np.testing.assert_array_equal(back.tokens, [ex.answer_mask.sum() for ex in tokenized])
    np.testing.assert_array_equal(back.means("example"), whole.means("example"))
    with pytest.raises(ResumeError, match="another run"):
        extract(lm, tokenized, dataclasses.replace(settings, pool="question"), tmp_path / "cut")


def test_bad_inputs_are_refused(llama, tokenized):
    _, lm, _ = llama
    with pytest.raises(ValueError, match="out of range|each must be in"):
        extract(lm, tokenized, ExtractSettings(layers=(3,)))
    with pytest.raises(ValueError, match="aligned .0. and misaligned"):
        extract(lm, [ex for ex in tokenized if ex.label == 1])
    with pytest.raises(ValueError, match="pool="):
        ExtractSettings(pool="answers")


# --- CLI, 8 devices, 2 processes -----------------------------------------------------------


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=check,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_on_8_devices_and_2_processes_match_one_device(llama, tokenized, data_file, tmp_path):
    _, lm, folder = llama
    common = ["--model", str(folder), "--data", str(data_file), "--per_example"]
    one = extract(lm, tokenized, ExtractSettings(per_example=True))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "emgeo_jax.cli", "extract", *common,
                "--out", str(tmp_path / "two"), "--batch_size", "4",
                "--coordinator_address", f"127.0.0.1:{port}",
                "--num_processes", "2", "--process_id", str(i),
            ],
            cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    eight = _cli(
        "extract", *common, "--out", str(tmp_path / "eight"), "--fsdp", "2", "--tensor", "2",
        env=cpu_env(8),
    )  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    for name, mesh, processes in (
        ("eight", {"data": 2, "fsdp": 2, "tensor": 2}, 1),
        ("two", {"data": 1, "fsdp": 2, "tensor": 1}, 2),  # several processes: --mesh auto
    ):
        got = read_extraction(tmp_path / name)
        assert got.metadata["mesh"] == mesh, eight.stderr[-2000:]
        assert got.metadata["process_count"] == processes
        for w in ("token", "example"):
            np.testing.assert_allclose(got.means(w), one.means(w), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got.token_count, one.token_count)
        np.testing.assert_allclose(got.pooled, one.pooled, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got.example_index, one.example_index)
    # vectors CLI on the result: PC1 per layer, sign agreeing with the mean-diff
    out = tmp_path / "pca.safetensors"
    _cli("vectors", "--activations", str(tmp_path / "eight"), "--method", "pca", "--out", str(out))
    vec, meta = load_vectors(out)
    mean_diff = one.means("token")[1] - one.means("token")[0]
    assert vec.shape == mean_diff.shape and meta["method"] == "pca"
    assert np.all(np.einsum("ld,ld->l", vec, mean_diff) > 0)
    assert meta["data_sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()


# meshes of 8 devices: parameters split over fsdp and tensor, not only the batch over data;
# the last two with batch sizes that data x fsdp does not divide (rows padded, not replicated)
SHARDED_MESHES = (
    ({"data": 8}, 8),
    ({"fsdp": 4, "tensor": 2}, 8),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
    ({"fsdp": 8}, 5),
    ({"data": 2, "fsdp": 4}, 3),
)


def _extract_on_meshes(folder: Path, data_file: Path, out: Path) -> None:
    """In a process with 8 devices: extract on each of `SHARDED_MESHES` with the parameters
    placed by the partition rules, and save the means and per-example rows to `out`."""
    import jax
    from flax import nnx

    from emgeo_jax.extract import place_params
    from emgeo_jax.parallel import make_mesh

    lm = emgeo_jax.load(folder)
    examples, _ = load_examples(data_file)
    tokenized = tokenize_examples(examples, lm.tokenizer, max_length=512)[0]
    saved = {}
    for i, (shape, batch_size) in enumerate(SHARDED_MESHES):
        mesh = make_mesh(shape)
        sharded = emgeo_jax.load(folder, mesh=mesh) if i == 3 else lm.on_mesh(mesh)
        assert sharded.mesh is mesh
        q = nnx.to_pure_dict(sharded.params)["layers"]["attn"]["q_proj"]["kernel"]
        per_device = q.shape[1] // mesh.shape["fsdp"], q.shape[2] // mesh.shape["tensor"]
        assert q.addressable_shards[0].data.shape[1:] == per_device, (shape, q.sharding)
        # params loaded onto the mesh are used where they are, never copied
        same = jax.tree.leaves(place_params(sharded.params, mesh))
        assert all(a is b for a, b in zip(same, jax.tree.leaves(sharded.params), strict=True))
        settings = ExtractSettings(per_example=True, batch_size=batch_size)
        res = extract(sharded, tokenized, settings)
        assert res.metadata["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, **shape}
        saved[f"{i}/token"], saved[f"{i}/example"] = res.means("token"), res.means("example")
        saved[f"{i}/pooled"], saved[f"{i}/devices"] = res.pooled, np.int64(jax.device_count())
    np.savez(out, **saved)


def test_parameters_sharded_over_fsdp_and_tensor_give_one_device_means(
    llama, tokenized, data_file, tmp_path
):
    _, lm, folder = llama
    one = extract(lm, tokenized, ExtractSettings(per_example=True))
    out = tmp_path / "meshes.npz"
    run = subprocess.run(
        [sys.executable, "-m", "tests.test_extract", str(folder), str(data_file), str(out)],
        cwd=ROOT, env=cpu_env(8), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(out)
    for i, (shape, _) in enumerate(SHARDED_MESHES):
        assert got[f"{i}/devices"] == 8
        for w in ("token", "example"):
            np.testing.assert_allclose(
                got[f"{i}/{w}"], one.means(w), atol=1e-5, rtol=1e-5, err_msg=str(shape)
            )
        np.testing.assert_allclose(got[f"{i}/pooled"], one.pooled, atol=1e-5, rtol=1e-5)


def test_cli_corrupt_line_is_named(llama, data_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"id": "x", "question": ', lines[2]]) + "\n")
    res = _cli(
        "extract",
        "--model",
        str(llama[2]),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert res.returncode != 0
    assert f"{bad}:3" in res.stderr


# --- the embedded default model ------------------------------------------------------------


def test_default_model_means_match_transformers(default_lm, hf_default, data_file):
    examples, _ = load_examples(data_file)
    tokenized = tokenize_examples(examples[:4], default_lm.tokenizer, max_length=512)[0]
    layers = (0, 14, 29)
    res = extract(default_lm, tokenized, ExtractSettings(layers=layers, batch_size=4))
    blocks = _block_outputs(hf_default, tokenized)
    _, token_means, example_means = _reference(blocks, tokenized, "answer", layers)
    for got, want in ((res.means("token"), token_means), (res.means("example"), example_means)):
        scale = np.abs(want).max(axis=-1, keepdims=True)
        assert np.max(np.abs(got - want) / scale) < 1e-4


if __name__ == "__main__":  # the 8-device side of the sharded test
    _extract_on_meshes(*(Path(a) for a in sys.argv[1:4]))
