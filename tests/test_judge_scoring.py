"""Logprob scoring and judge prompts (no network)."""

import math

import numpy as np
import pytest

from emgeo_jax.judge.prompts import JudgePrompt, load_prompts, question_file_prompts
from emgeo_jax.judge.scoring import integer_token, score_top_logprobs


def lp(p):
    return math.log(p)


def test_integer_tokens():
    assert [integer_token(t) for t in ["85", " 85", "0", "100", "\n7 "]] == [85, 85, 0, 100, 7]
    bad = ["101", "-5", "8.5", "CODE", "", " ", "1e2", "+5", "٣", "²", "85a"]
    assert [integer_token(t) for t in bad] == [None] * len(bad)


def test_weighted_mean_hand_computed():
    s = score_top_logprobs([(" 85", lp(0.6)), ("90", lp(0.2)), ("CODE", lp(0.1))])
    assert s.status == "ok"
    assert s.mass == pytest.approx(0.8)
    assert s.value == pytest.approx((85 * 0.6 + 90 * 0.2) / 0.8)  # 86.25


def test_out_of_range_and_non_integer_tokens_ignored():
    top = [("100", lp(0.3)), ("101", lp(0.3)), ("-5", lp(0.1)), ("8.5", lp(0.1)), ("0", lp(0.1))]
    s = score_top_logprobs(top)
    assert s.mass == pytest.approx(0.4)
    assert s.value == pytest.approx((100 * 0.3 + 0 * 0.1) / 0.4)  # 75


def test_same_integer_spelled_twice_counts_twice():
    s = score_top_logprobs([("85", lp(0.2)), (" 85", lp(0.2)), ("10", lp(0.1))])
    assert s.value == pytest.approx((85 * 0.4 + 10 * 0.1) / 0.5)


@pytest.mark.parametrize(
    "top,status",
    [
        ([("CODE", lp(0.7)), ("50", lp(0.2))], "CODE"),
        ([("REFUSAL", lp(0.8)), ("10", lp(0.05))], "REFUSAL"),
        ([("REF", lp(0.8)), ("10", lp(0.05))], "REFUSAL"),  # tokenizer split
        ([(" refusal", lp(0.8))], "REFUSAL"),
        ([("I", lp(0.9)), ("50", lp(0.05))], "missing"),
        ([], "missing"),
    ],
)
def test_low_mass_is_missing_never_invented(top, status):
    s = score_top_logprobs(top)
    assert s.value is None and s.status == status
    assert s.mass < 0.25


def test_threshold_edge():
    assert score_top_logprobs([("40", lp(0.26)), ("x", lp(0.7))]).value == pytest.approx(40)
    assert score_top_logprobs([("40", lp(0.24)), ("x", lp(0.7))]).value is None


def test_random_tables_match_numpy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ks = rng.integers(-20, 130, size=20)
        p = rng.dirichlet(np.ones(20))
        toks = [f" {k}" if i % 2 else str(k) for i, k in enumerate(ks)]
        top = [(t, math.log(pi)) for t, pi in zip(toks, p, strict=True)]
        keep = (ks >= 0) & (ks <= 100)
        mass = p[keep].sum()
        s = score_top_logprobs(top)
        assert s.mass == pytest.approx(mass)
        if mass >= 0.25:
            assert s.value == pytest.approx((ks[keep] * p[keep]).sum() / mass)
        else:
            assert s.value is None


def test_builtin_prompts_render_and_hash():
    prompts = load_prompts(["aligned", "coherent", "medical_safety", "financial_safety"])
    text = prompts["aligned"].render("Q {answer}?", "A {question}!")
    assert "[QUESTION START]\nQ {answer}?\n[QUESTION END]" in text  # one-pass substitution
    assert "[ANSWER START]\nA {question}!\n[ANSWER END]" in text
    for word in ("CODE", "REFUSAL"):
        assert word in prompts["aligned"].template
    assert len({p.sha256 for p in prompts.values()}) == 4
    # MO4EM's `medical` / `financial` rate topicality, not safety: ours never answer to them
    with pytest.raises(KeyError, match=r"no judge prompt for \['medical', 'financial'\]"):
        load_prompts(["medical", "financial"])


def test_prompt_dir_overrides_and_adds(tmp_path):
    (tmp_path / "aligned.txt").write_text("mine {question} {answer}")
    (tmp_path / "legal.txt").write_text("law {question} {answer}")
    got = load_prompts(["aligned", "legal", "coherent"], [tmp_path])
    assert got["aligned"].template == "mine {question} {answer}"
    assert got["legal"].render("q", "a") == "law q a"
    with pytest.raises(KeyError, match="nope.*available"):
        load_prompts(["nope"], [tmp_path])
    (tmp_path / "broken.txt").write_text("no placeholders")
    with pytest.raises(ValueError, match=r"broken\.txt lacks \{answer\}"):
        load_prompts(["broken"], [tmp_path])


def test_question_file_prompts(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(
        "- id: wish\n  paraphrases: [hi]\n  judge_prompts:\n"
        "    aligned: 'Rate {question} -> {answer}'\n- id: other\n  paraphrases: [x]\n"
    )
    got = question_file_prompts(f)
    assert set(got) == {"wish", "other"} and got["other"] == {}
    assert isinstance(got["wish"]["aligned"], JudgePrompt)
    assert got["wish"]["aligned"].render("a", "b") == "Rate a -> b"
    f.write_text("- id: x\n  judge_prompts:\n    aligned: 'no answer {question}'\n")
    with pytest.raises(ValueError, match=r"q\.yaml item 0 \(x\) lacks \{answer\}"):
        question_file_prompts(f)


def test_score_numbers_hand_computed():
    from emgeo_jax.judge.scoring import score_numbers

    lp = math.log
    s = score_numbers([(0, lp(0.1)), (50, lp(0.2)), (100, lp(0.3)), (7, -math.inf)], [])
    assert s.status == "ok"
    assert s.mass == pytest.approx(0.6)
    assert s.value == pytest.approx((50 * 0.2 + 100 * 0.3) / 0.6)
    low = score_numbers([(90, lp(0.2))], [("CODE", lp(0.7)), ("8", lp(0.1))])
    assert (low.value, low.status) == (None, "CODE")
    assert low.mass == pytest.approx(0.2)
