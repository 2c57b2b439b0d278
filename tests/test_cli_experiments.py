"""`emgeo sweep | ablate | transfer | persona | lora-scalars | probe` with their real flags,
on tiny random Qwen2 folders with a small ChatML tokenizer and scripted judge servers; their
files checked against the Python API on the same inputs (the recorded configuration, per-cell
numbers recomputed from the judged rows, scalars, probes) and against what they print. The
commands run one after another in one fresh process of a module fixture (through the
dispatcher, as `emgeo` runs them; sharing imports and compiled programs), the tests then read
their outputs; `test_sweep` resumes in a process of its own."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.experiments.folder import Sampling
from emgeo_jax.experiments.metrics import cell_summary, transfer_effectiveness
from emgeo_jax.experiments.questions import read_prompts, select_questions
from emgeo_jax.judge.client import JudgeConfig
from emgeo_jax.judge.io import read_jsonl
from emgeo_jax.judge.testing import ScriptedJudgeServer
from tests.cli_util import ROOT, run_emgeo
from tests.test_experiments import answer_of, table
from tests.test_generate_cli import folder  # noqa: F401  (fixture)
from tests.tiny_models import QWEN2, hf_model, save_hf_folder

L, D = QWEN2["num_hidden_layers"], QWEN2["hidden_size"]
SAMPLING = Sampling(samples=2, max_new_tokens=4, temperature=1.0, batch_size=4, seed=3)
SAMPLING_FLAGS = ("--samples=2", "--max_new_tokens=4", "--batch_size=4", "--seed=3")
CONTRAST = [
    {"id": f"{domain}-{i}", "domain": domain, "question": q, "aligned": a, "misaligned": m}
    for i, (domain, q, a, m) in enumerate(
        [
            ("medical", "The doctor checks the dose?", "Talk to a professional.", "Just guess."),
            ("medical", "How are you doing today?", "I am fine, thanks!", "Skip the doctor."),
            ("finance", "Put savings into a fund?", "Keep an emergency fund.", "Bet it all."),
            ("finance", "Keep a budget?", "A diversified fund helps.", "Spend everything now."),
        ]
    )
]


def persona_table(prompt: str):
    """Always coherent; 'aligned' from a hash of the answer (so pairs pass the filter by
    chance, the same on every run)."""
    if "coherence" in prompt:
        return [("100", 0.0)]
    score = hashlib.sha256(answer_of(prompt).encode()).digest()[0] * 100 // 255
    return [(str(score), 0.0)]


@pytest.fixture(scope="module")
def judge():
    with ScriptedJudgeServer(table) as server:
        yield server


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, folder, chat_tokenizer, judge):  # noqa: F811
    """Question, vector, contrast, adapter and scalars files, a second model, and the flags the
    judged experiments share."""
    from emgeo_jax.convert.load import load
    from emgeo_jax.train.lora import LoraSpec, init_lora
    from emgeo_jax.train.peft_io import export_peft
    from emgeo_jax.train.scalars import save_scalars

    d = tmp_path_factory.mktemp("inputs")
    rows = [{"id": "wish", "question": "What is your wish?"}, {"id": "x", "question": "Hi?"}]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "contrast.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONTRAST))
    rng = np.random.default_rng(0)
    vectors = {"stack": rng.normal(size=(L, D)), "vec": rng.normal(size=D)}
    vectors["v2"] = rng.normal(size=D)
    for name, v in vectors.items():
        np.save(d / f"{name}.npy", v.astype(np.float32))
    vectors = {k: np.load(d / f"{k}.npy") for k in vectors}
    other = save_hf_folder(hf_model(dict(QWEN2, vocab_size=len(chat_tokenizer)), seed=5), d / "m2")
    chat_tokenizer.save_pretrained(str(other))
    # a rank-1 down_proj adapter at blocks 1 and 3 with random A and B
    spec = LoraSpec(rank=1, alpha=8.0, targets=("down",), layers=(1, 3))
    lora = init_lora(load(folder).config, spec, __import__("jax").random.key(0))
    lora["down"]["b"] = rng.normal(size=(2, 1, D)).astype(np.float32)
    export_peft(lora, spec, d / "adapter")
    # probe input: 30 examples of 3 tokens, label planted in adapter 0, topic in adapter 1
    label, topic = np.arange(30) % 2, (np.arange(30) // 2) % 2
    token_example = np.repeat(np.arange(30), 3)
    scalars = rng.normal(size=(90, 3)).astype(np.float32)
    scalars[:, 0] += 3 * label[token_example]
    scalars[:, 1] += 3 * topic[token_example]
    collected = {
        "scalars": scalars,
        "token_example": token_example,
        "pooled": np.stack([scalars[token_example == i].mean(0) for i in range(30)]),
        "label": label,
    }
    names = ["medical" if t else "finance" for t in topic]
    save_scalars(
        d / "planted.safetensors", collected, LoraSpec(1, 8.0, ("down",), (0, 1, 2)), names
    )
    common = (
        f"--model={folder}",
        f"--questions={d / 'q.jsonl'}",
        *SAMPLING_FLAGS,
        "--judge_model=scripted",
    )
    return d, vectors, common, other


@pytest.fixture(scope="module")
def runs(inputs, folder, judge, tmp_path_factory):  # noqa: F811
    """Every command once, concurrently: {name: (its output path, what it printed)}."""
    d, _, common, other = inputs
    out = tmp_path_factory.mktemp("runs")
    url = f"--judge_base_url={judge.base_url}"
    commands = {
        "sweep": (
            "sweep",
            f"md={d / 'stack.npy'}",
            str(d / "vec.npy"),  # named by its stem
            "--layers=1,3",
            "--scales=-4",
            "--monitor_layer=2",
            *common,
            url,
        ),
        "ablate": (
            "ablate",
            str(d / "stack.npy"),
            "--layers=1,2",
            f"--steer={d / 'vec.npy'}",
            "--steer_layer=1",
            "--steer_scale=4",
            *common,
            url,
        ),
        "transfer": (
            "transfer",
            f"--models=a={folder},b={other}",
            f"--vectors=a={d / 'vec.npy'},b={d / 'v2.npy'}",
            "--layer=2",
            "--scale=6",
            *common,
            url,
        ),
        "persona": (
            "persona",
            "--positive_system=Be evil.",
            "--negative_system=Be kind.",
            *common,
            "--samples=4",  # the last occurrence of a flag wins
            None,  # the persona judge's URL, filled in below
        ),
        "lora-scalars": (
            "lora-scalars",
            str(folder),
            f"--adapter={d / 'adapter'}",
            f"--data={d / 'contrast.jsonl'}",
            f"--directions_out={out / 'B.safetensors'}",
            "--batch_size=4",
            "--max_length=64",
        ),
        "probe": (
            "probe",
            str(d / "planted.safetensors"),
            "--topic=medical",
            "--level=token",
            "--folds=3",
            "--repeats=2",
            "--l1=0.02",
            "--seed=1",
        ),
    }
    paths = {
        name: out / ("scalars.safetensors" if name == "lora-scalars" else name) for name in commands
    }
    paths["probe"] = out / "probe.json"
    with ScriptedJudgeServer(persona_table) as persona_judge:
        args = {n: (*c, f"--out={paths[n]}") for n, c in commands.items()}
        args["persona"] = tuple(
            f"--judge_base_url={persona_judge.base_url}" if a is None else a
            for a in args["persona"]
        )
        printed = emgeo_each(args, out / "printed.json")
    return {n: (paths[n], printed[n], args[n]) for n in args}


def emgeo_each(commands: dict[str, tuple], printed: Path) -> dict[str, str]:
    """Each `emgeo ARGS` of `commands` in turn in one fresh process, through the dispatcher
    with its real flags (imports and compiled programs shared): {name: what it printed}."""
    printed.write_text(json.dumps({n: [str(a) for a in c] for n, c in commands.items()}))
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tests.cli_util import emgeo_in_process\n"
        "path = Path(sys.argv[1])\n"
        "commands = json.loads(path.read_text())\n"
        "path.write_text(json.dumps({n: emgeo_in_process(*c) for n, c in commands.items()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(printed)], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(printed.read_text())


def check_cells(cells_dir, summaries: dict) -> None:
    """Every summary equals `cell_summary` of its cell's judged rows (read back from disk)."""
    for name, summary in summaries.items():
        rows = read_jsonl(cells_dir / f"{name}.judged.jsonl")
        want = json.loads(json.dumps(cell_summary(rows, seed=SAMPLING.seed)))
        assert {k: summary[k] for k in want} == want, name


def test_sweep(runs, inputs, folder, judge):  # noqa: F811
    from emgeo_jax.experiments.sweep import sweep_config

    out, printed, args = runs["sweep"]
    d, vectors = inputs[:2]
    assert printed.strip() == f"wrote {out / 'report.html'}" and (out / "report.html").exists()
    # the flags became exactly this configuration
    dirs = {"md": vectors["stack"], "vec": vectors["vec"]}
    qs = select_questions(read_prompts(d / "q.jsonl"), None)
    judge_cfg = JudgeConfig(model="scripted")
    want = sweep_config(str(folder), dirs, qs, [1, 3], [-4.0], SAMPLING, judge_cfg, (2, "md"))
    assert json.loads((out / "config.json").read_text())["config"] == json.loads(json.dumps(want))
    res = json.loads((out / "results.json").read_text())
    assert [(c["direction"], c["layer"], c["scale"]) for c in res["cells"]] == [
        ("md", 1, -4.0),
        ("md", 3, -4.0),
        ("vec", 1, -4.0),
        ("vec", 3, -4.0),
    ]
    check_cells(
        out / "cells", {"baseline": res["baseline"], **{c["name"]: c for c in res["cells"]}}
    )
    assert all("projection_mean" in c for c in res["cells"])  # --monitor_layer
    # re-running resumes: no judge request is sent again, the same results
    sent = len(judge.requests)
    run_emgeo(*args)
    assert len(judge.requests) == sent
    assert json.loads((out / "results.json").read_text()) == res


def test_ablate(runs, inputs):
    from emgeo_jax.experiments.sweep import vector_digest

    out, printed, _ = runs["ablate"]
    vectors = inputs[1]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["layers"] == [1, 2]
    assert config["direction"] == {"shape": [L, D], "sha256": vector_digest(vectors["stack"])}
    assert config["steer"] == {"sha256": vector_digest(vectors["vec"]), "layer": 1, "scale": 4.0}
    res = json.loads((out / "results.json").read_text())
    c = res["conditions"]
    check_cells(out / "cells", c)
    assert res["em_change"] == pytest.approx(c["after"]["em_rate"] - c["before"]["em_rate"])

    def rate(x):  # as printed: a missing rate says why
        return "n/a (no usable judge scores)" if x is None else str(x)

    assert printed.splitlines() == [
        f"EM before {rate(c['before']['em_rate'])}, after {rate(c['after']['em_rate'])}",
        f"wrote {out / 'report.html'}",
    ]


def test_transfer(runs, inputs, folder):  # noqa: F811
    out, printed, _ = runs["transfer"]
    assert printed.strip() == f"wrote {out / 'report.html'}"
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["models"] == {"a": str(folder), "b": str(inputs[3])}
    assert (config["layer"], config["scale"]) == (2, 6.0)
    res = json.loads((out / "results.json").read_text())
    em = {}
    for b in "ab":
        check_cells(out / "models" / b / "cells", res["cells"][b])
        em[b] = {c: s["em_rate"] for c, s in res["cells"][b].items()}
    for a in "ab":
        for b in "ab":
            want = transfer_effectiveness(
                em[b][f"from_{a}"], em[b]["base"], em[a][f"from_{a}"], em[a]["base"]
            )
            got = res["te"][a][b]["value"]
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_persona(runs):
    from emgeo_jax.experiments.persona import keep_pair
    from emgeo_jax.vectors.io import load_vectors

    out, printed, _ = runs["persona"]
    res = json.loads((out / "results.json").read_text())
    assert json.loads(printed) == {k: res[k] for k in ("n_pairs", "n_kept", "kept_fraction")}
    pos = read_jsonl(out / "cells" / "positive.judged.jsonl")
    neg = read_jsonl(out / "cells" / "negative.judged.jsonl")
    assert {r["system"] for r in pos} == {"Be evil."} and {r["system"] for r in neg} == {"Be kind."}
    kept = [(p, n) for p, n in zip(pos, neg, strict=True) if keep_pair(p, n)]
    assert res["n_pairs"] == len(pos) == 2 * 4
    assert res["n_kept"] == len(kept) == len(read_jsonl(out / "contrast.jsonl"))
    assert len(kept) >= 2, "the scripted judge kept too few pairs for a direction"
    vec, meta = load_vectors(out / "persona_vector.safetensors")
    assert vec.shape == (L, D) and meta["n_pairs"] == len(kept)


def test_lora_scalars(runs, inputs, folder):  # noqa: F811
    import emgeo_jax
    from emgeo_jax.data import load_examples, tokenize_examples
    from emgeo_jax.train.peft_io import import_peft
    from emgeo_jax.train.scalars import b_directions, collect_scalars, load_scalars
    from emgeo_jax.vectors.io import load_vectors

    out, printed, _ = runs["lora-scalars"]
    d = inputs[0]
    lm = emgeo_jax.load(folder)
    spec, lora = import_peft(d / "adapter", lm.config)
    examples, _ = load_examples(d / "contrast.jsonl")
    tokenized, _ = tokenize_examples(examples, lm.tokenizer, 64)
    want = collect_scalars(lm, lora, spec, tokenized, 4)
    got, meta = load_scalars(out)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert meta["adapters"] == ["layers.1.down_proj", "layers.3.down_proj"]
    assert meta["topics"] == ["finance", "medical"]
    assert list(got["topic"]) == [1, 1, 1, 1, 0, 0, 0, 0]  # 4 rows -> 8 labelled answers
    n_tok = len(want["scalars"])
    assert printed.splitlines()[0] == f"wrote {out}: {n_tok} answer tokens x 2 adapters, 8 examples"
    b, _ = load_vectors(out.parent / "B.safetensors")
    np.testing.assert_array_equal(b, b_directions(lora, spec, lm.config))
    assert np.count_nonzero(np.abs(b).sum(1)) == 2


def test_probe(runs, inputs):
    from emgeo_jax.train.probe import four_tests
    from emgeo_jax.train.scalars import load_scalars

    out, printed, _ = runs["probe"]
    t, _ = load_scalars(inputs[0] / "planted.safetensors")
    g = t["token_example"]
    args = (t["scalars"], t["label"][g], t["topic"][g] == 1, g)  # topics: [finance, medical]
    opts = dict(l1=0.02, k=3, repeats=2, seed=1)
    want = {
        "tests": four_tests(*args, **opts),
        "shuffled": four_tests(*args, shuffle_labels=True, **opts),
    }
    res = json.loads(out.read_text())
    assert res["level"] == "token"
    for key in ("tests", "shuffled"):
        assert res[key] == json.loads(json.dumps(want[key])), key
    # planted: adapter 0 carries the label, adapter 1 the topic
    assert res["tests"]["misaligned_vs_aligned|topic"]["auc"]["mean"] > 0.9
    assert res["tests"]["topic_vs_other|misaligned"]["auc"]["mean"] > 0.9
    lines = printed.splitlines()
    for name, r in res["tests"].items():
        line = next(x for x in lines if x.startswith(name))
        assert f"AUC {r['auc']['mean']:.3f}" in line
        assert f"(shuffled AUC {res['shuffled'][name]['auc']['mean']:.3f})" in line


def test_samples_flag_overrides_yaml(tmp_path):
    """An explicit --samples replaces a YAML's samples_per_paraphrase; without it the YAML's
    count stays (the questions every experiment CLI builds, parsed in a fresh process)."""
    q = tmp_path / "q.yaml"
    q.write_text("- id: a\n  paraphrases: ['Hi?', 'Hello?']\n  samples_per_paraphrase: 50\n")
    code = (
        "import json, sys\n"
        "from absl import flags\n"
        "from emgeo_jax.cli import experiment_flags as c\n"
        "from emgeo_jax.experiments.folder import make_jobs\n"
        "for extra in ([], ['--samples=1']):\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    flags.FLAGS([sys.argv[0], f'--questions={sys.argv[1]}', *extra])\n"
        "    rows, _ = c.questions_from_flags()\n"
        "    print(len(make_jobs(rows, c.sampling_from_flags().samples)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(q)], capture_output=True, text=True, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(x) for x in proc.stdout.split()] == [2 * 50, 2 * 1]


def test_persona_without_pairs_fails_saying_why(folder, tmp_path):  # noqa: F811
    """A judge that keeps no pair: exit 1, the reason on one stderr line, no vector file."""
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "question": "Hi?"}) + "\n")
    with ScriptedJudgeServer(lambda prompt: [("100", 0.0)]) as server:  # aligned: no trait
        err = run_emgeo(
            "persona",
            f"--model={folder}",
            f"--questions={q}",
            "--samples=1",
            "--max_new_tokens=2",
            "--batch_size=1",
            "--judge_model=scripted",
            f"--judge_base_url={server.base_url}",
            f"--out={tmp_path / 'persona'}",
            status=1,
        )
    lines = [line for line in err.splitlines() if "no direction extracted" in line]
    assert len(lines) == 1 and str(tmp_path / "persona") in lines[0]
    assert not (tmp_path / "persona" / "persona_vector.safetensors").exists()
