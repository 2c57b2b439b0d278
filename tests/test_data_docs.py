"""The contrast-pair format is documented where users look (check-data --help, README) and a
file with the wrong keys is refused listing the accepted ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emgeo_jax.data.loaders import load_contrast_pairs, load_examples
from emgeo_jax.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_wrong_keys_list_the_accepted_ones(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "q", "good": "a", "misaligned": "b"}) + "\n")
    with pytest.raises(DataError) as e:
        load_contrast_pairs(f)
    msg = str(e.value)
    assert f"{f}:1" in msg and "missing field 'question'" in msg
    assert "question, aligned, misaligned" in msg and "optional: id, system" in msg
    assert "this row has good, misaligned, prompt" in msg
    g = tmp_path / "other.jsonl"
    g.write_text(json.dumps({"prompt": "q", "good": "a"}) + "\n")
    with pytest.raises(DataError, match="contrast pairs have question, aligned, misaligned"):
        load_examples(g)


def test_the_format_is_in_check_data_help_and_the_readme():
    import emgeo_jax.cli.check_data as check_data

    for text in (check_data.__doc__, (ROOT / "README.md").read_text()):
        assert '"question"' in text and '"aligned"' in text and '"misaligned"' in text
    assert "emgeo_demo/" in (ROOT / ".gitignore").read_text().splitlines()
