"""Bad input ends an `emgeo` command with one line `emgeo SUBCOMMAND: error: ...` naming the
file or flag and exit status 2, before any model loads and before any output is written;
EMGEO_TRACEBACK=1 shows the traceback instead; absl's --help and flag errors are unchanged.
The cases run one after another in one fresh process, through the dispatcher (each command
starts from the default flags, as in its own process); the traceback and absl cases each in
their own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emgeo_jax.cli.parsing import number_list
from tests.cli_util import emgeo_cases, run_emgeo


def error_line(stderr: str, command: str) -> str:
    """The one error line of a failed command (and nothing that looks like a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"emgeo {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli_errors")
    np.save(tmp_path / "v.npy", np.ones(8, np.float32))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?"}\n{"question": "no closing brace"\n')
    # a 4-layer, d=8 model that has a config and no weights: a check that waited for the load
    # would fail with another message
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=8, intermediate_size=16)
    cfg |= dict(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    np.save(tmp_path / "v4.npy", np.ones(4, np.float32))
    np.save(tmp_path / "stack.npy", np.ones((2, 8), np.float32))  # rows for layers 0, 1
    (tmp_path / "p.txt").write_text("hello\n")
    pair = {"question": "q?", "aligned": "yes", "misaligned": "no"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    return tmp_path


CASES = {
    # a TrainConfig check: refused before the (nonexistent) model is looked at
    "train_warmup": (
        ["train-lora", "no/such/model", "--out={d}/run", "--steps=10", "--warmup_steps=500"],
        "warmup_steps=500",
    ),
    "sweep_missing_vector": (
        ["sweep", "{d}/missing.safetensors", "--layers=1", "--out={d}/run"],
        "{d}/missing.safetensors: no such file",
    ),
    # the malformed line is found before the (nonexistent) model is looked at
    "ablate_bad_jsonl": (
        ["ablate", "{d}/v.npy", "--questions={d}/bad.jsonl", "--model=no/such", "--out={d}/run"],
        "{d}/bad.jsonl:2: invalid JSON",
    ),
    # a usage error raised as SystemExit("...") gets the same form
    "probe_usage": (["probe"], "usage: emgeo probe SCALARS.safetensors"),
    # checked against the config before the model loads (issue #20: sweep generated and
    # judged a whole cell before finding layer 9 out of range)
    "sweep_layer_range": (
        ["sweep", "{d}/v.npy", "--layers=9", "--model={d}/m", "--out={d}/run"],
        "--layers: layer 9 out of range; the model has 4 layers (0..3)",
    ),
    "sweep_vector_width": (
        ["sweep", "{d}/v4.npy", "--layers=1", "--model={d}/m", "--out={d}/run"],
        "v4.npy: vectors of width 4; the model's hidden size is 8",
    ),
    "sweep_stack_rows": (
        ["sweep", "{d}/stack.npy", "--layers=3", "--model={d}/m", "--out={d}/run"],
        "stack.npy: a stack of shape (2, 8)",
    ),
    "sweep_layers_not_numbers": (
        ["sweep", "{d}/v.npy", "--layers=two", "--model={d}/m", "--out={d}/run"],
        "--layers: 'two' is not a number (int)",
    ),
    "generate_layer_range": (
        [
            "generate",
            "--model={d}/m",
            "--prompts={d}/p.txt",
            "--steer={d}/v.npy",
            "--layer=4",
            "--out={d}/run",
        ],
        "--layer: layer 4 out of range; the model has 4 layers (0..3)",
    ),  # fmt: skip
    "extract_layer_range": (
        [
            "extract",
            "--model={d}/m",
            "--data={d}/pairs.jsonl",
            "--layers=0,7",
            "--out={d}/run",
        ],
        "--layers: layer 7 out of range",
    ),  # fmt: skip
    "ablate_layers_not_numbers": (
        ["ablate", "{d}/v.npy", "--layers=1,x", "--model={d}/m", "--out={d}/run"],
        "--layers: 'x' is not a number (int)",
    ),
}


@pytest.fixture(scope="module")
def refused(files) -> dict[str, tuple[int, str]]:
    """Every case of `CASES` in one fresh process: {case: (exit status, stderr)}."""
    return emgeo_cases({k: [a.format(d=files) for a in args] for k, (args, _) in CASES.items()})


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_status_2(case, files, refused):
    args, want = CASES[case]
    status, stderr = refused[case]
    assert status == 2, stderr[-2000:]
    line = error_line(stderr, args[0])
    assert want.format(d=files) in line
    assert not (files / "run").exists()  # nothing written that could pass for a result


def test_traceback_on_request(files):
    stderr = run_emgeo("probe", str(files / "v.npy"), status=1, env={"EMGEO_TRACEBACK": "1"})
    assert "Traceback (most recent call last)" in stderr
    assert f"VectorFileError: {files / 'v.npy'}: not a readable scalars file" in stderr


def test_absl_flag_errors_unchanged():
    stderr = run_emgeo("probe", "--no_such_flag=1", status=1)
    assert "FATAL Flags parsing error: Unknown command line flag 'no_such_flag'" in stderr
    assert "Traceback" not in stderr


def test_number_list_names_the_flag():
    assert number_list(["1", "-2"], "layers") == [1, -2]
    assert number_list(["-4", "0.5"], "scales", float) == [-4.0, 0.5]
    with pytest.raises(ValueError, match=r"--layers: 'x' is not a number \(int\)"):
        number_list(["1", "x"], "layers")
