"""The sweep and LoRA training on 2 processes x 2 CPU devices (gloo, launch/local.sh), each
interrupted and resumed, equal one uninterrupted process: the sweep's results and every cell
file (responses and judge scores exactly, monitor projections and the training's loss curve
and adapter within float tolerance). Only
process 0 writes and calls the judge (tests/multiprocess_experiments.py checks the latter)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.judge.io import read_jsonl
from emgeo_jax.judge.testing import ScriptedJudgeServer
from emgeo_jax.train.run import read_losses
from tests.multiprocess_experiments import sweep, train_config, train_lora
from tests.test_experiments import table
from tests.test_mesh_library import assert_same, tiny_chat_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_sweep_and_train_lora_equal_one_process(chat_tokenizer, tmp_path):
    from safetensors.numpy import load_file

    tok_dir = tmp_path / "tokenizer"
    chat_tokenizer.save_pretrained(tok_dir)
    two, one = tmp_path / "two", tmp_path / "one"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port = str(20000 + (os.getpid() + 4099) % 20000)
    proc = subprocess.Popen(
        [
            str(ROOT / "launch" / "local.sh"), "--num_processes", "2",
            "--devices_per_process", "2", "--logs", str(tmp_path / "logs"), "--port", port,
            "--", "python", "tests/multiprocess_experiments.py", str(tok_dir), str(two),
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lm = tiny_chat_lm(chat_tokenizer)
    with ScriptedJudgeServer(table) as server:
        want = sweep(lm, one / "sweep", server)
    train_lora(lm, one / "train")
    _, err = proc.communicate(timeout=900)
    logs = "".join(p.read_text()[-6000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, err[-2000:] + logs

    got = json.loads((two / "sweep" / "results.json").read_text())
    assert_same(got, json.loads(json.dumps(want)))
    cells = sorted(p.name for p in (one / "sweep" / "cells").iterdir())
    assert sorted(p.name for p in (two / "sweep" / "cells").iterdir()) == cells
    assert len(cells) == 4  # baseline and one steered cell, generated and judged
    for name in cells:  # responses and scores equal; monitor projections within tolerance
        rows = [read_jsonl(d / "sweep" / "cells" / name) for d in (two, one)]
        assert_same(*rows, name)

    a, b = read_losses(one / "train"), read_losses(two / "train")
    assert [r["step"] for r in b] == list(range(train_config().steps))
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=2e-4)
    ta = load_file(one / "train" / "adapter" / "adapter_model.safetensors")
    tb = load_file(two / "train" / "adapter" / "adapter_model.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], atol=1e-5, rtol=1e-3, err_msg=k)
    # process 1 resumed the training from the checkpoint too
    assert "resumed" in (tmp_path / "logs" / "process-1.log").read_text()
