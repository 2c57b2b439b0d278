"""SQLite cache of judgements, so a re-run sends nothing already answered and a killed run
resumes.

One row per (judge model, sha256 of the prompt template, question, answer, metric) holding the
status, score, numeric mass, raw top logprobs (JSON) and, for failures, the reason. Each row is
committed as its judgement completes (WAL journal). Successful judgements, including CODE /
REFUSAL / missing scores, are reused; `failed` rows keep their reason but are retried. The
cache never stores request headers or keys.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    judge_model TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    metric TEXT NOT NULL,
    status TEXT NOT NULL,
    score REAL,
    mass REAL,
    top_logprobs TEXT,
    reason TEXT,
    temperature REAL,
    seed INTEGER,
    PRIMARY KEY (judge_model, prompt_sha256, question, answer, metric)
)
"""


@dataclass(frozen=True)
class CacheKey:
    """Identity of one judgement."""

    judge_model: str
    prompt_sha256: str
    question: str
    answer: str
    metric: str


@dataclass(frozen=True)
class Judgement:
    """A finished judgement. `top_logprobs` is [(token, logprob), ...] as the judge sent it."""

    status: str
    score: float | None
    mass: float | None
    top_logprobs: list[tuple[str, float]] | None
    reason: str | None
    temperature: float
    seed: int | None


class JudgeCache:
    """A judgement store in one SQLite file (`:memory:` works too). Use from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get(self, key: CacheKey) -> Judgement | None:
        """The stored successful judgement for `key`, or None (absent or failed last time)."""
        row = self._db.execute(
            "SELECT status, score, mass, top_logprobs, reason, temperature, seed FROM judgements"
            " WHERE judge_model=? AND prompt_sha256=? AND question=? AND answer=? AND metric=?"
            " AND status != 'failed'",
            _key_tuple(key),
        ).fetchone()
        if row is None:
            return None
        status, score, mass, top, reason, temperature, seed = row
        top_list = [(t, lp) for t, lp in json.loads(top)] if top is not None else None
        return Judgement(status, score, mass, top_list, reason, temperature, seed)

    def put(self, key: CacheKey, judgement: Judgement) -> None:
        """Store (replace) and commit one judgement."""
        top = None if judgement.top_logprobs is None else json.dumps(judgement.top_logprobs)
        self._db.execute(
            "INSERT OR REPLACE INTO judgements VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                *_key_tuple(key),
                judgement.status,
                judgement.score,
                judgement.mass,
                top,
                judgement.reason,
                judgement.temperature,
                judgement.seed,
            ),
        )
        self._db.commit()

    def count(self, status: str | None = None) -> int:
        """Number of stored rows, optionally only those with `status`."""
        if status is None:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
        q = "SELECT COUNT(*) FROM judgements WHERE status=?"
        return self._db.execute(q, (status,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key_tuple(key: CacheKey) -> tuple[str, str, str, str, str]:
    return (key.judge_model, key.prompt_sha256, key.question, key.answer, key.metric)
