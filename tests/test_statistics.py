"""Bootstrap intervals of task-averaged scores and paired differences (pikvpress_eval.statistics)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pytest
from pikvpress_eval.statistics import (
    aligned_samples,
    bootstrap_distribution,
    bootstrap_interval,
    paired_difference,
    task_average,
)


def binary(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return 100.0 * (rng.random(n) < p)


def frame(scores_by_task: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        [(task, i, s) for task, values in scores_by_task.items() for i, s in enumerate(values)],
        columns=["task", "index", "score"],
    )


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_task_average(seed):
    rng = np.random.default_rng(seed)
    scores = {"a": binary(rng, 0.3, 17), "b": binary(rng, 0.8, 40), "c": rng.uniform(0, 100, 9)}
    interval = bootstrap_interval(scores, seed=seed)
    assert interval.estimate == pytest.approx(np.mean([v.mean() for v in scores.values()]))
    assert interval.low < interval.estimate < interval.high
    assert interval.n == 66 and interval.n_tasks == 3 and interval.level == 0.95


def test_width_shrinks_with_one_over_sqrt_n():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (50, 200, 800):
        scores = {"a": binary(rng, 0.5, n), "b": binary(rng, 0.5, n)}
        widths[n] = bootstrap_interval(scores).half_width
    assert 1.6 < widths[50] / widths[200] < 2.5
    assert 1.6 < widths[200] / widths[800] < 2.5
    # and about the normal approximation: 1.96 x 50 / sqrt(2 tasks x n) / sqrt(2) ... for p = 0.5, two tasks
    assert widths[800] == pytest.approx(1.96 * 50 / np.sqrt(800) / np.sqrt(2), rel=0.2)


def test_the_95_interval_covers_the_true_score_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        scores = {"a": binary(rng, 0.3, 60), "b": binary(rng, 0.7, 60)}
        interval = bootstrap_interval(scores, n_boot=1000, seed=trial)
        covered += interval.low <= 50.0 <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_stratified_resampling_keeps_each_task_whole():
    # task a always scores 100, task b always 0: every stratified resample's task average is 50 exactly
    # (resampling the pooled samples would move it; so would weighting tasks by their sample count: 90.9)
    scores = {"a": np.full(50, 100.0), "b": np.zeros(5)}
    assert task_average(scores) == 50.0
    interval = bootstrap_interval(scores)
    assert (interval.estimate, interval.low, interval.high) == (50.0, 50.0, 50.0)
    assert np.all(bootstrap_distribution(scores, n_boot=500) == 50.0)


def test_task_averages_weigh_every_task_the_same():
    scores = {"a": np.full(90, 100.0), "b": np.zeros(10)}
    assert bootstrap_interval(scores).estimate == pytest.approx(50.0)


def test_seeded():
    rng = np.random.default_rng(0)
    scores = {"a": binary(rng, 0.4, 30)}
    assert bootstrap_interval(scores, seed=3) == bootstrap_interval(dict(scores), seed=3)
    assert np.array_equal(bootstrap_distribution(scores, seed=3), bootstrap_distribution(scores, seed=3))
    assert not np.array_equal(bootstrap_distribution(scores, seed=3), bootstrap_distribution(scores, seed=4))


def test_bad_inputs():
    with pytest.raises(ValueError, match="no task"):
        bootstrap_interval({})
    with pytest.raises(ValueError, match="no sample"):
        bootstrap_interval({"a": []})
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_interval({"a": [1.0, np.nan]})
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval({"a": [1.0, 2.0]}, level=95)


# --- paired differences ---------------------------------------------------------------------------------------


def test_a_run_against_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    run = frame({"a": binary(rng, 0.4, 30), "b": rng.uniform(0, 100, 12)})
    difference = paired_difference(run, run.sample(frac=1, random_state=1))  # row order does not matter
    assert (difference.estimate, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert difference.n == 42 and difference.dropped == 0


def test_paired_difference_is_the_difference_of_task_averages():
    rng = np.random.default_rng(2)
    a = {"a": binary(rng, 0.4, 30), "b": binary(rng, 0.9, 10)}
    b = {"a": binary(rng, 0.6, 30), "b": binary(rng, 0.5, 10)}
    difference = paired_difference(frame(a), frame(b))
    assert difference.estimate == pytest.approx(task_average(a) - task_average(b))
    assert difference.low <= difference.estimate <= difference.high


def test_paired_interval_is_narrower_than_unpaired_for_correlated_runs():
    rng = np.random.default_rng(3)
    a = {task: binary(rng, p, 100) for task, p in (("a", 0.5), ("b", 0.7))}
    b = {task: v.copy() for task, v in a.items()}
    for values in b.values():  # b loses 8 of a's hits per task: the same hard prompts, a little worse
        values[np.flatnonzero(values)[:8]] = 0.0
    paired = paired_difference(frame(a), frame(b))
    unpaired = np.quantile(bootstrap_distribution(a, seed=1) - bootstrap_distribution(b, seed=2), [0.025, 0.975])
    assert paired.estimate == pytest.approx(8.0)
    assert paired.high - paired.low < 0.5 * (unpaired[1] - unpaired[0])
    assert paired.low > 0 > unpaired[0]  # paired: resolved; unpaired: the interval would include 0


def test_paired_resampling_is_stratified():
    # the difference is +100 on every sample of task a and 0 on task b: every stratified resample gives 50
    a = frame({"a": np.full(10, 100.0), "b": np.zeros(40)})
    b = frame({"a": np.zeros(10), "b": np.zeros(40)})
    difference = paired_difference(a, b)
    assert (difference.estimate, difference.low, difference.high) == (50.0, 50.0, 50.0)


def test_mismatched_samples_are_dropped_with_a_warning(caplog):
    a = frame({"a": [100.0, 0.0, 100.0, 0.0], "b": [100.0, 100.0]})
    b = a[~((a["task"] == "a") & (a["index"] == 3))]  # b lacks sample (a, 3)
    b = pd.concat([b, pd.DataFrame([{"task": "c", "index": 0, "score": 0.0}])])  # and has one a lacks
    with caplog.at_level(logging.WARNING, logger="pikvpress_eval.statistics"):
        difference = paired_difference(a, b.assign(score=b["score"] - 10))
    assert "1 only in a, 1 only in b; 5 paired" in caplog.text
    assert difference.n == 5 and difference.dropped == 2 and difference.n_tasks == 2
    assert difference.estimate == pytest.approx(10.0)
    with pytest.raises(ValueError, match="different samples"):
        paired_difference(a, b, on_mismatch="raise")


def test_same_index_in_another_task_is_another_sample():
    a = frame({"a": [100.0, 0.0]})
    b = frame({"b": [100.0, 0.0]})
    with pytest.raises(ValueError, match="share no"):
        paired_difference(a, b)


def test_duplicated_samples_are_refused():
    a = frame({"a": [100.0, 0.0]})
    with pytest.raises(ValueError, match="twice"):
        paired_difference(pd.concat([a, a]), a)
    with pytest.raises(ValueError, match="on_mismatch"):
        paired_difference(a, a, on_mismatch="ignore")


def test_mappings_are_accepted():
    a = {("a", 0): 100.0, ("a", 1): 0.0, ("b", 0): 50.0}
    b = {("b", 0): 50.0, ("a", 1): 0.0, ("a", 0): 0.0}
    difference = paired_difference(a, b)
    assert difference.estimate == pytest.approx(25.0)  # task a: +50, task b: 0
    a_by_task, b_by_task, dropped = aligned_samples(a, b)
    assert list(a_by_task) == ["a", "b"] and dropped == 0
    assert list(a_by_task["a"]) == [100.0, 0.0] and list(b_by_task["a"]) == [0.0, 0.0]


def test_fast_enough_for_a_sweep():
    """300 samples x 2000 resamples x 100 runs, an interval and a paired difference each: seconds."""
    rng = np.random.default_rng(0)
    runs = [frame({f"t{k}": binary(rng, 0.5, 25) for k in range(12)}) for _ in range(100)]
    start = time.perf_counter()
    for run in runs:
        bootstrap_interval({task: group["score"].to_numpy() for task, group in run.groupby("task")})
        paired_difference(run, runs[0])
    assert time.perf_counter() - start < 20
