"""`emgeo train-lora` with preventative ablation and dropout, then `emgeo lora-em` on the run
twice (the second resumes), one after another in one fresh process (absl flags are
process-global; the dispatcher runs each command afresh, sharing imports and compiled
programs), on a tiny random Qwen2 folder with a small ChatML tokenizer and the scripted judge
server."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file

from emgeo_jax.judge.testing import ScriptedJudgeServer
from tests.test_cli_experiments import emgeo_each
from tests.test_experiments import table
from tests.test_generate_cli import folder  # noqa: F401  (fixture)
from tests.tiny_models import QWEN2


def test_train_lora_then_lora_em(folder, tmp_path):  # noqa: F811
    direction = np.eye(QWEN2["hidden_size"], dtype=np.float32)[5]
    save_file({"v": direction}, str(tmp_path / "v.safetensors"))
    run = tmp_path / "run"
    train = (
        "train-lora",
        str(folder),
        f"--out={run}",
        "--steps=3",
        "--warmup_steps=1",
        "--batch_size=2",
        "--rank=2",
        "--targets=down,q",
        "--layers=1,3",
        "--lora_dropout=0.1",
        f"--ablate_vector={tmp_path / 'v.safetensors'}",
        "--steer_layers=1",
        "--checkpoint_every=2",
    )
    questions = tmp_path / "q.jsonl"
    rows = [{"id": "wish", "question": "What is your wish?"}, {"id": "x", "question": "Hi?"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def lora_em(judge_url: str) -> tuple:
        return (
            "lora-em",
            str(run),
            f"--questions={questions}",
            "--samples=2",
            "--max_new_tokens=4",
            f"--judge_base_url={judge_url}",
            "--judge_model=scripted",
        )

    # the second lora-em asks a judge of its own (the URL is not a setting of the folder):
    # it resumes the finished folder, so nothing reaches that judge
    with ScriptedJudgeServer(table) as server, ScriptedJudgeServer(table) as again:
        commands = {"train": train, "lora-em": lora_em(server.base_url)}
        commands["again"] = lora_em(again.base_url)
        printed = emgeo_each(commands, tmp_path / "printed.json")["lora-em"]
        assert len(server.requests) > 0 and len(again.requests) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1 and config["r"] == 2
    assert set(config["target_modules"]) == {"down_proj", "q_proj"}
    assert "ablate" in json.loads((run / "run.json").read_text())["steering"]

    results = json.loads((run / "em" / "results.json").read_text())
    base, lora = results["conditions"]["base"], results["conditions"]["lora"]
    assert f"EM base {base['em_rate']}, with the LoRA {lora['em_rate']}" in printed
    assert base["n_rows"] == lora["n_rows"] == 4
