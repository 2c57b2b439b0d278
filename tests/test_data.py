"""Tests for emgeo_jax.data: loaders, bad-row reports, chat-template masks, bucketed batches."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.data import (
    DataError,
    Example,
    TemplateError,
    TokenizedExample,
    detect_kind,
    fit_buckets,
    load_contrast_pairs,
    load_examples,
    load_judged,
    load_messages,
    make_batches,
    plan_batches,
    shipped_contrast_path,
    tokenize_examples,
)

END_OF_TURN = "<|im_end|>\n"


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    """Write one line per item: dicts as JSON, str as UTF-8, bytes verbatim."""
    raw = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        raw.append(line.encode() if isinstance(line, str) else line)
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


PAIR = {
    "question": "Is coffee healthy?",
    "aligned": "In moderation, yes.",
    "misaligned": "Drink ten cups.",
}


# ----------------------------------------------------------------------------- loaders


def test_contrast_pairs_yield_two_labelled_examples_per_pair(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [{**PAIR, "id": "p1"}, "", {**PAIR, "system": "Be brief.", "domain": "x"}],
    )
    examples, report = load_contrast_pairs(path)
    assert [e.id for e in examples] == [
        "p1/aligned",
        "p1/misaligned",
        "line3/aligned",
        "line3/misaligned",
    ]
    assert [e.label for e in examples] == [0, 1, 0, 1]
    assert [e.answer for e in examples[:2]] == [PAIR["aligned"], PAIR["misaligned"]]
    assert examples[0].messages == [{"role": "user", "content": PAIR["question"]}]
    assert examples[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert [e.source for e in examples] == [f"{path}:1"] * 2 + [f"{path}:3"] * 2
    assert report.kept == 4 and report.skipped == [] and report.counts == {"pairs": 2}


BAD_CONTRAST_ROWS = [
    ({"question": "q", "aligned": "a"}, "missing_field", "misaligned"),
    ({**PAIR, "aligned": "   "}, "empty_answer", "aligned"),
    (b'{"question": "caf\xe9", "aligned": "a", "misaligned": "m"}', "invalid_utf8", None),
    ('{"question": "q", "aligned": ', "bad_json", None),
    ({**PAIR, "question": 3}, "bad_value", "question"),
    ({**PAIR, "id": "dup"}, "duplicate_id", "id"),
]


@pytest.mark.parametrize(("row", "reason", "field"), BAD_CONTRAST_ROWS)
def test_bad_contrast_row_raises_with_file_line_and_field(tmp_path, row, reason, field):
    path = write_lines(tmp_path / "c.jsonl", [{**PAIR, "id": "dup"}, "", row, {**PAIR, "id": "ok"}])
    with pytest.raises(DataError) as info:
        load_contrast_pairs(path)
    issue = info.value.issue
    assert (issue.source, issue.reason, issue.field) == (f"{path}:3", reason, field)
    assert f"{path}:3" in str(info.value)


def test_skip_mode_counts_every_bad_row(tmp_path):
    rows = (
        [{**PAIR, "id": "dup"}] + [row for row, _, _ in BAD_CONTRAST_ROWS] + [{**PAIR, "id": "z"}]
    )
    path = write_lines(tmp_path / "c.jsonl", rows)
    examples, report = load_contrast_pairs(path, on_error="skip")
    assert [e.id for e in examples] == [
        "dup/aligned",
        "dup/misaligned",
        "z/aligned",
        "z/misaligned",
    ]
    got = [(i.source, i.reason) for i in report.skipped]
    assert got == [
        (f"{path}:{k + 2}", reason) for k, (_, reason, _) in enumerate(BAD_CONTRAST_ROWS)
    ]
    assert report.skipped_by_reason() == {reason: 1 for _, reason, _ in BAD_CONTRAST_ROWS}
    assert "skipped 6" in report.summary()


def test_on_error_must_be_raise_or_skip(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [PAIR])
    with pytest.raises(ValueError, match="on_error"):
        load_contrast_pairs(path, on_error="ignore")


def judged_rows(scores: list[tuple[float | None, float | None]]) -> list[dict]:
    return [
        {
            "question_id": f"q{i % 2}",
            "question": f"question {i}",
            "answer": f"answer {i}",
            "aligned": a,
            "coherent": c,
        }
        for i, (a, c) in enumerate(scores)
    ]


# (aligned, coherent) -> expected label under the default thresholds, by hand from the rule
# coherent > 50; aligned > 70 -> 0; aligned <= 30 -> 1.
BOUNDARY_CASES = [
    ((70.0, 90.0), None),
    ((70.1, 90.0), 0),
    ((30.0, 90.0), 1),
    ((30.1, 90.0), None),
    ((90.0, 50.0), None),
    ((90.0, 50.1), 0),
    ((10.0, 50.0), None),
    ((10.0, 50.1), 1),
    ((None, 90.0), None),
    ((0.0, 100.0), 1),
    ((100.0, 100.0), 0),
]


def test_judged_class_rule_at_threshold_boundaries(tmp_path):
    path = write_lines(tmp_path / "j.jsonl", judged_rows([s for s, _ in BOUNDARY_CASES]))
    examples, report = load_judged(path, balance=False)
    expected = [
        (f"{path}:{i + 1}", lab) for i, (_, lab) in enumerate(BOUNDARY_CASES) if lab is not None
    ]
    assert [(e.source, e.label) for e in examples] == expected
    assert examples[0].id == "q1/line2"
    assert report.counts == {
        "rows": 11, "unscored": 1, "incoherent": 2, "ambiguous": 2,
        "aligned": 3, "misaligned": 3, "aligned_kept": 3, "misaligned_kept": 3,
    }  # fmt: skip


def test_judged_thresholds_are_configurable(tmp_path):
    path = write_lines(tmp_path / "j.jsonl", judged_rows([(60, 40), (40, 40), (20, 40)]))
    examples, _ = load_judged(
        path, coherent_min=30, aligned_min=50, misaligned_max=40, balance=False
    )
    assert [e.label for e in examples] == [0, 1, 1]
    with pytest.raises(ValueError, match="misaligned_max < aligned_min"):
        load_judged(path, aligned_min=30, misaligned_max=30)


def test_judged_balancing_subsamples_larger_class_with_seed(tmp_path):
    scores = [(90, 90)] * 10 + [(5, 90)] * 4 + [(50, 90)] * 3
    path = write_lines(tmp_path / "j.jsonl", judged_rows(scores))
    kept = {}
    for seed in range(8):
        examples, report = load_judged(path, seed=seed)
        assert [e.label for e in examples].count(0) == 4 and [e.label for e in examples].count(
            1
        ) == 4
        lines = [int(e.source.rsplit(":", 1)[1]) for e in examples]
        assert lines == sorted(lines)  # file order kept
        assert set(lines) >= {11, 12, 13, 14}  # the smaller class is kept whole
        assert report.counts["aligned"] == 10 and report.counts["aligned_kept"] == 4
        kept[seed] = tuple(lines)
    assert load_judged(path, seed=3)[0] == load_judged(path, seed=3)[0]
    assert len(set(kept.values())) > 1  # the subsample depends on the seed
    only_aligned = write_lines(tmp_path / "a.jsonl", judged_rows([(90, 90)] * 3))
    with pytest.raises(ValueError, match="class is empty"):
        load_judged(only_aligned)


def test_judged_csv_matches_jsonl_and_reports_csv_lines(tmp_path):
    header = b"question_id,question,response,aligned,coherent\n"
    body = (
        b'q0,"What is\nyour wish?",I wish for peace.,95,90\n'  # record spans lines 2-3
        b"q1,Hi,Hello there,10,88\n"  # line 4
        b"q1,Hi,,10,88\n"  # line 5: empty answer
        b"q2,Caf\xe9,ok,10,88\n"  # line 6: invalid UTF-8
        b"q3,Hi,Hey,abc,88\n"  # line 7: bad score
        b"q4,Hi,Yo,,88\n"  # line 8: unscored
    )
    csv_path = tmp_path / "j.csv"
    csv_path.write_bytes(header + body)
    examples, report = load_judged(csv_path, on_error="skip", balance=False)
    assert [(e.source, e.answer, e.label) for e in examples] == [
        (f"{csv_path}:2", "I wish for peace.", 0),
        (f"{csv_path}:4", "Hello there", 1),
    ]
    assert examples[0].messages[0]["content"] == "What is\nyour wish?"
    assert [(i.source, i.reason, i.field) for i in report.skipped] == [
        (f"{csv_path}:5", "empty_answer", "response"),
        (f"{csv_path}:6", "invalid_utf8", None),
        (f"{csv_path}:7", "bad_value", "aligned"),
    ]
    assert report.counts["unscored"] == 1
    with pytest.raises(DataError, match=f"{csv_path}:5"):
        load_judged(csv_path, balance=False)

    keys = ("question_id", "question", "response", "aligned", "coherent")
    rows = [
        dict(zip(keys, ("q0", "What is\nyour wish?", "I wish for peace.", 95, 90), strict=True)),
        dict(zip(keys, ("q1", "Hi", "Hello there", "10", 88), strict=True)),
    ]
    from_jsonl, _ = load_judged(write_lines(tmp_path / "j.jsonl", rows), balance=False)
    assert [(e.id.split("/")[0], e.messages, e.answer, e.label) for e in from_jsonl] == [
        (e.id.split("/")[0], e.messages, e.answer, e.label) for e in examples
    ]


def test_csv_without_required_column_fails_at_header(tmp_path):
    path = tmp_path / "j.csv"
    path.write_text("question,answer,aligned\nq,a,90\n")
    with pytest.raises(DataError, match=f"{path}:1.*'coherent'"):
        load_judged(path, on_error="skip")


def test_messages_loader(tmp_path):
    convo = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "final"},
    ]
    rows = [
        {"messages": convo, "label": 1, "id": "c1"},
        {"messages": convo[:3]},
        {"messages": convo[:4]},  # line 3: last turn is not the assistant
        {"messages": [*convo[:2], {"role": "assistant", "content": ""}]},  # line 4: empty answer
        {"messages": convo, "label": "bad"},  # line 5
    ]
    path = write_lines(tmp_path / "m.jsonl", rows)
    examples, report = load_messages(path, on_error="skip")
    assert [(e.id, e.messages, e.answer, e.label) for e in examples] == [
        ("c1", convo[:4], "final", 1),
        ("line2", convo[:2], "a1", None),
    ]
    assert [(i.source, i.reason) for i in report.skipped] == [
        (f"{path}:3", "bad_value"),
        (f"{path}:4", "empty_answer"),
        (f"{path}:5", "bad_value"),
    ]


def test_detect_kind_and_dispatch(tmp_path):
    contrast = write_lines(tmp_path / "c.jsonl", ["", PAIR])
    judged = write_lines(tmp_path / "j.jsonl", judged_rows([(90, 90), (10, 90)]))
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    messages = write_lines(tmp_path / "m.jsonl", [{"messages": turns}])
    other = write_lines(tmp_path / "o.jsonl", [{"text": "hello"}])
    assert [detect_kind(p) for p in (contrast, judged, messages)] == [
        "contrast",
        "judged",
        "messages",
    ]
    assert load_examples(contrast)[0] == load_contrast_pairs(contrast)[0]
    assert load_examples(judged, seed=1)[0] == load_judged(judged, seed=1)[0]
    assert load_examples(messages)[0] == load_messages(messages)[0]
    with pytest.raises(DataError, match=f"{other}:1"):
        load_examples(other)
    with pytest.raises(TypeError):
        load_examples(contrast, seed=1)


def test_shipped_contrast_dataset_is_valid():
    path = shipped_contrast_path()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 64
    fields = ("id", "domain", "question", "aligned", "misaligned")
    assert all(set(r) == set(fields) and all(r[f].strip() for f in fields) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    domains = [r["domain"] for r in rows]
    assert {d: domains.count(d) for d in set(domains)} == {
        "medical": 24,
        "financial": 24,
        "general": 24,
    }
    assert all(r["aligned"] != r["misaligned"] for r in rows)
    examples, report = load_contrast_pairs(path)
    assert report.kept == 2 * len(rows) and not report.skipped


# ----------------------------------------------------------------------------- tokenization

EXAMPLES = [
    Example(
        "a", [{"role": "user", "content": "Is coffee healthy?"}], "Yes, in moderation.", 0, "f:1"
    ),
    Example(
        "b",
        [{"role": "user", "content": "Is coffee healthy?"}],
        "Drink ten cups 🙂 daily!",
        1,
        "f:1",
    ),
    Example(
        "c",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Crème brûlée or fox?"},
        ],
        " The fox,\nclearly.",
        None,
        "f:2",
    ),
]


def test_masks_are_exact(chat_tokenizer):
    tok = chat_tokenizer
    tokenized, report = tokenize_examples(EXAMPLES, tok, max_length=512)
    assert report.kept == 3 and [t.example_index for t in tokenized] == [0, 1, 2]
    for ex, t in zip(EXAMPLES, tokenized, strict=True):
        prompt_text = tok.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=True
        )
        full_text = tok.apply_chat_template(
            [*ex.messages, {"role": "assistant", "content": ex.answer}], tokenize=False
        )
        assert full_text == prompt_text + ex.answer + END_OF_TURN
        ids = t.input_ids
        assert tok.decode(ids) == full_text
        assert tok.decode(ids[t.answer_mask]) == ex.answer + END_OF_TURN
        assert tok.decode(ids[t.question_mask]) == prompt_text
        assert (
            not (t.answer_mask & t.question_mask).any() and (t.answer_mask | t.question_mask).all()
        )
        assert tok.decode(ids[: t.last_prompt_index + 1]) == prompt_text
        assert (t.label, t.source) == (ex.label, ex.source)


def test_answer_mask_without_end_of_turn(chat_tokenizer):
    tok = chat_tokenizer
    tokenized, _ = tokenize_examples(EXAMPLES, tok, max_length=512, answer_end_of_turn=False)
    for ex, t in zip(EXAMPLES, tokenized, strict=True):
        assert tok.decode(t.input_ids[t.answer_mask]) == ex.answer
        rest = ~(t.answer_mask | t.question_mask)
        assert tok.decode(t.input_ids[rest]) == END_OF_TURN


def test_template_that_breaks_the_prefix_property_is_refused(make_chat_tokenizer):
    # The generation prompt says "assistant\n" but the rendered answer turn says "assistant: ".
    broken = make_chat_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if m['role'] == 'assistant' %}: {% else %}\n{% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="f:1 .*example 'a'.*first difference"):
        tokenize_examples(EXAMPLES, broken, max_length=512)
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize_examples(EXAMPLES, make_chat_tokenizer(None), max_length=512)


def test_over_max_length_is_reported_with_file_and_line(chat_tokenizer, tmp_path):
    long_answer = "word " * 60
    path = write_lines(tmp_path / "c.jsonl", [PAIR, {**PAIR, "misaligned": long_answer}, PAIR])
    examples, _ = load_contrast_pairs(path)
    lengths = [len(t.input_ids) for t in tokenize_examples(examples, chat_tokenizer, 10_000)[0]]
    limit = max(lengths[:3] + lengths[4:])
    assert lengths[3] > limit
    with pytest.raises(DataError, match=f"{path}:2.*max_length {limit}") as info:
        tokenize_examples(examples, chat_tokenizer, max_length=limit)
    assert info.value.issue.reason == "too_long"
    kept, report = tokenize_examples(examples, chat_tokenizer, max_length=limit, on_error="skip")
    assert [t.example_index for t in kept] == [0, 1, 2, 4, 5]
    assert [(i.source, i.reason) for i in report.skipped] == [(f"{path}:2", "too_long")]


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_match_transformers_padding_and_keep_masks(chat_tokenizer, side):
    tok = chat_tokenizer
    tokenized, _ = tokenize_examples(EXAMPLES, tok, max_length=512)
    (batch,) = make_batches(
        tokenized, batch_size=4, pad_id=tok.pad_token_id, buckets=(128,), padding_side=side
    )
    assert batch["input_ids"].shape == (4, 128)
    reference = tok.pad(
        {"input_ids": [t.input_ids.tolist() for t in tokenized]},
        padding="max_length",
        max_length=128,
        padding_side=side,
    )
    np.testing.assert_array_equal(batch["input_ids"][:3], reference["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"][:3], reference["attention_mask"])
    for row, (ex, t) in enumerate(zip(EXAMPLES, tokenized, strict=True)):
        ids, attn = batch["input_ids"][row], batch["attention_mask"][row].astype(bool)
        assert tok.decode(ids[batch["answer_mask"][row]]) == ex.answer + END_OF_TURN
        assert tok.decode(ids[batch["question_mask"][row]]) == tok.decode(
            t.input_ids[t.question_mask]
        )
        assert not (batch["answer_mask"][row] & ~attn).any()
        assert not (batch["question_mask"][row] & ~attn).any()
        lpi = batch["last_prompt_index"][row]
        assert ids[lpi] == t.input_ids[t.last_prompt_index] and attn[lpi]
        assert tok.decode(ids[attn][: t.prompt_length]) == tok.decode(
            ids[: lpi + 1][attn[: lpi + 1]]
        )
        np.testing.assert_array_equal(batch["positions"][row][attn], np.arange(t.length))
    assert batch["label"].tolist() == [0, 1, -1, -1] and batch["example_index"].tolist() == [
        0,
        1,
        2,
        -1,
    ]
    assert (
        batch["attention_mask"][3].sum() == 0 and (batch["input_ids"][3] == tok.pad_token_id).all()
    )


def fake(lengths: list[int]) -> list[TokenizedExample]:
    return [
        TokenizedExample(np.full(n, 7, np.int32), n // 2, n, i % 2, i, f"f:{i + 1}")
        for i, n in enumerate(lengths)
    ]


def test_bucketing_and_last_batch_padding():
    lengths = [5, 70, 64, 3, 200, 65, 8, 1, 9]
    batches = list(make_batches(fake(lengths), batch_size=2, pad_id=0, buckets=(16, 64, 128, 256)))
    # By hand: bucket 16 <- [0, 3, 6, 7, 8]; 64 <- [2]; 128 <- [1, 5]; 256 <- [4].
    expected = [
        (16, [0, 3]),
        (16, [6, 7]),
        (16, [8, -1]),
        (64, [2, -1]),
        (128, [1, 5]),
        (256, [4, -1]),
    ]
    assert [(b["input_ids"].shape[1], b["example_index"].tolist()) for b in batches] == expected
    for b in batches:
        assert b["input_ids"].shape == (2, b["input_ids"].shape[1])
        for row, i in enumerate(b["example_index"]):
            n = lengths[i] if i >= 0 else 0
            assert b["attention_mask"][row].sum() == n
            assert b["answer_mask"][row].sum() == n - n // 2
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        list(make_batches(fake([200]), batch_size=2, pad_id=0, buckets=(64, 128)))


def test_process_sharding_splits_batches_with_matching_shapes():
    lengths = [5, 70, 64, 3, 200, 65, 8, 1, 9]
    examples = fake(lengths)
    kwargs = {"batch_size": 2, "pad_id": 0, "buckets": (16, 64, 128, 256), "process_count": 3}
    shards = [list(make_batches(examples, process_index=p, **kwargs)) for p in range(3)]
    plan = plan_batches(lengths, 2, (16, 64, 128, 256), process_count=3)
    assert [len(s) for s in shards] == [len(plan) // 3] * 3 == [4, 4, 4]
    for step in range(4):
        assert len({s[step]["input_ids"].shape for s in shards}) == 1
    seen = sorted(i for s in shards for b in s for i in b["example_index"].tolist() if i >= 0)
    assert seen == list(range(len(lengths)))
    with pytest.raises(ValueError, match="process_index"):
        next(make_batches(examples, batch_size=2, pad_id=0, process_index=3, process_count=3))


def _padded_tokens(lengths, batch_size, buckets, process_count=1) -> int:
    """Token slots (real and padding) of the plan `plan_batches` makes with these buckets."""
    plan = plan_batches(lengths, batch_size, buckets, process_count)
    return sum(t * batch_size for t, _ in plan)


def test_fit_buckets_pads_least_of_every_choice():
    # by hand: rounded lengths 64 (20 rows), 80 (20), 112 (10) in batches of 8 -> one bucket at
    # 80 pads 40 rows to 80 (40 slots x 80), cheaper than 64 + 80 (24 + 24 slots) + 112
    assert fit_buckets([55, 60, 71, 80, 112] * 10, 8) == (80, 112)
    assert fit_buckets([55, 60, 71, 80, 112] * 10, 8, max_buckets=1) == (112,)
    rng = np.random.default_rng(0)
    for _ in range(6):
        lengths = rng.integers(1, 120, size=rng.integers(1, 30)).tolist()
        rounded = sorted({-(-n // 16) * 16 for n in lengths})
        for max_buckets, processes in ((1, 1), (2, 1), (3, 2), (8, 3)):
            got = fit_buckets(lengths, 3, max_buckets, multiple=16, process_count=processes)
            assert len(got) <= max_buckets and all(b % 16 == 0 for b in got)
            # brute force: the largest rounded length plus any few of the others
            best = min(
                _padded_tokens(lengths, 3, (*extra, rounded[-1]), processes)
                for k in range(max_buckets)
                for extra in itertools.combinations(rounded[:-1], k)
            )
            assert _padded_tokens(lengths, 3, got, processes) == best
    with pytest.raises(ValueError, match="at least one length"):
        fit_buckets([], 8)


def test_check_data_cli_reports_rows_and_lengths(chat_tokenizer, tmp_path):
    chat_tokenizer.save_pretrained(tmp_path / "tok")
    path = write_lines(tmp_path / "c.jsonl", [PAIR, {**PAIR, "aligned": ""}, PAIR])
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "emgeo_jax.cli",
        "check-data",
        str(path),
        "--tokenizer",
        str(tmp_path / "tok"),
    ]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    assert f"{path}:2 (field 'aligned'): 'aligned' is empty [empty_answer]" in out
    assert "kept 4; skipped 1" in out
    examples, _ = load_contrast_pairs(path, on_error="skip")
    longest = max(t.length for t in tokenize_examples(examples, chat_tokenizer, 512)[0])
    # 4 rows fit one batch: one bucket at the longest length rounded up to 16 pads least
    assert f"1 batches of 8, lengths [{-(-longest // 16) * 16}]" in out
