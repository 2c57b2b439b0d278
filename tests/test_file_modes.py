"""Data outputs honour the umask like reports do (mkstemp alone would make them 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from emgeo_jax.experiments.folder import write_json_atomic
from emgeo_jax.judge.io import umask_file_mode, write_jsonl_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert umask_file_mode() == 0o666 & ~umask
        write_jsonl_atomic(tmp_path / "a.jsonl", [{"x": 1}])
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        (tmp_path / "report.html").write_text("<p>")  # what reports get
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.jsonl", "b.json", "report.html"], 0o666 & ~umask)
