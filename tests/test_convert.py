"""Checkpoints, meshes, PEFT merges and bad inputs of the conversion path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import emgeo_jax
from emgeo_jax.convert.checkpoint import is_checkpoint, save_checkpoint
from tests.cli_util import cpu_env
from tests.tiny_models import LLAMA, QWEN2, hf_forward, hf_model, padded_batch, save_hf_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = hf_model(LLAMA, seed=5)
    return model, save_hf_folder(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return save_hf_folder(hf_model(QWEN2, seed=6), tmp_path_factory.mktemp("qwen2"))


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- orbax checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_is_bit_exact(qwen_folder, tmp_path, dtype):
    lm = emgeo_jax.load(qwen_folder, dtype=dtype)
    save_checkpoint(lm, tmp_path / "ckpt")
    back = emgeo_jax.load(tmp_path / "ckpt")
    assert back.config == lm.config and back.dtype == lm.dtype
    for a, b in zip(
        __import__("jax").tree.leaves(lm.params),
        __import__("jax").tree.leaves(back.params),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_refuses_to_overwrite_and_never_looks_complete_when_interrupted(
    qwen_folder, tmp_path, monkeypatch
):
    lm = emgeo_jax.load(qwen_folder)
    save_checkpoint(lm, tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(lm, tmp_path / "a")

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr("emgeo_jax.convert.checkpoint.ModelConfig.to_json", fail)
    with pytest.raises(Boom):
        save_checkpoint(lm, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert not any(is_checkpoint(p) for p in tmp_path.iterdir() if p.name.startswith("b."))
    # a failed conversion removes its partial folder (runs.atomic_folder): nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("b")]


def test_restore_onto_8_device_mesh_matches_one_device(llama, tmp_path):
    _, folder = llama
    lm = emgeo_jax.load(folder)
    save_checkpoint(lm, tmp_path / "ckpt")
    ids, mask = padded_batch(LLAMA["vocab_size"], [8, 5, 8, 3, 8, 6, 2, 8], seed=4)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    script = textwrap.dedent(
        f"""
        import numpy as np, jax
        import emgeo_jax
        from emgeo_jax.parallel import make_mesh
        assert jax.device_count() == 8, jax.devices()
        mesh = make_mesh({{"fsdp": 2, "tensor": 4}})
        lm = emgeo_jax.load({str(tmp_path / "ckpt")!r}, mesh=mesh)
        q = lm.params["layers"]["attn"]["q_proj"]["kernel"][...]
        assert not q.sharding.is_fully_replicated, q.sharding
        assert len(q.addressable_shards) == 8
        ids = np.load({str(tmp_path / "ids.npy")!r})
        out = lm.forward(ids, np.load({str(tmp_path / "mask.npy")!r}))
        np.save({str(tmp_path / "mesh_logits.npy")!r}, np.asarray(out.logits))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=cpu_env(8), cwd=ROOT)
    one = np.asarray(lm.forward(ids, mask).logits)
    np.testing.assert_allclose(np.load(tmp_path / "mesh_logits.npy"), one, atol=1e-5, rtol=0)


# --- PEFT LoRA merge ---------------------------------------------------------------------


def write_adapter(folder: Path, model, targets, r, alpha, rslora, seed=0, layers=None):
    """A PEFT-format adapter folder and the HF weight deltas it stands for."""
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    scale = alpha / (r**0.5 if rslora else r)
    for name, w in model.state_dict().items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(t) for t in targets) or not name.endswith(".weight"):
            continue
        if layers is not None and not any(f"layers.{i}." in name for i in layers):
            continue
        a = torch.randn(r, w.shape[1], generator=gen) * 0.1
        b = torch.randn(w.shape[0], r, generator=gen) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[name] = scale * (b @ a)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = dict(
        peft_type="LORA",
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=list(targets),
        fan_in_fan_out=False,
        use_dora=False,
        bias="none",
    )
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return deltas


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_merge_matches_merged_torch_weights(llama, tmp_path, rslora):
    model, folder = llama
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    deltas = write_adapter(tmp_path / "adapter", model, targets, r=4, alpha=8, rslora=rslora)
    merged = hf_model(LLAMA, seed=5)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name in deltas:
                p.add_(deltas[name])
    ids, mask = padded_batch(LLAMA["vocab_size"], [6, 9], seed=7)
    ref_logits, ref_resid, _ = hf_forward(merged, ids, mask)
    out = emgeo_jax.load(folder, adapter=tmp_path / "adapter").forward(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(out.resid_post)[:, real], ref_resid[:, real], atol=1e-4, rtol=0
    )
    base = np.asarray(emgeo_jax.load(folder).forward(ids, mask).logits)
    assert np.abs(base - np.asarray(out.logits))[real].max() > 1e-2  # the adapter did something


def test_peft_merge_on_a_bfloat16_base_is_not_rounded_to_bfloat16(llama, tmp_path):
    """Model organisms ship bf16 bases. Loaded in float32, the merged kernel is the bf16
    weight upcast plus the float32 delta (what PEFT gives on an upcast base), not that sum
    rounded back to bf16, which loses most of a delta 100x smaller than the weights."""
    model, _ = llama
    folder = save_hf_folder(hf_model(LLAMA, seed=5).to(torch.bfloat16), tmp_path / "bf16")
    deltas = write_adapter(tmp_path / "adapter", model, ("q_proj",), r=2, alpha=2e-3, rslora=False)
    lm = emgeo_jax.load(folder, adapter=tmp_path / "adapter", dtype="float32")
    kernel = np.asarray(lm.params["layers"]["attn"]["q_proj"]["kernel"][...])  # [L, in, out]
    base = load_file(str(folder / "model.safetensors"))
    for layer in range(LLAMA["num_hidden_layers"]):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        expected = base[name].float() + deltas[name]
        assert base[name].dtype == torch.bfloat16 and deltas[name].abs().max() > 0
        np.testing.assert_allclose(kernel[layer], expected.numpy().T, atol=1e-7, rtol=0)


def test_peft_adapter_for_another_architecture_is_refused(llama, qwen_folder, tmp_path):
    model, folder = llama
    write_adapter(tmp_path / "adapter", model, ("q_proj",), r=2, alpha=4, rslora=False)
    with pytest.raises(emgeo_jax.CheckpointError, match=r"adapter.*q_proj"):
        emgeo_jax.load(qwen_folder, adapter=tmp_path / "adapter")


# --- bad inputs --------------------------------------------------------------------------


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral"}, r"config.json: model_type='mistral' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(llama, tmp_path, changes, message):
    folder = copy_folder(llama[1], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(emgeo_jax.ConfigError, match=message):
        emgeo_jax.load(folder)


def rewrite_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_file_and_tensor(llama, tmp_path):
    folder = copy_folder(llama[1], tmp_path / "m")
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        emgeo_jax.CheckpointError,
        match=r"model.safetensors: missing tensor "
        r"model.layers.1.mlp.up_proj.weight",
    ):
        emgeo_jax.load(folder)


def test_wrong_shape_names_file_and_tensor(llama, tmp_path):
    folder = copy_folder(llama[1], tmp_path / "m")
    key = "model.layers.2.self_attn.k_proj.weight"
    rewrite_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(3, 64)))
    with pytest.raises(
        emgeo_jax.CheckpointError,
        match=rf"model.safetensors: tensor {key} has "
        r"shape \(3, 64\), expected \(32, 64\)",
    ):
        emgeo_jax.load(folder)


def test_truncated_safetensors_names_the_file(llama, tmp_path):
    folder = copy_folder(llama[1], tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(emgeo_jax.CheckpointError, match=r"model.safetensors"):
        emgeo_jax.load(folder)


def test_convert_cli_writes_a_checkpoint(qwen_folder, tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "emgeo_jax.cli",
            "convert",
            str(qwen_folder),
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ],
        check=True,
        cwd=ROOT,
    )
    assert is_checkpoint(out)
    assert emgeo_jax.load(out).dtype == np.dtype("bfloat16")
    assert "adapter" not in json.loads((out / "meta.json").read_text())


def test_convert_with_adapter_records_it_in_meta_and_the_summary(llama, tmp_path):
    """Issue #20 item 10: the checkpoint says which adapter was merged (path, rank, alpha,
    rsLoRA, a digest of its weights and config), and so does the command's summary line."""
    import hashlib

    model, folder = llama
    write_adapter(tmp_path / "adapter", model, ("down_proj",), r=2, alpha=16, rslora=True)
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "emgeo_jax.cli", "convert", str(folder), "--out", str(out)]
    cmd += ["--adapter", str(tmp_path / "adapter")]
    res = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    meta = json.loads((out / "meta.json").read_text())["adapter"]
    sha = [
        hashlib.sha256((tmp_path / "adapter" / name).read_bytes()).hexdigest()
        for name in ("adapter_model.safetensors", "adapter_config.json")
    ]
    digest = hashlib.sha256("".join(sha).encode()).hexdigest()
    assert meta["path"] == str((tmp_path / "adapter").absolute())
    assert (meta["rank"], meta["alpha"], meta["use_rslora"]) == (2, 16.0, True)
    assert meta["weights"] == LLAMA["num_hidden_layers"] and meta["sha256"] == digest
    summary = res.stdout.strip().splitlines()[-1]
    assert f"merged adapter {tmp_path / 'adapter'}" in summary, summary
    assert "r=2, alpha=16, rsLoRA yes, 3 weights" in summary and digest[:12] in summary
