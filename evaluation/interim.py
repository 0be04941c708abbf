"""An interim report of a sweep that has not finished: every run scored on the samples that every run has done.

A long sweep (the leaderboard) runs over several sittings; its rows go round robin over the tasks
(:func:`~.runner.processing_order`), so a sweep stopped part way holds about as many samples of every task.
:func:`write_interim` takes, for each task, the samples that *every* run of the config has recorded (the first ``k`` of
each task, ``k`` the smallest count over the tasks, so the tasks weigh alike), and writes each run's results on them
to a separate directory, in the layout of finished runs (``config.yaml``, ``predictions.jsonl``, ``predictions.csv``,
``metrics.json``), so that :func:`~.report.write_report` reports them with their intervals and paired differences
exactly as it reports a finished sweep. The sweep's own directories are only read.

    python -m evaluation interim --config evaluation/configs/leaderboard.yaml      # -> results/leaderboard_interim
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from .config import EvalConfig
from .runs import CONFIG, PREDICTIONS, Run, plan_runs, read_predictions

logger = logging.getLogger(__name__)


class NothingToReport(RuntimeError):
    """No sample has been done by every run of the sweep."""


def done_by_all(runs: list[Run]) -> set[int]:
    """The row indices every run has recorded."""
    done = None
    for run in runs:
        path = run.directory / PREDICTIONS
        indices = set(read_predictions(path)[0]) if path.exists() else set()
        done = indices if done is None else done & indices
    return done or set()


def per_task(done: set[int], rows: pd.DataFrame) -> dict[str, list[int]]:
    """Each task's rows in ``done``, in their order."""
    return {task: [i for i in group.index if i in done] for task, group in rows.groupby("task", sort=False)}


def common_samples(runs: list[Run], rows: pd.DataFrame) -> list[int]:
    """The row indices every run has recorded, the same number per task (the first ``k`` of each task in the order
    the sweep runs them, ``k`` the smallest count over the tasks); rows without a task: every common row."""
    done = done_by_all(runs)
    if "task" not in rows.columns:
        return sorted(i for i in rows.index if i in done)
    tasks = per_task(done, rows)
    k = min(len(indices) for indices in tasks.values())
    return sorted(i for indices in tasks.values() for i in indices[:k])


def write_interim(config: EvalConfig, rows: pd.DataFrame, output_dir: str | Path | None = None) -> Path:
    """Write every run of ``config`` scored on :func:`common_samples` under ``output_dir`` (default: the config's
    ``output_dir`` + ``_interim``, emptied first); return that directory.

    Raises
    ------
    NothingToReport
        When some task has no sample done by every run (the message gives each task's count).
    """
    runs = plan_runs(config)
    chosen = common_samples(runs, rows)
    if not chosen:
        counts = {task: len(indices) for task, indices in per_task(done_by_all(runs), rows).items()}
        raise NothingToReport(f"no sample is done by every run in every task (samples done by every run: {counts})")
    out = Path(output_dir) if output_dir is not None else Path(f"{str(config.output_dir).rstrip('/')}_interim")
    if out.exists():
        shutil.rmtree(out)
    subset = rows.loc[chosen]
    for run in runs:
        records, _ = read_predictions(run.directory / PREDICTIONS)
        target = out / run.directory.relative_to(Path(config.output_dir))
        target.mkdir(parents=True)
        shutil.copyfile(run.directory / CONFIG, target / CONFIG)
        (target / PREDICTIONS).write_text("".join(_line(records[i]) for i in chosen))
        copy = Run(config, run.press_name, run.compression_ratio, target, {i: records[i] for i in chosen})
        copy.finish(subset)
    tasks = subset["task"].value_counts().to_dict() if "task" in subset.columns else {}
    logger.info("interim report of %d runs on %d samples %s: %s", len(runs), len(chosen), tasks, out)
    return out


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"
