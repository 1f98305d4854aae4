"""BFCL scoring: every question of a run judged by bfcl-eval's own checker (eval/bfcl_checker.py), counted per
category, averaged, with bootstrap intervals and a plain-text table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.eval import bfcl_checker
from hephaestus_jax.eval.bfcl_files import CATEGORIES, GroundTruth, Prediction, Question
from hephaestus_jax.eval.tool_calls import parse_tool_calls


@dataclass(frozen=True)
class ItemResult:
    """The verdict on one question of a scored run."""

    id: str
    category: str
    correct: bool
    reason: str
    missing: bool
    error_type: str = ""  # BFCL's, "" when correct


@dataclass(frozen=True)
class CategoryScore:
    """Counts for one category of a scored run."""

    category: str
    total: int
    correct: int
    missing: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class Report:
    """A scored run: per-category counts, per-question verdicts, and both overall averages."""

    categories: tuple[CategoryScore, ...]
    items: tuple[ItemResult, ...]
    unknown_prediction_ids: tuple[str, ...] = ()

    @property
    def macro_accuracy(self) -> float:
        """Unweighted mean of the per-category accuracies (how BFCL summarises categories)."""
        return sum(category.accuracy for category in self.categories) / len(self.categories)

    @property
    def micro_accuracy(self) -> float:
        """Correct questions over all questions, whatever their category."""
        return self.correct / self.total

    @property
    def total(self) -> int:
        return sum(c.total for c in self.categories)

    @property
    def correct(self) -> int:
        return sum(c.correct for c in self.categories)

    @property
    def missing(self) -> int:
        return sum(c.missing for c in self.categories)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macro_accuracy": self.macro_accuracy,
            "micro_accuracy": self.micro_accuracy,
            "correct": self.correct,
            "total": self.total,
            "missing": self.missing,
            "categories": {
                c.category: {"accuracy": c.accuracy, "correct": c.correct, "total": c.total, "missing": c.missing}
                for c in self.categories
            },
            "items": [asdict(item) for item in self.items],
            "unknown_prediction_ids": list(self.unknown_prediction_ids),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def bootstrap_interval(outcomes: Sequence[bool], level: float = 0.95, samples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy: the (1-level)/2 and (1+level)/2 quantiles of the mean of
    `samples` resamples (with replacement) of the per-question outcomes."""
    if not outcomes:
        raise ValueError("no outcomes to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(outcomes, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, values.size, size=(samples, values.size))
    means = values[draws].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


# ---------------------------------------------------------------------------- scoring


def score(
    questions: Sequence[Question],
    answers: Mapping[str, GroundTruth],
    predictions: Mapping[str, Prediction],
) -> Report:
    """Score predictions (``{id: raw output or decoded calls}``) against questions and answers.

    A question without a prediction counts as wrong and is flagged ``missing``; predictions
    for ids that are not among the questions are listed in ``Report.unknown_prediction_ids``.
    """
    if not questions:
        raise ValueError("no questions to score")
    items, seen = [], set()
    for question in questions:
        if question.id in seen:
            raise ValueError(f"question {question.id!r} appears twice")
        seen.add(question.id)
        missing = question.id not in predictions
        if missing:
            verdict = bfcl_checker.Verdict(False, "missing prediction")
        else:
            try:
                verdict = bfcl_checker.check(question, _decoded(predictions[question.id]), answers.get(question.id))
            except ValueError as error:
                raise ValueError(f"question {question.id!r}: {error}") from error
        items.append(ItemResult(question.id, question.category, verdict.correct, verdict.reason, missing,
                                verdict.error_type))
    unknown = tuple(sorted(set(predictions) - seen))
    return Report(categories=_category_scores(items), items=tuple(items), unknown_prediction_ids=unknown)


def _decoded(prediction: Prediction) -> list[ToolCall] | None:
    if isinstance(prediction, str):
        return parse_tool_calls(prediction)
    if all(isinstance(call, ToolCall) for call in prediction):
        return list(prediction)
    raise TypeError(f"a prediction must be a string or a sequence of ToolCall, got {prediction!r}")


def _category_scores(items: list[ItemResult]) -> tuple[CategoryScore, ...]:
    scores = []
    for category in CATEGORIES:
        members = [item for item in items if item.category == category]
        if members:
            scores.append(
                CategoryScore(
                    category=category,
                    total=len(members),
                    correct=sum(item.correct for item in members),
                    missing=sum(item.missing for item in members),
                )
            )
    return tuple(scores)


def format_table(report: Report) -> str:
    """A plain-text table: one row per category, then the micro and macro averages."""
    width = max(len("micro average"), *(len(c.category) for c in report.categories))

    def row(label: str, accuracy: str, correct: Any, total: Any, missing: Any) -> str:
        return f"{label:<{width}}  {accuracy:>8}  {correct:>7}  {total:>5}  {missing:>7}"

    header = row("category", "accuracy", "correct", "total", "missing")
    rows = [header, "-" * len(header)]
    for c in report.categories:
        rows.append(row(c.category, _percent(c.accuracy), c.correct, c.total, c.missing))
    rows.append("-" * len(header))
    rows.append(row("micro average", _percent(report.micro_accuracy), report.correct, report.total, report.missing))
    macro = _percent(report.macro_accuracy)
    rows.append(f"{row('macro average', macro, '', '', '').rstrip()}  (mean of {len(report.categories)} categories)")
    if report.unknown_prediction_ids:
        shown = ", ".join(report.unknown_prediction_ids[:5])
        rows.append(f"note: {len(report.unknown_prediction_ids)} prediction(s) for unknown ids, e.g. {shown}")
    return "\n".join(rows)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
