"""RULER's metrics (``string_match_all`` / ``string_match_part``) and the per-task scores of a frame."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .templates import RULER_TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


def _postprocess(prediction: Any) -> str:
    """RULER/kvpress post-processing: strip, remove ``\\x00-\\x1f``, strip."""
    if prediction is None or (isinstance(prediction, float) and math.isnan(prediction)):
        return ""
    return _CONTROL.sub("", str(prediction).strip()).strip()


def _as_references(references: Any) -> list[str]:
    if references is None:
        return []
    if isinstance(references, str):
        return [references]
    return [str(r) for r in list(references)]


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


def _mean_x100(
    predictions: Sequence[Any], references: Sequence[Any], score: Callable[[str, list[str]], float]
) -> float:
    """``score(prediction, refs)`` per sample (prediction post-processed, lower-cased), averaged, x100, 2 decimals."""
    _check_lengths(predictions, references)
    if not len(predictions):
        return 0.0
    total = 0.0
    for prediction, refs in zip(predictions, references):
        total += score(_postprocess(prediction).lower(), _as_references(refs))
    return round(total / len(predictions) * 100, 2)


def _share_found(pred: str, refs: list[str]) -> float:
    return sum(1.0 for r in refs if r.lower() in pred) / len(refs) if refs else 0.0


def _any_found(pred: str, refs: list[str]) -> float:
    return max((1.0 if r.lower() in pred else 0.0 for r in refs), default=0.0)


def string_match_all(predictions: Sequence[str | None], references: Sequence[Sequence[str] | str]) -> float:
    """RULER's ``string_match_all``: the share of references found in each prediction, x100.

    Each prediction is stripped and its characters ``\\x00``-``\\x1f`` removed; a reference counts
    when it occurs in the prediction, case-insensitively. The per-sample shares are averaged.

    Parameters
    ----------
    predictions : sequence of str
        Model outputs (None counts as empty).
    references : sequence of sequence of str
        The reference strings of each sample (a single str is one reference).

    Returns
    -------
    float
        The mean share x100, rounded to 2 decimals; 0.0 for no predictions.

    Examples
    --------
    >>> string_match_all(["1234567 and 7654321"], [["1234567", "7654321", "1111111"]])
    66.67
    """
    return _mean_x100(predictions, references, _share_found)


def string_match_part(predictions: Sequence[str | None], references: Sequence[Sequence[str] | str]) -> float:
    """RULER's ``string_match_part``: 1 when any reference is in the prediction, averaged, x100.

    Same post-processing and case-insensitive matching as :func:`string_match_all`.

    Parameters
    ----------
    predictions : sequence of str
        Model outputs (None counts as empty).
    references : sequence of sequence of str
        The reference strings of each sample (a single str is one reference).

    Returns
    -------
    float
        The mean x100, rounded to 2 decimals; 0.0 for no predictions.

    Examples
    --------
    >>> string_match_part(["It was Paris.", "no idea"], [["Paris", "London"], ["Rome"]])
    50.0
    """
    return _mean_x100(predictions, references, _any_found)


def _metric(task: str) -> Callable[[Sequence[Any], Sequence[Any]], float]:
    return string_match_part if task.startswith("qa") else string_match_all


def score_ruler(df: pd.DataFrame) -> dict[str, float]:
    """Score RULER predictions per task, with the task's metric.

    ``qa_*`` use :func:`string_match_part`; every other task uses :func:`string_match_all`.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of :func:`generate_ruler` (columns ``task`` and ``answer``) with a
        ``predicted_answer`` column.

    Returns
    -------
    dict
        ``{task: score}`` (0-100, 2 decimals) in :data:`RULER_TASKS` order (other task names after,
        sorted), plus ``"average"``: the mean of the task scores (NaN for an empty frame).

    Raises
    ------
    KeyError
        If a needed column is missing.
    """
    for column in ("task", "answer", "predicted_answer"):
        if column not in df.columns:
            raise KeyError(f"the frame has no {column!r} column")
    present = set(df["task"])
    order = [t for t in RULER_TASKS if t in present] + sorted(present - set(RULER_TASKS))
    result: dict[str, float] = {}
    for task in order:
        rows = df[df["task"] == task]
        result[task] = _metric(task)(list(rows["predicted_answer"]), list(rows["answer"]))
    result["average"] = round(float(np.mean(list(result.values()))), 2) if result else float("nan")
    return result
