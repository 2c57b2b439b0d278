"""`emgeo_jax.runs`: atomic files, JSONL, recorded settings and the one `SettingsMismatch`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax import runs
from emgeo_jax.runs import SettingsMismatch

ROOT = Path(__file__).resolve().parents[1]


class FileError(ValueError):
    """A caller's own error type (as `VectorFileError`, `SAEError`)."""


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    runs.write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), runs.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert _leftovers(path.parent) == []
    runs.write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    runs.write_bytes_atomic(path, "é")
    assert path.read_text(encoding="utf-8") == "é"


def test_safetensors_round_trip_is_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "v.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([3], np.int64)}
    runs.save_safetensors_atomic(path, tensors, {"layers": [1, 2], "model": "m"})
    plain = load_file(str(path))  # independent reader
    for k, v in tensors.items():
        np.testing.assert_array_equal(plain[k], v)
        assert plain[k].dtype == v.dtype
    back, meta = runs.read_safetensors(path)
    assert meta == {"layers": [1, 2], "model": "m"} and set(back) == {"a", "n"}
    with pytest.raises(ValueError, match="no tensors"):
        runs.save_safetensors_atomic(tmp_path / "e.safetensors", {})
    with pytest.raises(ValueError, match=r"missing\.safetensors: no such file"):
        runs.read_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileError, match=r"bad\.safetensors: not a readable"):
        runs.read_safetensors(tmp_path / "bad.safetensors", error=FileError)
    assert _leftovers(tmp_path) == []


def test_atomic_folder(tmp_path):
    folder = tmp_path / "ckpt"
    with runs.atomic_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    assert (folder / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="ckpt exists"), runs.atomic_folder(folder):
        pass
    with pytest.raises(RuntimeError), runs.atomic_folder(folder, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["a"]
    with runs.atomic_folder(folder, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]


def test_jsonl_read_append_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    runs.write_jsonl_atomic(path, [{"q": "é"}])
    assert "é" in path.read_text(encoding="utf-8")  # not ASCII-escaped
    runs.append_jsonl(path, [{"i": 1}, {"i": 2}])
    with path.open("a") as f:
        f.write("\n")
    assert runs.read_jsonl(path) == [{"q": "é"}, {"i": 1}, {"i": 2}]
    assert [n for n, _ in runs.iter_jsonl(path)] == [1, 2, 3]
    path.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected a JSON object"):
        runs.read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(FileError, match=r"rows\.jsonl:3: invalid JSON"):
        list(runs.iter_jsonl(path, FileError))


def test_mismatch_names_the_place_and_every_differing_setting(tmp_path):
    then = {"model": "a", "sampling": {"samples": 10, "seed": 0}, "layers": (1, 2)}
    now = {"model": "b", "sampling": {"samples": 2, "seed": 0}, "layers": [1, 2]}
    assert runs.mismatch(tmp_path, then, then) is None
    assert runs.mismatch(tmp_path, then, {**then, "layers": [1, 2]}) is None  # JSON-equal
    err = runs.mismatch(tmp_path, then, now, what="a run", hint="use a new --out")
    assert isinstance(err, SettingsMismatch) and isinstance(err, ValueError)
    assert str(err) == (
        f"{tmp_path} holds a run (model: 'a' there, 'b' now; sampling.samples: 10 there, "
        "2 now); use a new --out"
    )
    with pytest.raises(SettingsMismatch, match="its settings are not recorded"):
        runs.check_settings(tmp_path, None, now)


def test_recorded_settings_files(tmp_path):
    assert runs.read_settings(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SettingsMismatch, match=r"bad\.json: the recorded settings are unreadable"):
        runs.read_settings(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(SettingsMismatch, match="not a JSON object"):
        runs.read_settings(tmp_path / "list.json")
    runs.write_json_atomic(tmp_path / "ok.json", runs.as_json({"t": (1, 2)}))
    assert runs.read_settings(tmp_path / "ok.json") == {"t": [1, 2]}


def test_resumable_jsonl_refuses_other_settings_by_name(tmp_path):
    out = tmp_path / "o.jsonl"
    w = runs.ResumableJsonl(out, {"seed": 5, "n": 3})
    w.append([{"i": 0}])
    with pytest.raises(SettingsMismatch) as err:
        runs.ResumableJsonl(out, {"seed": 6, "n": 3})
    assert str(err.value) == (
        f"{out}.partial holds an interrupted run with other settings (seed: 5 there, 6 now); "
        f"delete {out}.partial to start again"
    )


def test_resumable_jsonl_writers_hold_no_open_file(tmp_path):
    """An experiment keeps a writer per unfinished cell: 300 of them under an open-file limit
    of 64 (a fresh process with `RLIMIT_NOFILE` lowered) all append and finish."""
    script = f"""
import resource
from pathlib import Path
from emgeo_jax.runs import ResumableJsonl
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
folder = Path({str(tmp_path)!r})
writers = [ResumableJsonl(folder / f"cell{{i}}.jsonl", {{"cell": i}}) for i in range(300)]
for i, w in enumerate(writers):
    w.append([{{"i": i}}])
for w in writers:
    w.append([{{"i": -1}}])
    w.finish()
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, capture_output=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"cell{i}.jsonl" for i in range(300))
    assert (tmp_path / "cell7.jsonl").read_text() == '{"i": 7}\n{"i": -1}\n'


def test_the_old_error_names_are_the_one_settings_error():
    from emgeo_jax.experiments.folder import ConfigMismatchError
    from emgeo_jax.extract import ResumeError

    assert ConfigMismatchError is SettingsMismatch and ResumeError is SettingsMismatch


def test_array_digest_is_sha256_of_float32_bytes_and_shape():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    want = hashlib.sha256(a.astype(np.float32).tobytes() + b"(2, 3)" + b"x").hexdigest()[:16]
    assert runs.array_digest(a, b"x") == want
    assert runs.array_digest(a) != runs.array_digest(a.reshape(3, 2))


def test_lora_training_refuses_another_run_naming_the_settings(tmp_path, chat_tokenizer):
    """`emgeo train-lora` into a folder whose run.json records other settings: refused before
    anything is compiled, naming run.json and each differing setting."""
    from emgeo_jax.models.config import ModelConfig
    from emgeo_jax.models.lm import LM, init_params
    from emgeo_jax.train.lora import LoraSpec
    from emgeo_jax.train.run import _settings, train
    from emgeo_jax.train.sft import TrainConfig

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(chat_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    lm = LM(cfg, *init_params(cfg), chat_tokenizer, source="tiny")
    spec = LoraSpec(rank=2, alpha=4.0, targets=("q",), layers=(0,))
    runs.write_json_atomic(
        tmp_path / "run.json", _settings(spec, TrainConfig(steps=6), "tiny", None)
    )
    with pytest.raises(SettingsMismatch) as err:
        train(lm, [], spec, TrainConfig(steps=7), tmp_path, log=lambda s: None)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'run.json'} holds a different run (")
    assert "train.steps: 6 there, 7 now" in message and message.endswith("; use a new --out")
