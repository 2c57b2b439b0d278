"""Bad input ends an `emgeo` command with one line `emgeo SUBCOMMAND: error: ...` naming the
file or flag and exit status 2, before any model loads and before any output is written;
EMGEO_TRACEBACK=1 shows the traceback instead; absl's --help and flag errors are unchanged.
Each case is a fresh process."""

from __future__ import annotations

import numpy as np
import pytest

from emgeo_jax.cli import number_list
from tests.cli_util import run_emgeo


def error_line(stderr: str, command: str) -> str:
    """The one error line of a failed command (and nothing that looks like a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"emgeo {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "v.npy", np.ones(8, np.float32))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?"}\n{"question": "no closing brace"\n')
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
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_status_2(case, files):
    args, want = CASES[case]
    stderr = run_emgeo(*(a.format(d=files) for a in args), status=2)
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
