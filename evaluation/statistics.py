"""Bootstrap intervals of a sweep's scores: one run's task-averaged score, and two runs' paired difference.

A run's headline score is RULER's: the mean over tasks of each task's mean sample score (0-100), so every
task weighs the same whatever its sample count. Its uncertainty comes from the samples: the intervals here
are percentile bootstrap intervals that resample samples *within each task* (stratified), so a resample keeps
every task's sample count and the headline keeps its definition.

Two presses run on the same prompts are compared *paired*: the difference of their task-averaged scores over
the samples both answered, with the same sample ids resampled for both (the prompts' own difficulty cancels,
so the interval is narrower than the one two independent intervals would suggest).

Every function is pure and seeded (``numpy.random.default_rng(seed)``, tasks drawn in sorted order): the same
inputs give the same interval. Resampling is vectorised per task (``n_boot x n_task`` indices at once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: per-sample scores keyed by ``(task, index)``: a mapping, or a frame with columns ``task``, ``index``, ``score``
SampleScores = pd.DataFrame | Mapping[tuple[str, Any], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval.

    Attributes
    ----------
    estimate : float
        The statistic on the observed samples (a task-averaged score, or a difference of two).
    low, high : float
        The interval's bounds (percentiles ``(1 - level) / 2`` and ``(1 + level) / 2`` of the resamples).
    level : float
        The interval's coverage, e.g. 0.95.
    n : int
        Samples the statistic is computed on (for a paired difference: the samples both runs answered).
    n_tasks : int
        Tasks (strata) among them.
    dropped : int
        Paired differences: samples only one of the two runs answered, left out (0 otherwise).
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_tasks: int
    dropped: int = 0

    @property
    def half_width(self) -> float:
        """Half the interval's width (the "±" of the estimate)."""
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval (a difference the samples resolve)."""
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 1, signed: bool = False) -> str:
        """``"41.3 [35.0, 47.5]"`` (``signed``: ``"+2.0 [-1.1, +5.0]"``)."""
        spec = f"{'+' if signed else ''}.{digits}f"
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


# --------------------------------------------------------------------------------------------------------------
def _strata(scores_by_task: Mapping[str, Any]) -> list[np.ndarray]:
    """The tasks' score arrays in sorted task order, checked (non-empty, finite)."""
    if not scores_by_task:
        raise ValueError("no task: at least one task with one sample is needed")
    strata = []
    for task in sorted(scores_by_task):
        values = np.asarray(scores_by_task[task], dtype=float).ravel()
        if values.size == 0:
            raise ValueError(f"task {task!r} has no sample")
        if not np.isfinite(values).all():
            raise ValueError(f"task {task!r} has a missing or non-finite score")
        strata.append(values)
    return strata


def _resampled_task_averages(strata: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` task averages, each over one stratified resample (with replacement) of every task."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for values in strata:
        draws = rng.integers(0, values.size, size=(n_boot, values.size))
        total += values[draws].mean(axis=1)
    return total / len(strata)


def _interval(estimate: float, resampled: np.ndarray, level: float, n: int, n_tasks: int, dropped: int = 0) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), level, n, n_tasks, dropped)


def task_average(scores_by_task: Mapping[str, Any]) -> float:
    """The mean over tasks of each task's mean sample score (RULER's headline).

    Parameters
    ----------
    scores_by_task : mapping of str to array-like
        Each task's per-sample scores.

    Returns
    -------
    float
        The task-averaged score.
    """
    return float(np.mean([values.mean() for values in _strata(scores_by_task)]))


def bootstrap_distribution(scores_by_task: Mapping[str, Any], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The task-averaged score of ``n_boot`` stratified resamples (samples redrawn within each task).

    Parameters
    ----------
    scores_by_task : mapping of str to array-like
        Each task's per-sample scores.
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_boot,)``.
    """
    return _resampled_task_averages(_strata(scores_by_task), n_boot, seed)


def bootstrap_interval(
    scores_by_task: Mapping[str, Any], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """The task-averaged score with its percentile bootstrap interval, samples resampled within each task.

    Parameters
    ----------
    scores_by_task : mapping of str to array-like
        Each task's per-sample scores (0-100).
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling.
    level : float
        Coverage of the interval.

    Returns
    -------
    Interval
        ``estimate`` = :func:`task_average`; ``low``/``high`` = percentiles of the resampled task averages.

    Raises
    ------
    ValueError
        No task, a task without samples, or a non-finite score.
    """
    strata = _strata(scores_by_task)
    estimate = float(np.mean([values.mean() for values in strata]))
    resampled = _resampled_task_averages(strata, n_boot, seed)
    return _interval(estimate, resampled, level, sum(v.size for v in strata), len(strata))


# --------------------------------------------------------------------------------------------------------------
def _as_series(scores: SampleScores, name: str) -> pd.Series:
    """Per-sample scores indexed by ``(task, index)``; duplicated keys are an error."""
    if isinstance(scores, pd.DataFrame):
        missing = {"task", "index", "score"} - set(scores.columns)
        if missing:
            raise ValueError(f"{name}: the frame has no {', '.join(sorted(missing))} column")
        keys = pd.MultiIndex.from_arrays([scores["task"].astype(str), scores["index"]], names=["task", "index"])
        series = pd.Series(scores["score"].to_numpy(dtype=float), index=keys)
    else:
        items = list(scores.items())
        if not items:
            raise ValueError(f"{name}: no sample")
        keys = pd.MultiIndex.from_tuples([(str(t), i) for (t, i), _ in items], names=["task", "index"])
        series = pd.Series([float(v) for _, v in items], index=keys)
    if series.index.has_duplicates:
        raise ValueError(f"{name}: the same (task, index) appears twice")
    return series


def aligned_samples(
    a: SampleScores, b: SampleScores, on_mismatch: Literal["drop", "raise"] = "drop"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """The scores of the samples both runs answered, per task, in the same (task, index) order.

    Parameters
    ----------
    a, b : SampleScores
        Per-sample scores keyed by ``(task, index)``.
    on_mismatch : {"drop", "raise"}
        Samples only one run answered: left out with a logged warning (``"drop"``) or a ``ValueError``.

    Returns
    -------
    tuple
        ``(a_by_task, b_by_task, dropped)``: aligned per-task arrays and the number of samples left out.

    Raises
    ------
    ValueError
        Mismatched samples with ``on_mismatch="raise"``, no shared sample, or a duplicated ``(task, index)``.
    """
    if on_mismatch not in ("drop", "raise"):
        raise ValueError(f"on_mismatch must be 'drop' or 'raise', got {on_mismatch!r}")
    sa, sb = _as_series(a, "a"), _as_series(b, "b")
    shared = sa.index.intersection(sb.index).sort_values()
    dropped = len(sa) + len(sb) - 2 * len(shared)
    if len(shared) == 0:
        raise ValueError("the two runs share no (task, index) sample: nothing to pair")
    if dropped:
        message = (
            f"the two runs answered different samples: {len(sa) - len(shared)} only in a, "
            f"{len(sb) - len(shared)} only in b; {len(shared)} paired"
        )
        if on_mismatch == "raise":
            raise ValueError(message)
        logger.warning("%s (the others are left out)", message)
    sa, sb = sa.loc[shared], sb.loc[shared]
    tasks = shared.get_level_values("task")
    a_by_task = {t: sa.to_numpy()[tasks == t] for t in sorted(set(tasks))}
    b_by_task = {t: sb.to_numpy()[tasks == t] for t in sorted(set(tasks))}
    return a_by_task, b_by_task, dropped


def paired_difference(
    a: SampleScores,
    b: SampleScores,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    on_mismatch: Literal["drop", "raise"] = "drop",
) -> Interval:
    """Task-averaged score of ``a`` minus that of ``b`` over the same samples, with a paired bootstrap interval.

    Samples are matched on ``(task, index)``; a resample draws sample ids within each task and uses them for
    both runs, so the difference of a run with itself is exactly 0 with a zero-width interval.

    Parameters
    ----------
    a, b : SampleScores
        Per-sample scores (0-100) keyed by ``(task, index)``: frames with columns ``task``, ``index``,
        ``score``, or mappings ``{(task, index): score}``.
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling.
    level : float
        Coverage of the interval.
    on_mismatch : {"drop", "raise"}
        Samples only one run answered: left out with a logged warning, and counted in ``Interval.dropped``
        (``"drop"``), or a ``ValueError`` (``"raise"``).

    Returns
    -------
    Interval
        The difference (positive: ``a`` scores higher) and its interval; ``n`` = paired samples.

    Raises
    ------
    ValueError
        See :func:`aligned_samples`; a non-finite score.
    """
    a_by_task, b_by_task, dropped = aligned_samples(a, b, on_mismatch)
    differences = {task: a_by_task[task] - b_by_task[task] for task in a_by_task}
    strata = _strata(differences)
    estimate = float(np.mean([values.mean() for values in strata]))
    resampled = _resampled_task_averages(strata, n_boot, seed)
    return _interval(estimate, resampled, level, sum(v.size for v in strata), len(strata), dropped)
