"""`benchmarks/device.py`: the `--tiny` run as a user would start it (subprocess, CPU), and
its layer fitting and roofline bytes against hand counts; `benchmarks/mesh_call.py` runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks.device import decode_bytes, fit_layers, kv_bytes, param_bytes, resolve_model
from benchmarks.mfu import model_flops

ROOT = Path(__file__).resolve().parents[1]


def _hand_param_count(cfg) -> int:
    """Parameters of a Llama/Qwen2 config counted by hand."""
    d, f, dh, h, k = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    )
    block = d * dh * (2 * h + 2 * k) + 3 * d * f + 2 * d
    if cfg.qkv_bias:
        block += dh * (h + 2 * k)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.num_layers * block + cfg.vocab_size * d + head + d


@pytest.mark.parametrize("name", ["tiny-qwen2", "Qwen2.5-7B"])
def test_bytes_and_fit_against_hand_counts(name):
    cfg = resolve_model(name)
    assert param_bytes(cfg, "bfloat16") == 2 * _hand_param_count(cfg)
    if name == "Qwen2.5-7B":  # 7.62 B parameters, as published
        assert round(_hand_param_count(cfg) / 1e9, 2) == 7.62
    batch, slots = 4, 40
    kv_layer = 2 * batch * slots * cfg.num_kv_heads * cfg.head_dim * 2
    assert kv_bytes(cfg, batch, slots, "bfloat16") == cfg.num_layers * kv_layer
    untied_table = 0 if cfg.tie_word_embeddings else 2 * cfg.vocab_size * cfg.hidden_size
    assert decode_bytes(cfg, batch, slots, "bfloat16") == (
        2 * _hand_param_count(cfg) - untied_table + cfg.num_layers * kv_layer
    )
    one = dataclasses.replace(cfg, num_layers=1)
    per_layer = 2 * (_hand_param_count(dataclasses.replace(cfg, num_layers=2))
                     - _hand_param_count(one)) + kv_layer  # fmt: skip
    fixed = 2 * _hand_param_count(one) + kv_layer - per_layer
    for n in (1, 3):
        assert fit_layers(cfg, "bfloat16", fixed + n * per_layer, batch, slots) == n
    assert fit_layers(cfg, "bfloat16", fixed + 3 * per_layer - 1, batch, slots) == 2
    assert fit_layers(cfg, "bfloat16", 1e15, batch, slots) == cfg.num_layers
    with pytest.raises(ValueError, match="not one layer fits"):
        fit_layers(cfg, "bfloat16", fixed + per_layer - 1, batch, slots)


def test_tiny_run(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "benchmarks/device.py", "--tiny", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["backend"] == "cpu"
    assert "measured" in result["meta"]["source"]  # no table peak for a CPU
    rows, meta = result["rows"], result["meta"]
    batch, seq, slots = 2, 16, 16 + 128 + 1  # --tiny: batch 2 x 16 tokens, 128 new
    models = {"tiny-llama": 3, "tiny-qwen2": 4}  # all layers fit in the host's memory
    for model, layers in models.items():
        cfg = resolve_model(model)
        tasks = {r["task"]: r for r in rows if r["model"] == model}
        assert set(tasks) == {"extract", "prefill", "decode", "train"}, res.stdout
        # MFU = config FLOPs / seconds / peak (the peak is measured, so under load a tiny
        # call can exceed it: the formula is checked, not a bound)
        flops = {
            "extract": model_flops(cfg, batch * seq, seq, lm_head=False),
            # the LM head on each row's last token only
            "prefill": model_flops(cfg, batch * seq, slots, lm_head=False)
            + 2 * batch * cfg.hidden_size * cfg.vocab_size,
            "decode": model_flops(cfg, batch, slots),
            "train": 2 * model_flops(cfg, batch * seq, seq),
        }
        for task, r in tasks.items():
            assert r["layers"] == layers and r["batch"] == batch
            assert r["seconds"] > 0 and math.isfinite(r["tokens_per_s"])
            expected = flops[task] / r["seconds"] / meta["peak_flops"]
            assert r["mfu"] == pytest.approx(expected, rel=1e-9), task
            if task != "prefill":
                assert r["plan_tokens_per_s"] > 0
        dec = tasks["decode"]
        floor = decode_bytes(cfg, batch, slots, "float32") / meta["bandwidth"]
        assert dec["roofline_fraction"] == pytest.approx(floor / dec["seconds"], rel=1e-9)
        assert dec["tokens_per_s"] == pytest.approx(batch / dec["seconds"])
        assert dec["generate_call_tokens_per_s"] > 0
        assert f"{model}: {layers} layers" in res.stdout


def test_time_interleaved_alternates_and_drops_the_warm_up(monkeypatch):
    """On a fake clock that each call advances by a known amount: the calls alternate, the
    warm-up round is not timed, and each function gets the median of its own times."""
    import benchmarks.common as common

    clock, calls = [0.0], []
    durations = {"a": iter([100.0, 3.0, 1.0, 2.0]), "b": iter([100.0, 10.0, 30.0, 20.0])}

    def fn(name):
        def call():
            calls.append(name)
            clock[0] += next(durations[name])

        return call

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    assert common.time_interleaved([fn("a"), fn("b")], repeats=3) == [2.0, 20.0]
    assert calls == ["a", "b"] * 4


def test_tiny_run_on_8_devices(tmp_path):
    """On 8 simulated devices (`fsdp=8`) the benchmark places its parameters and inputs as the
    plan's compiled programs take them and runs those executables (extract, train): a
    sharding the executable was not compiled for would be refused, not resharded. Batch 4
    is run as the commands run it, padded to 8 rows (before, the extract plan failed with
    JAX's IndivisibleError on any batch the devices did not divide)."""
    from tests.cli_util import cpu_env

    out = tmp_path / "rows.json"
    argv = ["--tiny", "--models=tiny-llama", "--batches=4", "--new=16", "--repeats=1"]
    res = subprocess.run(
        [sys.executable, "benchmarks/device.py", *argv, "--json", str(out)],
        cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["devices"] == 8
    tasks = {r["task"]: r for r in result["rows"]}
    assert {"extract", "prefill", "train"} <= set(tasks), res.stdout
    assert "x 16 (run as [8] rows" in res.stdout
    extract = tasks["extract"]  # the real rows' tokens
    assert extract["tokens_per_s"] * extract["seconds"] == pytest.approx(4 * 16)
    for task in ("extract", "train"):  # timed from the plan's executables, planned from them
        assert tasks[task]["seconds"] > 0 and tasks[task]["plan_tokens_per_s"] > 0


def test_mesh_call_benchmark_lowers_nothing_per_warm_call():
    """`benchmarks/mesh_call.py` in this process (one device, so `fsdp=1`): warm generation
    calls on a mesh compile nothing (8 devices: `tests/test_mesh_library.py`)."""
    from benchmarks.mesh_call import main

    row = main(["--repeats", "2"])
    assert row["devices"] == jax.device_count() == 1
    assert row["lowered_per_warm_call"] == 0, row["lowered"]
    assert row["median_ms"] > 0
