"""Dataset dispatch: a config's rows (kvpress row format) and the scorer of its predictions."""

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
                tokenizer, length, tasks=config.tasks, num_samples=config.num_samples, seed=config.seed,
                qa_paths=_ruler_qa_paths(config.data_dir), split=config.split,
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
