"""The common example record, row-level errors and the report of what was kept or skipped.

Every loader turns its rows into `Example`s. A row that cannot be used (missing field, empty
answer, invalid UTF-8, bad JSON, over the maximum length, ...) becomes an `Issue` naming the
file, line and field. With `on_error="raise"` the first issue raises `DataError`; with
`on_error="skip"` the row is skipped and the issue is kept in the `DataReport`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OnError = Literal["raise", "skip"]

ALIGNED, MISALIGNED = 0, 1


@dataclass(frozen=True)
class Example:
    """One prompt with one assistant answer.

    Attributes:
      id: unique within its file (contrast pairs: `"{pair_id}/aligned"`, `"{pair_id}/misaligned"`).
      messages: the prompt turns, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
        ending with a user turn; the answer is NOT included.
      answer: the assistant reply whose tokens are the answer tokens.
      label: 1 = misaligned, 0 = aligned, None = unlabelled.
      source: `"path:line"` of the row the example came from.
    """

    id: str
    messages: list[dict[str, str]]
    answer: str
    label: int | None
    source: str


@dataclass(frozen=True)
class Issue:
    """Why one row was unusable. `reason` is a short machine-readable kind, e.g.
    `missing_field`, `empty_answer`, `invalid_utf8`, `bad_json`, `bad_value`, `duplicate_id`,
    `too_long`."""

    source: str
    reason: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.source} (field {self.field!r})" if self.field else self.source
        return f"{where}: {self.message} [{self.reason}]"


class DataError(ValueError):
    """A bad row; `issue` says where (file:line, field) and why."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(str(issue))
        self.issue = issue


@dataclass
class DataReport:
    """What a loader or the tokenizer kept and skipped.

    Attributes:
      kept: number of examples produced.
      skipped: one `Issue` per skipped row (only filled with `on_error="skip"`).
      counts: loader-specific tallies (e.g. the judged-class counts before and after balancing).
    """

    kept: int = 0
    skipped: list[Issue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def record(self, issue: Issue, on_error: OnError) -> None:
        """Raise `DataError(issue)` (`on_error="raise"`) or remember it as skipped (`"skip"`)."""
        if on_error == "raise":
            raise DataError(issue)
        self.skipped.append(issue)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(issue.reason for issue in self.skipped))

    def summary(self) -> str:
        """One line: kept, skipped by reason, and the extra counts."""
        parts = [f"kept {self.kept}", f"skipped {len(self.skipped)}"]
        if self.skipped:
            parts[-1] += " (" + ", ".join(f"{k}: {v}" for k, v in self.skipped_by_reason().items())
            parts[-1] += ")"
        parts += [f"{k} {v}" for k, v in self.counts.items()]
        return "; ".join(parts)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
