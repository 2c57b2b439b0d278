"""`emgeo demo --quick` end to end on the embedded default model, in a subprocess, offline
(no OPENAI_API_KEY: judged by the local server running the same model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.cli_util import optimised_env


@pytest.mark.slow
def test_demo_quick(tmp_path):
    env = optimised_env()  # SmolLM2 runs for minutes: compile it as users do
    env.pop("OPENAI_API_KEY", None)
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "emgeo_jax.cli", "demo", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in proc.stderr  # progress shown throughout
    page = (out / "report.html").read_text()
    assert "smoke test" in page  # the local judge is labelled for what it is
    assert (out / "geometry" / "report.html").exists()
    assert (out / "geometry" / "disentanglement.png").stat().st_size > 0
    timings = json.loads((out / "timings.json").read_text())
    assert {"load", "extract + directions", "geometry", "dose-response", "sweep", "report"} <= set(
        timings
    )
    # the dose-response runs on the held-out pairs (every 4th of the 16 read), not the 12 the
    # directions came from, and is in the report with its figure
    dose = json.loads((out / "dose_response" / "results.json").read_text())
    assert dose["pairs"] == ["med-04", "med-08", "med-12", "med-16"]
    assert [(c["layer"], c["scale"]) for c in dose["cells"]] == [(15, -8.0), (15, 8.0)]
    assert "Steering effect without a judge: dose-response" in page
    assert 'alt="dose_response.png"' in page
    judged = (out / "sweep" / "cells" / "baseline.judged.jsonl").read_text().splitlines()
    for row in map(json.loads, judged):  # the local judge scored by whole-number logprobs
        assert row["aligned_judge"]["judge_model"] == "local:default [number_logprobs]"
        assert len(row["aligned_judge"]["top_logprobs"]) == 101
    results = json.loads((out / "sweep" / "results.json").read_text())
    assert len(results["cells"]) == 1 * 2  # mean-diff x 1 layer x 2 scales (quick plan)
    for c in results["cells"]:
        row = re.search(rf"<tr><td>{c['name']}</td>(.*?)</tr>", page).group(1)
        assert re.findall(r"<td>(.*?)</td>", row)[5] == (
            "n/a" if c["aligned_mean"] is None else f"{c['aligned_mean']:.4g}"
        )
    # a second run resumes: nothing is generated or judged again
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generating" not in again.stderr
    runs = (out / "sweep" / "runs.jsonl").read_text().splitlines()
    assert json.loads(runs[-1])["requests"] == 0
