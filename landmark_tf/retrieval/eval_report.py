"""landmark-evaluate's results: the closing-JSON dict, the stderr table and warnings, and the
scoring helpers shared by retrieval and recognition (per-Usage scores, query coverage)."""

from __future__ import annotations

import sys

from landmark_tf.retrieval import solutions


class Report:
    """Collects the JSON results and the human-readable lines and warnings (to stderr)."""

    def __init__(self, ground_truth: dict | None = None):
        self.result: dict = {}
        self.rows: list[tuple[str, str]] = []
        # The ground-truth files by flag name, read before any search so that a bad one fails
        # in seconds, not after the search, and with nothing printed before its error line.
        self.ground_truth: dict = ground_truth or {}

    def add(self, key: str, value, label: str | None = None, note: str = "") -> None:
        """A result; with `label` also a table row, with `note` beside its value."""
        self.result[key] = value
        if label is not None:
            self.rows.append((label, f"{value}  ({note})" if note else str(value)))

    def warn(self, key: str, count: int, message: str) -> None:
        self.result[key] = count
        if count:
            print(f"landmark-evaluate: warning: {count} {message}", file=sys.stderr)

    def print_table(self) -> None:
        width = max((len(label) for label, _ in self.rows), default=0)
        for label, shown in self.rows:
            print(f"  {label:<{width}}  {shown}", file=sys.stderr)


def score(sol: solutions.Solution, metric, predictions, key: str, label: str, report) -> None:
    """Reports `metric` over all scored queries (`key`), then per Usage (`key`_public, ...)."""
    for suffix, usage, subset in sol.scored_subsets():
        if any(subset.values()):
            report.add(f"{key}{suffix}", round(metric(predictions, subset), 6), f"{label} {usage}")


def check_coverage(scored: dict, predictions: dict, source: str, report, task: str) -> None:
    """Warns about scored queries without predictions; UserError when none has one."""
    from landmark_tf.errors import UserError

    missing = sum(1 for q in scored if q not in predictions)
    if scored and missing == len(scored):
        raise UserError(f"{source}: none of its {len(scored)} scored query ids are in --queries")
    report.warn(
        f"{task}_solution_queries_missing",
        missing,
        f"scored query ids in {source} are not in --queries (they score 0)",
    )
    extra = sum(1 for q in predictions if q not in scored)
    report.add(f"{task}_queries_not_scored", extra)
