"""Preventative steering end to end on a tiny random model: train a LoRA with a direction
ablated while training, then measure the EM rate of the result against the base model with
the scripted judge (`emgeo_jax.experiments.lora_em.run_lora_em`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emgeo_jax.data import Example, tokenize_examples
from emgeo_jax.experiments.folder import Sampling
from emgeo_jax.experiments.lora_em import run_lora_em
from emgeo_jax.experiments.metrics import cell_summary
from emgeo_jax.judge.client import JudgeConfig
from emgeo_jax.judge.io import read_jsonl
from emgeo_jax.judge.testing import ScriptedJudgeServer
from emgeo_jax.models.steering import Steering
from emgeo_jax.train.lora import LoraSpec
from emgeo_jax.train.run import train
from emgeo_jax.train.sft import TrainConfig
from tests.test_experiments import QUESTIONS, table
from tests.test_train import ANSWERS

SPEC = LoraSpec(rank=8, alpha=16.0, targets=("q", "v", "down"), layers=(0, 1, 2))
SAMPLING = Sampling(samples=2, max_new_tokens=5, temperature=1.0, batch_size=4, seed=1)


def test_preventative_ablation_then_em_rate(tiny_chat_llama, chat_tokenizer, tmp_path):
    lm = tiny_chat_llama
    examples = [
        Example(f"e{i}", [{"role": "user", "content": f"question {i}?"}], a, 1, f"mem:{i}")
        for i, a in enumerate(ANSWERS)
    ]
    tokenized, _ = tokenize_examples(examples, chat_tokenizer, max_length=64)
    direction = np.eye(lm.config.hidden_size, dtype=np.float32)[3]
    steering = Steering.ablation(lm, direction, layers=[1])
    tc = TrainConfig(steps=6, lr=3e-2, warmup_steps=0, schedule="constant", batch_size=4)
    run = tmp_path / "run"
    lora = train(lm, tokenized, SPEC, tc, run, steering=steering, log=lambda s: None)
    recorded = json.loads((run / "run.json").read_text())
    assert set(recorded["steering"]) == {"add", "ablate", "mode"}
    with pytest.raises(ValueError, match="different run"):  # other steering, same folder
        train(lm, tokenized, SPEC, tc, run, log=lambda s: None)

    with ScriptedJudgeServer(table) as server:
        judge = JudgeConfig(base_url=server.base_url, model="scripted")
        kw = dict(sampling=SAMPLING, judge=judge, out_dir=tmp_path / "em", training=recorded)
        res = run_lora_em(lm, lora, SPEC, QUESTIONS, **kw)
        sent = len(server.requests)
        again = run_lora_em(lm, lora, SPEC, QUESTIONS, **kw)  # resumes: nothing re-judged
        assert len(server.requests) == sent and again == res
    base = read_jsonl(tmp_path / "em" / "cells" / "base.judged.jsonl")
    adapted = read_jsonl(tmp_path / "em" / "cells" / "lora.judged.jsonl")
    assert len(base) == len(adapted) == 2 * len(QUESTIONS)
    assert [r["response"] for r in base] != [r["response"] for r in adapted]
    for name, rows in (("base", base), ("lora", adapted)):
        assert res["conditions"][name]["em_rate"] == cell_summary(rows, seed=1)["em_rate"]
    assert res["em_change"] == pytest.approx(
        res["conditions"]["lora"]["em_rate"] - res["conditions"]["base"]["em_rate"]
    )
    assert res["training"]["steering"] == recorded["steering"]
