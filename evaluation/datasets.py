"""Dataset dispatch: a config's rows (kvpress row format), the scorer of its predictions, and each sample's score.

:func:`score_predictions` gives a run's headline ``score`` (0-100) and its per-task scores;
:func:`sample_scores` gives every sample's score (0-100) with the metric the headline averages, so that
averaging the samples as the headline does reproduces it (RULER: the mean over tasks of the task means, each
rounded to 2 decimals as RULER's scorer rounds them); :func:`kvpress_metrics` writes the metrics the way
kvpress's scorer of the dataset writes its ``metrics.json``.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from .config import EvalConfig

logger = logging.getLogger(__name__)


def load_rows(config: EvalConfig, tokenizer) -> pd.DataFrame:
    """The rows ``context, question, answer_prefix, answer, max_new_tokens, task`` (+ extras) of a config."""
    if config.dataset == "needle":
        from .benchmarks.needle import DEFAULT_DEPTHS, needle_rows

        depths = config.needle_depth
        depths = DEFAULT_DEPTHS if depths is None else depths if isinstance(depths, (list, tuple)) else [depths]
        rows = needle_rows(tokenizer, config.context_lengths, [float(d) for d in depths], config.seed)
    elif config.dataset == "ruler":
        from .benchmarks.ruler import generate_ruler

        frames = [
            generate_ruler(
                tokenizer,
                length,
                tasks=config.tasks,
                num_samples=config.num_samples,
                seed=config.seed,
                qa_paths=_ruler_qa_paths(config.data_dir),
                split=config.split,
            ).assign(context_length=length)
            for length in config.context_lengths
        ]
        rows = pd.concat(frames, ignore_index=True)
        # RULER's prompt is context + "\n" + question; the kvpress pipeline joins them with nothing
        rows["context"] = rows["context"] + "\n"
    elif config.dataset in ("longbench", "longbench-e"):
        from .benchmarks.longbench import load_longbench

        rows = load_longbench(_require_data_dir(config), config.tasks, e=config.dataset == "longbench-e")
    else:  # longbench-v2
        from .benchmarks.longbench import load_longbench_v2

        rows = load_longbench_v2(_require_data_dir(config))
    if config.fraction < 1:
        rows = rows.sample(frac=config.fraction, random_state=config.seed).sort_index()
    if config.dataset.startswith("longbench") and config.max_context_length:
        rows = _truncate_longbench(rows, tokenizer, config)
    return rows.reset_index(drop=True)


def _truncate_longbench(rows: pd.DataFrame, tokenizer, config: EvalConfig) -> pd.DataFrame:
    """LongBench's rule: prompts longer than the limit lose their middle (not their end)."""
    from .benchmarks.longbench import truncate_prompt

    rule = "v2" if config.dataset == "longbench-v2" else "v1"
    pairs = [
        truncate_prompt(c, q, tokenizer, int(config.max_context_length), rule=rule)
        for c, q in zip(rows["context"], rows["question"])
    ]
    return rows.assign(context=[c for c, _ in pairs], question=[q for _, q in pairs])


def score_predictions(dataset: str, df: pd.DataFrame) -> dict[str, Any]:
    """Metrics of a run: ``score`` (the headline, 0-100) plus per-task (and per-bucket) scores."""
    if dataset == "needle":
        from .benchmarks.needle import score_needle

        return score_needle(df)
    if dataset == "ruler":
        from .benchmarks.ruler import score_ruler

        per_task = _as_dict(score_ruler(df))
    elif dataset in ("longbench", "longbench-e"):
        from .benchmarks.longbench import score_longbench

        per_task = _as_dict(score_longbench(df))
    else:
        from .benchmarks.longbench import score_longbench_v2

        per_task = _as_dict(score_longbench_v2(df))
    numbers = [v for v in per_task.values() if isinstance(v, (int, float))]
    headline = per_task.get("overall", per_task.get("average", sum(numbers) / len(numbers) if numbers else 0.0))
    return {"score": float(headline), **per_task}


def sample_scores(dataset: str, df: pd.DataFrame) -> pd.Series:
    """Each sample's score (0-100), with the per-sample metric that :func:`score_predictions` averages.

    Parameters
    ----------
    dataset : str
        One of :data:`~.config.DATASETS`.
    df : pandas.DataFrame
        The dataset's rows with a ``predicted_answer`` column.

    Returns
    -------
    pandas.Series
        Named ``score``, indexed like ``df``, unrounded. RULER: the share of the references found in the
        answer (``string_match_all``) or whether any is (``string_match_part``, ``qa_*``), x100; needle: 100
        when the answer holds the number; LongBench v1 / E: LongBench's metric of the task (the best over the
        references), x100; LongBench v2: 100 when the extracted letter is the answer.

    Raises
    ------
    ValueError
        For an unknown dataset.
    """
    if dataset == "needle":
        values = [100.0 * float(ref[0] in str(pred)) for ref, pred in zip(df["answer"], df["predicted_answer"])]
    elif dataset == "ruler":
        from .benchmarks.ruler.scoring import _any_found, _as_references, _postprocess, _share_found

        values = [
            100.0
            * (_any_found if str(task).startswith("qa") else _share_found)(
                _postprocess(pred).lower(), _as_references(refs)
            )
            for task, pred, refs in zip(df["task"], df["predicted_answer"], df["answer"])
        ]
    elif dataset in ("longbench", "longbench-e"):
        from .benchmarks.longbench import sample_scores as longbench_scores

        values = list(100.0 * longbench_scores(df))
    elif dataset == "longbench-v2":
        from .benchmarks.longbench import extract_answer_v2

        values = [
            100.0 * float(letter is not None and letter == str(answer).strip())
            for letter, answer in zip(df["predicted_answer"].map(extract_answer_v2), df["answer"])
        ]
    else:
        raise ValueError(f"sample_scores: unknown dataset {dataset!r}")
    return pd.Series(values, index=df.index, dtype=float, name="score")


def kvpress_metrics(dataset: str, df: pd.DataFrame) -> dict[str, Any]:
    """:func:`score_predictions`'s metrics, with the per-task entries written as kvpress's scorer writes them.

    What kvpress 0.5.5's scorer of the dataset (``evaluation/benchmarks/*/calculate_metrics.py``) writes, and
    what is written here:

    - ``ruler``: ``{task: {"string_match": score}}`` -- the same here, each task's score (0-100, 2 decimals)
      under ``string_match``; ``score`` and ``average`` (the mean of the task scores) are added.
    - ``longbench``: one number (kvpress scores one task per run); here the per-task numbers, ``average`` and
      ``score`` (for a one-task run, ``score`` is kvpress's number).
    - ``longbench-e``: ``{"0-4k", "4-8k", "8k+"}`` -- the same keys here (the bucket means over tasks), with
      each task's buckets, ``average`` and ``score``.
    - ``longbench-v2``: ``average, easy, hard, short, medium, long`` as fractions (0-1); here the same keys as
      percentages (0-100, like every score here), plus ``overall`` (= ``average``) and ``score``.
    - ``needle``: kvpress's ``needle_in_haystack`` scorer returns a list of ROUGE scores per sample, which
      cannot hold the run's fields; here ``score``, ``needle`` and the depth x length ``grid``.

    Parameters
    ----------
    dataset : str
        One of :data:`~.config.DATASETS`.
    df : pandas.DataFrame
        The dataset's rows with a ``predicted_answer`` column.

    Returns
    -------
    dict
        JSON-serialisable metrics, ``score`` (the headline, 0-100) included.
    """
    metrics = score_predictions(dataset, df)
    if dataset == "ruler":
        tasks = {k: {"string_match": v} for k, v in metrics.items() if k not in ("score", "average")}
        return {**tasks, "score": metrics["score"], "average": metrics.get("average", metrics["score"])}
    if dataset == "longbench-v2":
        metrics.setdefault("average", metrics.get("overall", metrics["score"]))
    return metrics


def _as_dict(scores) -> dict[str, Any]:
    if isinstance(scores, pd.Series):
        return {str(k): float(v) for k, v in scores.items()}
    if isinstance(scores, pd.DataFrame):
        return {str(k): float(v) for k, v in scores.iloc[:, 0].items()}
    return dict(scores)


def _require_data_dir(config: EvalConfig) -> str:
    if not config.data_dir:
        raise ValueError(f"dataset {config.dataset!r} needs data_dir: a hub dataset name or a local path")
    return config.data_dir


def _ruler_qa_paths(data_dir: str | None) -> dict[str, str] | None:
    if not data_dir:
        return None
    from pathlib import Path

    paths = {name: Path(data_dir) / f"{name}.json" for name in ("squad", "hotpotqa")}
    return {name: str(path) for name, path in paths.items() if path.exists()} or None
