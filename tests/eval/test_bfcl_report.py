"""BFCL run reports: exact intervals, the leaderboard's aggregates, the table, and per-question records that
re-score to the same report."""

import importlib
import math
import sys

import pytest

from hephaestus_jax.eval import bfcl
from hephaestus_jax.eval.bfcl import CategoryScore

# ------------------------------------------------------------------------------------------------ intervals


def _binomial_tail(k_low: int, k_high: int, n: int, p: float) -> float:
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(k_low, k_high + 1))


@pytest.mark.parametrize("correct,total", [(0, 10), (10, 10), (1, 10), (5, 10), (29, 30), (7, 400)])
def test_exact_interval_is_clopper_pearson(correct, total):
    """Each end is where the binomial tail beyond the observed count is 2.5%: P(X >= k | low) = P(X <= k | high)."""
    low, high = bfcl.exact_interval(correct, total)
    assert low <= correct / total <= high
    if correct == 0:
        assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / total))
    else:
        assert _binomial_tail(correct, total, total, low) == pytest.approx(0.025, rel=1e-6)
    if correct == total:
        assert high == 1 and low == pytest.approx(0.025 ** (1 / total))
    else:
        assert _binomial_tail(0, correct, total, high) == pytest.approx(0.025, rel=1e-6)
    assert 0 < high - low  # Never empty, 0/n and n/n included.


def test_exact_interval_narrows_with_more_questions_and_rejects_nonsense():
    assert bfcl.exact_interval(50, 100)[1] - bfcl.exact_interval(50, 100)[0] < \
        bfcl.exact_interval(5, 10)[1] - bfcl.exact_interval(5, 10)[0]
    assert bfcl.exact_interval(5, 10, level=0.5)[0] > bfcl.exact_interval(5, 10)[0]
    for correct, total in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(ValueError, match="correct <= total"):
            bfcl.exact_interval(correct, total)
    with pytest.raises(ValueError, match="level"):
        bfcl.exact_interval(1, 3, level=1.0)


# ------------------------------------------------------------------------------------------------ aggregates

ALL_RUNNABLE = ("simple", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
                "irrelevance", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                "live_irrelevance", "live_relevance", "multi_turn_base", "multi_turn_miss_func",
                "multi_turn_miss_param", "multi_turn_long_context")


def _scores(categories=ALL_RUNNABLE) -> tuple[CategoryScore, ...]:
    """Distinct accuracies and sizes, so that a mean taken the wrong way (pooled for unweighted) shows."""
    return tuple(CategoryScore(category, total=10 + 7 * i, correct=(3 * i + 1) % (10 + 7 * i), missing=0)
                 for i, category in enumerate(categories))


def test_leaderboard_aggregates_follow_bfcl_definitions():
    scores = {c.category: c for c in _scores()}
    summaries = {s.name: s.accuracy for s in bfcl.leaderboard(tuple(scores.values()))}
    acc = {name: c.accuracy for name, c in scores.items()}
    simple = (acc["simple"] + acc["simple_java"] + acc["simple_javascript"]) / 3
    assert summaries["non_live_simple"] == pytest.approx(simple)
    non_live = (simple + acc["multiple"] + acc["parallel"] + acc["parallel_multiple"]) / 4
    assert summaries["non_live"] == pytest.approx(non_live)
    live_names = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
    live = sum(scores[n].correct for n in live_names) / sum(scores[n].total for n in live_names)
    assert summaries["live"] == pytest.approx(live)
    multi = sum(acc[n] for n in ALL_RUNNABLE if n.startswith("multi_turn")) / 4
    assert summaries["multi_turn"] == pytest.approx(multi)
    irrelevance = (acc["irrelevance"] + acc["live_irrelevance"]) / 2
    assert summaries["irrelevance_detection"] == pytest.approx(irrelevance)
    assert summaries["relevance_detection"] == pytest.approx(acc["live_relevance"])
    assert summaries["overall"] == pytest.approx((10 * non_live + 10 * live + 10 * irrelevance + 30 * multi) / 100)
    assert summaries["overall_without_agentic"] == pytest.approx(
        (10 * non_live + 10 * live + 10 * irrelevance + 30 * multi) / 60)


def test_an_aggregate_with_a_category_not_run_is_not_given_and_names_it():
    partial = [c for c in _scores() if c.category != "simple_java"]
    summaries = {s.name: s for s in bfcl.leaderboard(partial)}
    for name in ("non_live_simple", "non_live", "overall", "overall_without_agentic"):
        assert summaries[name].accuracy is None and summaries[name].not_run == ("simple_java",)
    assert summaries["live"].accuracy is not None and summaries["multi_turn"].accuracy is not None
    table = bfcl.format_table(bfcl.Report(tuple(partial), ()))
    assert "live   " in table and "non_live" not in table and "overall" not in table


def test_table_and_json_carry_intervals_and_aggregates():
    report = bfcl.Report(_scores(), ())
    table = bfcl.format_table(report)
    low, high = report.categories[0].interval
    assert f"[{100 * low:.2f}%, {100 * high:.2f}%]" in table
    summaries = {s.name: s.accuracy for s in report.summaries}
    assert f"{100 * summaries['overall']:.2f}%" in table
    data = report.to_dict()
    assert data["categories"]["simple"]["interval"] == [low, high]
    assert data["leaderboard"]["overall"] == summaries["overall"]
    partial = bfcl.Report(_scores(("simple", "multiple")), ()).to_dict()["leaderboard"]
    assert partial["non_live"] == {"not_run": ["simple_java", "simple_javascript", "parallel", "parallel_multiple"]}


BFCL_NAMES = {"simple": "simple_python"}  # Our name for a category, where BFCL's differs.
BFCL_COLUMNS = {  # Our aggregate -> (bfcl-eval's score file, its column).
    "non_live_simple": ("data_non_live.csv", "Simple AST"),
    "non_live": ("data_non_live.csv", "Non-Live Overall Acc"),
    "live": ("data_live.csv", "Live Overall Acc"),
    "multi_turn": ("data_multi_turn.csv", "Multi Turn Overall Acc"),
    "irrelevance_detection": ("data_overall.csv", "Irrelevance Detection"),
    "relevance_detection": ("data_overall.csv", "Relevance Detection"),
    "overall": ("data_overall.csv", "Overall Acc"),
}


def test_leaderboard_aggregates_equal_bfcl_evals_own_score_files(tmp_path, monkeypatch):
    """bfcl-eval's own leaderboard writer (eval_runner_helper.generate_leaderboard_csv), given our category scores,
    prints our aggregates. Its model table is replaced by one local model (the real one imports API clients)."""
    import csv
    import types

    pytest.importorskip("bfcl_eval", reason="pip install --no-deps bfcl-eval (README's test command)")
    local = types.SimpleNamespace(underscore_to_dot=False, display_name="ours", url="", org="", license="",
                                  input_price=None, output_price=None)
    stand_in = types.ModuleType("bfcl_eval.constants.model_config")
    stand_in.MODEL_CONFIG_MAPPING = {"ours": local}
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.delitem(sys.modules, "bfcl_eval.eval_checker.eval_runner_helper", raising=False)
    helper = importlib.import_module("bfcl_eval.eval_checker.eval_runner_helper")

    scores = _scores()
    table = {"ours": {BFCL_NAMES.get(c.category, c.category): {"accuracy": c.accuracy, "total_count": c.total}
                      for c in scores}}
    helper.generate_leaderboard_csv(table, tmp_path)
    ours = {s.name: s.accuracy for s in bfcl.leaderboard(scores)}
    for name, (file_name, column) in BFCL_COLUMNS.items():
        with open(tmp_path / file_name, newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert row[column] == f"{100 * ours[name]:.2f}%", name
