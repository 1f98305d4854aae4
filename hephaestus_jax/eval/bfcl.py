"""BFCL scoring: every question of a run judged by BFCL's own checkers, counted per category with exact intervals,
aggregated as BFCL's leaderboard aggregates them, and shown as a plain-text table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.eval import bfcl_checker, multi_turn
from hephaestus_jax.eval.bfcl_files import (CATEGORIES, INFERENCE_ERROR, Conversation, GroundTruth, Prediction, Question,
                                            is_multi_turn)
from hephaestus_jax.eval.tool_calls import parse_tool_calls


@dataclass(frozen=True)
class ItemResult:
    """The verdict on one question of a scored run, and what the model said: `turns` holds, per user turn, each
    step's raw text ("text", None when only decoded calls were given), its decoded calls ("calls", None when the
    text did not decode) and, in multi-turn categories, the execution results of a model run ("results")."""

    id: str
    category: str
    correct: bool
    reason: str
    missing: bool
    error_type: str = ""
    turns: tuple[tuple[Mapping[str, Any], ...], ...] = ()
    error: str = ""  # A multi-turn run's inference error (BFCL's), "" when none.

    def summary(self) -> dict[str, Any]:
        """The verdict alone (what a results file lists per question)."""
        return {"id": self.id, "category": self.category, "correct": self.correct, "reason": self.reason,
                "error_type": self.error_type, "missing": self.missing}

    def record(self) -> dict[str, Any]:
        """The per-question record: the verdict and every turn (one JSON line of a records file)."""
        record = {"id": self.id, "category": self.category, "turns": [list(turn) for turn in self.turns],
                  "correct": self.correct, "reason": self.reason, "error_type": self.error_type}
        return {**record, "error": self.error} if self.error else record


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

    @property
    def interval(self) -> tuple[float, float]:
        """The accuracy's 95% exact (Clopper-Pearson) interval."""
        return exact_interval(self.correct, self.total)


@dataclass(frozen=True)
class Summary:
    """One of the leaderboard's aggregate scores; `accuracy` is None when some of its categories were not run
    (`not_run` names them)."""

    name: str
    accuracy: float | None
    not_run: tuple[str, ...]


# BFCL's leaderboard aggregates (bfcl_eval/eval_checker/eval_runner_helper.py, generate_leaderboard_csv), in order:
# (name, how, parts), a part being a category or an earlier aggregate. "mean": the unweighted mean of the parts'
# accuracies; "pooled": correct over total of the parts' questions; a mapping: BFCL's fixed percentage weights.
LEADERBOARD: tuple[tuple[str, str | Mapping[str, float], tuple[str, ...]], ...] = (
    ("non_live_simple", "mean", ("simple", "simple_java", "simple_javascript")),
    ("non_live", "mean", ("non_live_simple", "multiple", "parallel", "parallel_multiple")),
    ("live", "pooled", ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")),
    ("multi_turn", "mean", ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                            "multi_turn_long_context")),
    ("irrelevance_detection", "mean", ("irrelevance", "live_irrelevance")),
    ("relevance_detection", "mean", ("live_relevance",)),
    # BFCL v4's overall gives its agentic part (web search and memory: network services, which do not run here)
    # 40 of 100; its scorer counts a part that was not run as 0, so this is the overall BFCL prints for these results.
    ("overall", {"non_live": 10, "live": 10, "irrelevance_detection": 10, "multi_turn": 30, "agentic": 40},
     ("non_live", "live", "irrelevance_detection", "multi_turn")),
    # The same weights over the parts that run here (renormalised to 60).
    ("overall_without_agentic", {"non_live": 10, "live": 10, "irrelevance_detection": 10, "multi_turn": 30},
     ("non_live", "live", "irrelevance_detection", "multi_turn")),
)


def leaderboard(categories: Sequence[CategoryScore]) -> tuple[Summary, ...]:
    """The leaderboard's aggregate scores of a run's category scores (`LEADERBOARD`)."""
    scores: dict[str, tuple[float, int]] = {c.category: (c.accuracy, c.total) for c in categories}
    not_run: dict[str, tuple[str, ...]] = {}
    summaries = []
    for name, how, parts in LEADERBOARD:
        missing = tuple(dict.fromkeys(category for part in parts for category in
                                      (not_run[part] if part in not_run else () if part in scores else (part,))))
        not_run[name] = missing
        accuracy = None
        if not missing:
            values = [scores[part] for part in parts]
            total = sum(count for _, count in values)
            if how == "mean":
                accuracy = sum(value for value, _ in values) / len(values)
            elif how == "pooled":
                accuracy = sum(value * count for value, count in values) / total
            else:
                accuracy = sum(value * how[part] for part, (value, _) in zip(parts, values)) / sum(how.values())
            scores[name] = (accuracy, total)
        summaries.append(Summary(name, accuracy, missing))
    return tuple(summaries)


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
    def summaries(self) -> tuple[Summary, ...]:
        """BFCL's leaderboard aggregates of this run (`leaderboard`)."""
        return leaderboard(self.categories)

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
                c.category: {"accuracy": c.accuracy, "interval": list(c.interval), "correct": c.correct,
                             "total": c.total, "missing": c.missing}
                for c in self.categories
            },
            "leaderboard": {s.name: s.accuracy if s.accuracy is not None else {"not_run": list(s.not_run)}
                            for s in self.summaries},
            "items": [item.summary() for item in self.items],
            "unknown_prediction_ids": list(self.unknown_prediction_ids),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def exact_interval(correct: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of an accuracy of `correct` out of `total`: never narrower than
    the truth at any accuracy, and not empty at 0/n or n/n (0/10 gives [0, 0.31])."""
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total >= 1, got {correct}/{total}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    low = 0.0 if correct == 0 else float(stats.beta.ppf(tail, correct, total - correct + 1))
    high = 1.0 if correct == total else float(stats.beta.ppf(1 - tail, correct + 1, total - correct))
    return low, high


# ---------------------------------------------------------------------------- scoring


def score(
    questions: Sequence[Question],
    answers: Mapping[str, GroundTruth],
    predictions: Mapping[str, Prediction],
) -> Report:
    """Score predictions against questions and answers with BFCL's own checkers.

    A prediction is a single-turn question's raw output text or decoded calls, or a multi-turn question's texts
    per turn and step (strings, or step records {"text", ...} as `ItemResult.record` writes them). A question
    without a prediction counts as wrong and is flagged ``missing``; predictions for ids that are not among the
    questions are listed in ``Report.unknown_prediction_ids``.
    """
    if not questions:
        raise ValueError("no questions to score")
    items, seen = [], set()
    for question in questions:
        if question.id in seen:
            raise ValueError(f"question {question.id!r} appears twice")
        seen.add(question.id)
        try:
            items.append(_judge(question, answers.get(question.id), predictions.get(question.id)))
        except ValueError as error:
            raise ValueError(f"question {question.id!r}: {error}") from error
    unknown = tuple(sorted(set(predictions) - seen))
    return Report(categories=_category_scores(items), items=tuple(items), unknown_prediction_ids=unknown)


def _judge(question: Question, ground_truth: GroundTruth | None, prediction: Prediction | None) -> ItemResult:
    if prediction is None:
        return ItemResult(question.id, question.category, False, "missing prediction", True, "missing")
    if not isinstance(prediction, Conversation):
        prediction = _conversation(question, prediction)
    turns = [[_step(step) for step in turn] for turn in prediction.turns]
    if is_multi_turn(question.category):
        if any(step["text"] is None for turn in turns for step in turn):
            raise ValueError("a multi-turn step needs its text (BFCL's checker decodes it)")
        conversation = Conversation(turns, prediction.error)
        verdict = multi_turn.check(question, ground_truth, conversation.bfcl_result())
    else:
        if len(turns) != 1 or len(turns[0]) != 1:
            raise ValueError(f"a single-turn question's prediction has {len(turns)} turn(s) of "
                             f"{[len(turn) for turn in turns]} step(s); expected one of one")
        verdict = bfcl_checker.check(question, _calls(turns[0][0]["calls"]), ground_truth)
    return ItemResult(question.id, question.category, verdict.correct, verdict.reason, False, verdict.error_type,
                      tuple(tuple(turn) for turn in turns), prediction.error)


def _conversation(question: Question, prediction: Prediction) -> Conversation:
    """A prediction in one of BFCL's result forms as a conversation."""
    if isinstance(prediction, str):
        if is_multi_turn(question.category):  # BFCL's result for a conversation that raised.
            return Conversation([], prediction.removeprefix(INFERENCE_ERROR))
        return Conversation([[{"text": prediction}]])
    if not is_multi_turn(question.category) and all(isinstance(call, ToolCall) for call in prediction):
        return Conversation([[{"text": None, "calls": [_call_json(call) for call in prediction]}]])
    return Conversation(_turns_of(prediction))


def _turns_of(prediction: Prediction) -> list[list[Any]]:
    if isinstance(prediction, str) or not all(isinstance(turn, (list, tuple)) for turn in prediction):
        raise ValueError("a multi-turn prediction must be a list of turns, each a list of steps")
    return [list(turn) for turn in prediction]


def _step(step: str | Mapping[str, Any]) -> dict[str, Any]:
    """A step record from a raw text or a record: its calls re-decoded from its text (a record without text keeps
    its decoded calls), its execution results kept."""
    record = {"text": step} if isinstance(step, str) else dict(step)
    text = record.get("text")
    if text is None and "calls" not in record:
        raise ValueError(f"a step needs its 'text' or its decoded 'calls': {step!r}")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"a step's 'text' must be a string: {step!r}")
        calls = parse_tool_calls(text)
        record["calls"] = None if calls is None else [_call_json(call) for call in calls]
    return record


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": dict(call.arguments)}


def _calls(calls: list[dict[str, Any]] | None) -> list[ToolCall] | None:
    return None if calls is None else [ToolCall(call["name"], call["arguments"]) for call in calls]


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
    """A plain-text table: one row per category with its 95% exact interval, the micro and macro averages, then
    BFCL's leaderboard aggregates of the categories that were run."""
    width = max(len("overall_without_agentic"), *(len(c.category) for c in report.categories))

    def row(label: str, accuracy: str, interval: str, correct: Any, total: Any, missing: Any) -> str:
        return f"{label:<{width}}  {accuracy:>8}  {interval:>15}  {correct:>7}  {total:>5}  {missing:>7}"

    header = row("category", "accuracy", "95% exact CI", "correct", "total", "missing")
    rows = [header, "-" * len(header)]
    for c in report.categories:
        low, high = c.interval
        rows.append(row(c.category, _percent(c.accuracy), f"[{_percent(low)}, {_percent(high)}]", c.correct,
                        c.total, c.missing))
    rows.append("-" * len(header))
    rows.append(row("micro average", _percent(report.micro_accuracy), "", report.correct, report.total,
                    report.missing))
    macro = _percent(report.macro_accuracy)
    rows.append(f"{row('macro average', macro, '', '', '', '').rstrip()}  (mean of {len(report.categories)} "
                "categories)")
    run = [summary for summary in report.summaries if summary.accuracy is not None]
    if run:
        rows.append("-" * len(header))
        rows.extend(f"{summary.name:<{width}}  {_percent(summary.accuracy):>8}  (BFCL leaderboard aggregate)"
                    for summary in run)
    if report.unknown_prediction_ids:
        shown = ", ".join(report.unknown_prediction_ids[:5])
        rows.append(f"note: {len(report.unknown_prediction_ids)} prediction(s) for unknown ids, e.g. {shown}")
    return "\n".join(rows)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
