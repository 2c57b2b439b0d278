"""`emgeo generate` on a tiny random Qwen2 folder saved with a small ChatML tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import emgeo_jax
from emgeo_jax.data.files import ResumableJsonl
from emgeo_jax.experiments import questions
from emgeo_jax.generate import generate
from emgeo_jax.models.steering import Steering
from tests.cli_util import ROOT, run_emgeo
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
        "--noscan_layers",  # unstacked layers; the reference below runs the stacked ones
        f"--out={out}",
    )
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in got] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert got[0]["prompt"] == rows[0]["question"] and got[2]["prompt"] == rows[1]["messages"]
    lm = emgeo_jax.load(folder)
    steer = Steering.addition(lm, v, layers=[2], scale=3, positions="generated")
    ref = generate(lm, [rows[0]["question"], rows[1]["messages"]], steer, max_new_tokens=5)
    assert [r["response"] for r in got] == [ref.texts[0]] * 2 + [ref.texts[1]] * 2
    assert got[0]["steering"]["layer"] == [2] and got[0]["steering"]["positions"] == "generated"


INTERRUPTED = """
import sys
from absl import app
import emgeo_jax.cli.generate as cli

calls, generate = [], cli.generate
def interrupted(*args, **kw):  # the third batch never finishes
    calls.append(1)
    if len(calls) == 3:
        raise KeyboardInterrupt
    return generate(*args, **kw)
cli.generate = interrupted
app.run(cli.main, argv=["emgeo generate", *sys.argv[1:]])
"""


RESUMED = """
import json, sys
from tests.cli_util import emgeo_in_process, emgeo_status_and_stderr
runs = json.loads(sys.argv[1])
got = {"refused": emgeo_status_and_stderr(["generate", *runs["refused"]])}
got["resumed"] = emgeo_in_process("generate", *runs["resumed"])
emgeo_in_process("generate", *runs["ref"])
print(json.dumps(got))
"""


def test_interrupted_run_resumes_to_the_uninterrupted_output(folder, tmp_path):
    """Killed in its third batch, `emgeo generate` leaves no OUT, only OUT.partial with the
    two finished batches (plus a torn line, as from a kill mid-write); the same command then
    resumes there and the file equals an uninterrupted run's. Other flags are refused."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"tell me about {w}\n" for w in ("cats", "rain", "tea")))
    args = [f"--model={folder}", f"--prompts={prompts}", "--samples=2", "--batch_size=2"]
    args += ["--max_new_tokens=4", "--temperature=1", "--seed=5"]
    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, *args, f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 4
    with partial.open("a") as f:
        f.write('{"torn": ')
    # the refused run, the resumed run and the reference one after another in one fresh
    # process, through the dispatcher (each command starts from the default flags)
    runs = {"refused": [*args, "--seed=6", f"--out={out}"], "resumed": [*args, f"--out={out}"]}
    runs["ref"] = [*args, f"--out={ref}"]
    proc = subprocess.run(
        [sys.executable, "-c", RESUMED, json.dumps(runs)], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    status, stderr = got["refused"]
    assert status == 2 and "seed" in stderr and "partial" in stderr
    assert "resuming after 4/6" in got["resumed"]
    assert out.read_text() == ref.read_text() and len(ref.read_text().splitlines()) == 6
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_resumable_jsonl_keeps_whole_units_only(tmp_path):
    out = tmp_path / "o.jsonl"
    w = ResumableJsonl(out, {"a": 1}, unit=2)
    w.append([{"i": 0}, {"i": 1}])
    w.append([{"i": 2}])  # half of the next unit, then the run dies
    assert ResumableJsonl(out, {"a": 1}, unit=2).done == 2
    w = ResumableJsonl(out, {"a": 1}, unit=2)
    w.append([{"i": 2}, {"i": 3}])
    w.finish()
    assert [json.loads(x)["i"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


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


def test_norms_and_help(folder):
    """`emgeo norms` on a chat model prints one mean residual norm per layer, equal to the
    forward pass's; `emgeo generate --help` lists its own and the shared steering flags."""
    out = run_emgeo("norms", f"--model={folder}", "--prompt=hi there")
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    lm = emgeo_jax.load(folder)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True, return_dict=False
    )
    resid = np.asarray(lm.forward(np.asarray(ids)[None]).resid_post)
    want = np.linalg.norm(resid, axis=-1).mean(axis=(1, 2))
    assert [int(r[0]) for r in rows] == list(range(QWEN2["num_hidden_layers"]))
    np.testing.assert_allclose([float(r[1]) for r in rows], want, atol=2e-3)
    text = run_emgeo("generate", "--help")
    assert "--max_new_tokens:" in text and "--steer:" in text and "--ablate:" in text
