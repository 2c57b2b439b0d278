"""`emgeo generate` on a tiny random Qwen2 folder saved with a small ChatML tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import emgeo_jax
from emgeo_jax.experiments import questions
from emgeo_jax.steer import Steering
from tests.cli_util import run_emgeo
from tests.tiny_models import QWEN2, hf_model, save_hf_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, chat_tokenizer):
    spec = dict(QWEN2, vocab_size=len(chat_tokenizer))
    path = save_hf_folder(hf_model(spec, seed=2), tmp_path_factory.mktemp("qwen2_chat"))
    chat_tokenizer.save_pretrained(str(path))
    return path


def run_cli(*args: str) -> None:
    run_emgeo("generate", *args)


def test_cli_writes_steered_responses(folder, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "question": "hello, how are you?"},
        {"id": "b", "messages": [{"role": "user", "content": "the doctor checks"}]},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    v = np.random.default_rng(0).normal(size=QWEN2["hidden_size"]).astype(np.float32)
    save_file({"v": v}, str(tmp_path / "v.safetensors"))
    out = tmp_path / "out.jsonl"
    run_cli(
        f"--model={folder}",
        f"--prompts={prompts}",
        f"--steer={tmp_path / 'v.safetensors'}",
        "--layer=2",
        "--scale=3",
        "--positions=generated",
        "--samples=2",
        "--temperature=0",
        "--max_new_tokens=5",
        f"--out={out}",
    )
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in got] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert got[0]["prompt"] == rows[0]["question"] and got[2]["prompt"] == rows[1]["messages"]
    lm = emgeo_jax.load(folder)
    steer = Steering.addition(lm, v, layers=[2], scale=3, positions="generated")
    ref = lm.generate([rows[0]["question"], rows[1]["messages"]], steer, max_new_tokens=5)
    assert [r["response"] for r in got] == [ref.texts[0]] * 2 + [ref.texts[1]] * 2
    assert got[0]["steering"]["layer"] == [2] and got[0]["steering"]["positions"] == "generated"


def test_read_prompts_formats_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [r["prompt"] for r in questions.read_prompts(txt)] == ["first", "second"]
    yml = tmp_path / "q.yaml"
    yml.write_text(
        "- id: wish\n  paraphrases: [one, two]\n  samples_per_paraphrase: 3\n  system: be brief\n"
    )
    got = questions.read_prompts(yml)
    assert [(r["id"], r["prompt"], r["samples"], r["system"]) for r in got] == [
        ("wish", "one", 3, "be brief"),
        ("wish", "two", 3, "be brief"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"answer": "no question"}\n')
    with pytest.raises(questions.PromptFileError, match=r"bad.jsonl:2: needs"):
        questions.read_prompts(bad)
    bad.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(questions.PromptFileError, match="ending with a user turn"):
        questions.read_prompts(bad)
