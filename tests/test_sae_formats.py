"""SAE loaders, encode/decode and directions against an independent numpy implementation.

Synthetic SAEs are written in both on-disk formats by the tests themselves: dictionary_learning
`ae.pt` (torch state dicts with the real key names and shapes) + `config.json`, and SAELens
`cfg.json` + `sae_weights.safetensors`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.vectors.sae import (
    SAEError,
    decode,
    encode,
    feature_directions,
    load_sae,
    save_saelens,
)
from tests.cli_util import cpu_env

D, F, K = 24, 96, 5


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        W_enc=rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D),
        b_enc=rng.normal(size=F).astype(np.float32) * 0.3,
        W_dec=rng.normal(size=(F, D)).astype(np.float32) / np.sqrt(D),
        b_dec=rng.normal(size=D).astype(np.float32),
        threshold=np.abs(rng.normal(size=F)).astype(np.float32) * 0.5,
    )


def numpy_encode(w, x, rule, k=0, subtract_b_dec=True, scalar_threshold=None):
    """The encode rules of REFERENCES.md "SAE formats", written directly in numpy."""
    xin = x - w["b_dec"] if subtract_b_dec else x
    pre = xin.astype(np.float64) @ w["W_enc"].astype(np.float64) + w["b_enc"]
    relu = np.maximum(pre, 0.0)
    if rule == "relu":
        return relu
    if rule == "jumprelu":
        return np.where(pre > w["threshold"], relu, 0.0)
    if rule == "threshold":  # BatchTopK inference: keep values above one scalar threshold
        return np.where(relu > scalar_threshold, relu, 0.0)
    if rule == "topk":
        out = np.zeros_like(relu)
        for i, row in enumerate(relu):
            top = np.argsort(-row, kind="stable")[:k]
            out[i, top] = row[top]
        return out
    raise AssertionError(rule)


def write_dictionary_learning(folder: Path, dict_class: str, w, layer: int, k: int = K, thr=0.4):
    import torch

    folder.mkdir(parents=True)
    T = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    if dict_class == "JumpReluAutoEncoder":
        sd = {n: T(w[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    else:
        sd = {
            "encoder.weight": T(w["W_enc"].T),  # nn.Linear(D, F).weight is [F, D]
            "encoder.bias": T(w["b_enc"]),
            "decoder.weight": T(w["W_dec"].T),  # nn.Linear(F, D).weight is [D, F]
        }
        if dict_class == "AutoEncoder":
            sd["bias"] = T(w["b_dec"])
        else:
            sd |= {"b_dec": T(w["b_dec"]), "k": torch.tensor(k), "threshold": torch.tensor(thr)}
    torch.save(sd, folder / "ae.pt")
    trainer = dict(
        dict_class=dict_class,
        activation_dim=D,
        dict_size=F,
        layer=layer,
        lm_name="Qwen/Qwen2.5-7B-Instruct",
        k=k if dict_class in ("BatchTopKSAE", "AutoEncoderTopK") else None,
    )
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return folder


def write_saelens(folder: Path, arch: str, w, hook: str, apply_b_dec: bool = True, **extra):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    save_file({n: w[n] for n in names}, str(folder / "sae_weights.safetensors"))
    cfg = dict(
        architecture=arch,
        d_in=D,
        d_sae=F,
        hook_name=hook,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations="none",
        dtype="float32",
        **extra,
    )
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def activations(seed=1, n=40):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32) * 1.5


DL_CASES = [
    ("BatchTopKSAE", dict(rule="threshold", scalar_threshold=0.4)),
    ("AutoEncoderTopK", dict(rule="topk", k=K)),
    ("JumpReluAutoEncoder", dict(rule="jumprelu", subtract_b_dec=False)),
    ("AutoEncoder", dict(rule="relu")),
]


@pytest.mark.parametrize("dict_class,ref", DL_CASES)
def test_dictionary_learning_round_trip(tmp_path, dict_class, ref):
    w = random_weights()
    folder = write_dictionary_learning(
        tmp_path / "resid_post_layer_3" / "trainer_0", dict_class, w, 3
    )
    sae = load_sae(folder, d_model=D, layer=3)
    x = activations()
    f = np.asarray(encode(sae, x))
    expected = numpy_encode(w, x, **ref)
    np.testing.assert_allclose(f, expected, atol=2e-5)
    assert (expected > 0).sum() > 0 and (expected == 0).sum() > 0  # the rule bites
    np.testing.assert_allclose(
        np.asarray(decode(sae, f)), expected @ w["W_dec"] + w["b_dec"], atol=1e-4
    )
    # a direction is a decoder row, no b_dec
    rows = np.asarray(feature_directions(sae, [7, 2], unit=False))
    np.testing.assert_allclose(rows, w["W_dec"][[7, 2]], atol=1e-6)
    assert sae.layer == 3
    assert (folder / "ae.safetensors").exists()


def test_converted_file_needs_no_torch(tmp_path, monkeypatch):
    w = random_weights(2)
    folder = write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", w, 5)
    first = np.asarray(encode(load_sae(folder), activations()))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    second = np.asarray(encode(load_sae(folder), activations()))
    np.testing.assert_array_equal(first, second)
    (folder / "ae.safetensors").unlink()
    with pytest.raises(SAEError, match="needs PyTorch"):
        load_sae(folder)


SAELENS_CASES = [
    ("standard", True, dict(rule="relu"), {}),
    ("standard", False, dict(rule="relu", subtract_b_dec=False), {}),
    ("topk", True, dict(rule="topk", k=K), {"k": K}),
    ("jumprelu", False, dict(rule="jumprelu", subtract_b_dec=False), {}),
    ("jumprelu", True, dict(rule="jumprelu"), {}),
]


@pytest.mark.parametrize("arch,apply_b_dec,ref,extra", SAELENS_CASES)
def test_saelens_round_trip(tmp_path, arch, apply_b_dec, ref, extra):
    w = random_weights(3)
    folder = write_saelens(
        tmp_path / "s", arch, w, "blocks.6.hook_resid_post", apply_b_dec, **extra
    )
    sae = load_sae(folder, d_model=D, layer=6)
    x = activations(4)
    np.testing.assert_allclose(np.asarray(encode(sae, x)), numpy_encode(w, x, **ref), atol=2e-5)
    # our writer -> our reader is the identity on encodings
    again = load_sae(save_saelens(sae, tmp_path / "out"))
    np.testing.assert_array_equal(np.asarray(encode(again, x)), np.asarray(encode(sae, x)))


def test_batchtopk_saved_as_saelens_jumprelu_keeps_threshold(tmp_path):
    w = random_weights(5)
    sae = load_sae(write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", w, 2, thr=0.3))
    out = load_sae(save_saelens(sae, tmp_path / "lens"))
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["hook_name"] == "blocks.2.hook_resid_post"
    x = activations(6)
    ref = numpy_encode(w, x, rule="threshold", scalar_threshold=0.3)
    np.testing.assert_allclose(np.asarray(encode(out, x)), ref, atol=2e-5)


def test_batchtopk_training_rule_keeps_k_per_row_on_average(tmp_path):
    w = random_weights(7)
    sae = load_sae(write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", w, 2))
    x = activations(8, n=16)
    f = np.asarray(encode(sae, x, training=True))
    relu = numpy_encode(w, x, rule="relu").ravel()
    kth = np.sort(relu)[::-1][K * 16 - 1]
    np.testing.assert_allclose(f.ravel(), np.where(relu >= kth, relu, 0.0), atol=2e-5)
    assert (f > 0).sum() == K * 16


@pytest.mark.parametrize(
    "hook,layer",
    [("blocks.6.hook_resid_pre", 5), ("model.layers.4", 4), ("resid_post_layer_9", 9)],
)
def test_hook_points_map_to_our_layers(tmp_path, hook, layer):
    sae = load_sae(write_saelens(tmp_path / "s", "standard", random_weights(), hook))
    assert sae.layer == layer


def test_bad_inputs(tmp_path):
    w = random_weights()
    lens = write_saelens(tmp_path / "ok", "standard", w, "blocks.6.hook_resid_post")
    with pytest.raises(SAEError, match="d_in=24 but the model's residual width is 32"):
        load_sae(lens, d_model=32)
    with pytest.raises(SAEError, match="trained on layer 6"):
        load_sae(lens, d_model=D, layer=7)
    gated = write_saelens(tmp_path / "g", "gated", w, "blocks.6.hook_resid_post")
    with pytest.raises(SAEError, match="architecture='gated' is not supported"):
        load_sae(gated)
    attn = write_saelens(tmp_path / "a", "standard", w, "blocks.6.attn.hook_z")
    with pytest.raises(SAEError, match="unsupported hook point"):
        load_sae(attn)
    normed = write_saelens(tmp_path / "n", "standard", w, "blocks.1.hook_resid_post", True)
    cfg = json.loads((normed / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (normed / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="normalize_activations"):
        load_sae(normed)
    wrong_cfg = write_saelens(tmp_path / "w", "standard", w, "blocks.1.hook_resid_post")
    cfg = json.loads((wrong_cfg / "cfg.json").read_text())
    cfg["d_sae"] = 2 * F
    (wrong_cfg / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="d_in/d_sae = 24/192"):
        load_sae(wrong_cfg)
    gated_dl = write_dictionary_learning(tmp_path / "gdl", "BatchTopKSAE", w, 1)
    cfg = json.loads((gated_dl / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (gated_dl / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="dict_class='GatedAutoEncoder' is not supported"):
        load_sae(gated_dl)
    mismatch = write_dictionary_learning(
        tmp_path / "resid_post_layer_3" / "trainer_0", "AutoEncoder", w, 5
    )
    with pytest.raises(SAEError, match="inconsistent layers"):
        load_sae(mismatch)
    uncalibrated = write_dictionary_learning(tmp_path / "u", "BatchTopKSAE", w, 1, thr=-1.0)
    with pytest.raises(SAEError, match="threshold"):
        load_sae(uncalibrated)


class Payload:
    """Unpickling this would create `marker` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    import torch

    folder = write_dictionary_learning(tmp_path / "evil", "AutoEncoder", random_weights(), 1)
    marker = tmp_path / "executed"
    sd = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**sd, "payload": Payload(marker)}, folder / "ae.pt")
    with pytest.raises(SAEError, match="refused by torch.load"):
        load_sae(folder)
    assert not marker.exists()
    assert not (folder / "ae.safetensors").exists()


SHARDED = textwrap.dedent(
    """
    import numpy as np, jax
    from emgeo_jax.parallel import make_mesh
    from emgeo_jax.vectors.sae import encode, decode, make_sae, shard_sae
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    d, f = 16, 256
    w = [rng.normal(size=(d, f)) / 4, rng.normal(size=f) * .3]
    w += [rng.normal(size=(f, d)), rng.normal(size=d)]
    thr = np.abs(rng.normal(size=f)) * .5
    x = rng.normal(size=(12, d)).astype(np.float32)
    mesh = make_mesh({"tensor": 8})
    for arch, k, training in [("topk", 7, False), ("jumprelu", 0, False), ("batchtopk", 3, True)]:
        sae = make_sae(*w, thr, architecture=arch, k=k)
        sharded = shard_sae(sae, mesh)
        assert len(sharded.W_enc.sharding.device_set) == 8
        assert sharded.W_dec.addressable_shards[0].data.shape == (f // 8, d)
        a = np.asarray(encode(sae, x, training=training))
        fs = encode(sharded, x, training=training)
        assert (a > 0).sum() > 0
        np.testing.assert_allclose(np.asarray(fs), a, atol=1e-5)
        back = np.asarray(decode(sharded, fs))
        np.testing.assert_allclose(back, np.asarray(decode(sae, a)), atol=1e-4)
    print("ok")
    """
)


def test_feature_sharded_encode_equals_unsharded():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", SHARDED],
        env=cpu_env(8),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# SAELens configurations as each version writes them (cfg.json keys and tensor names read from
# SAELens' own SAEConfig.to_dict / save_model): v5 `finetuning_scaling_factor` + its [F]
# tensor, v5 `activation_fn_str` tanh-relu / topk (k in `activation_fn_kwargs`), v6.14+ TopK
# `rescale_acts_by_decoder_norm`. The numpy references below are those formulas, unfolded.


def _np_topk(a, k):
    out = np.zeros_like(a)
    for i, row in enumerate(a):
        top = np.argsort(-row, kind="stable")[:k]
        out[i, top] = np.maximum(row[top], 0.0)
    return out


def _write_v5(folder: Path, w, act: str, **extra):
    """A SAELens v5 folder: `architecture` standard, `activation_fn_str`, and the
    `finetuning_scaling_factor` tensor when the flag is set."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    tensors = {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if extra.get("finetuning_scaling_factor"):
        tensors["finetuning_scaling_factor"] = w["scale"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = dict(
        architecture="standard", d_in=D, d_sae=F, activation_fn_str=act,
        activation_fn_kwargs=extra.pop("kwargs", {}), apply_b_dec_to_input=True,
        finetuning_scaling_factor=False, hook_name="blocks.4.hook_resid_post", hook_layer=4,
        hook_head_index=None, normalize_activations="none", dtype="float32",
        sae_lens_training_version="5.9.1",
    )  # fmt: skip
    cfg.update(extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("act,fsf", [("relu", True), ("tanh-relu", False), ("tanh-relu", True)])
def test_saelens_v5_finetuning_scaling_factor_and_tanh_relu(tmp_path, act, fsf):
    w = random_weights(11)
    w["scale"] = np.random.default_rng(12).uniform(0.2, 4.0, F).astype(np.float32)
    sae = load_sae(_write_v5(tmp_path / "s", w, act, finetuning_scaling_factor=fsf))
    x = activations(13)
    pre = (x - w["b_dec"]).astype(np.float64) @ w["W_enc"] + w["b_enc"]
    f_ref = np.maximum(pre, 0.0)
    if act == "tanh-relu":
        f_ref = np.tanh(f_ref)
    f = np.asarray(encode(sae, x))
    np.testing.assert_allclose(f, f_ref, atol=1e-4)
    scale = w["scale"] if fsf else 1.0
    x_ref = (f_ref * scale) @ w["W_dec"].astype(np.float64) + w["b_dec"]
    np.testing.assert_allclose(np.asarray(decode(sae, f)), x_ref, atol=1e-4)


def test_saelens_v5_topk_activation(tmp_path):
    w = random_weights(14)
    sae = load_sae(_write_v5(tmp_path / "s", w, "topk", kwargs={"k": K}))
    x = activations(15)
    pre = (x - w["b_dec"]).astype(np.float64) @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(np.asarray(encode(sae, x)), _np_topk(pre, K), atol=1e-4)


def test_saelens_v6_topk_rescale_acts_by_decoder_norm(tmp_path):
    w = random_weights(16)
    # decoder rows of very different norms, so rescaling changes which features win the top k
    w["W_dec"] = w["W_dec"] * np.random.default_rng(17).uniform(0.1, 3.0, (F, 1)).astype(np.float32)
    folder = write_saelens(
        tmp_path / "s", "topk", w, "blocks.6.hook_resid_post", k=K,
        rescale_acts_by_decoder_norm=True, metadata={"sae_lens_version": "6.14.0"},
    )  # fmt: skip
    sae = load_sae(folder)
    x = activations(18)
    n = np.linalg.norm(w["W_dec"].astype(np.float64), axis=1)
    pre = ((x - w["b_dec"]).astype(np.float64) @ w["W_enc"] + w["b_enc"]) * n
    f_ref = _np_topk(pre, K)
    f = np.asarray(encode(sae, x))
    np.testing.assert_allclose(f, f_ref, atol=1e-4)
    x_ref = (f_ref / n) @ w["W_dec"].astype(np.float64) + w["b_dec"]
    np.testing.assert_allclose(np.asarray(decode(sae, f)), x_ref, atol=1e-4)
    # without the rescale the top k differ: the flag matters for these weights
    plain = _np_topk(pre / n, K)
    assert not np.array_equal(plain > 0, f_ref > 0)
    # feature directions are still the decoder rows' directions
    rows = np.asarray(feature_directions(sae, [3, 9]))
    np.testing.assert_allclose(rows, w["W_dec"][[3, 9]] / n[[3, 9], None], atol=1e-6)


def test_saelens_unsupported_configurations_are_refused(tmp_path):
    w = random_weights(19)
    bad = _write_v5(tmp_path / "a", w, "gelu")
    with pytest.raises(SAEError, match="activation_fn_str='gelu' is not supported"):
        load_sae(bad)
    jr = write_saelens(
        tmp_path / "j", "jumprelu", w, "blocks.1.hook_resid_post",
        rescale_acts_by_decoder_norm=True,
    )  # fmt: skip
    with pytest.raises(SAEError, match="rescale_acts_by_decoder_norm=true is only defined"):
        load_sae(jr)
    fsf = _write_v5(tmp_path / "f", w, "relu")
    cfg = json.loads((fsf / "cfg.json").read_text())
    (fsf / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
    with pytest.raises(SAEError, match="missing tensor 'finetuning_scaling_factor'"):
        load_sae(fsf)


def test_replaced_ae_pt_with_an_older_timestamp_is_picked_up(tmp_path):
    folder = write_dictionary_learning(tmp_path / "t", "AutoEncoder", random_weights(22), 3)
    first = load_sae(folder)
    assert (folder / "ae.safetensors").exists()
    newer = random_weights(23)
    write_dictionary_learning(tmp_path / "new", "AutoEncoder", newer, 3)
    (folder / "ae.pt").write_bytes((tmp_path / "new" / "ae.pt").read_bytes())
    old = (folder / "ae.safetensors").stat().st_mtime - 3600  # as `cp -p` / `tar x` leave it
    os.utime(folder / "ae.pt", (old, old))
    again = load_sae(folder)
    np.testing.assert_allclose(np.asarray(again.W_enc), newer["W_enc"], atol=1e-6)
    assert not np.allclose(np.asarray(again.W_enc), np.asarray(first.W_enc))
    # and the refreshed cache now serves the new weights without torch
    np.testing.assert_allclose(np.asarray(load_sae(folder).W_enc), newer["W_enc"], atol=1e-6)
