"""The interim report of an unfinished sweep (pikvpress_eval.interim): every run scored on the samples all runs have
done, the same number per task, in the finished runs' layout, reported with intervals."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pikvpress_eval.config import load_config
from pikvpress_eval.interim import NothingToReport, common_samples, write_interim
from pikvpress_eval.report import write_report
from pikvpress_eval.runner import Evaluator
from pikvpress_eval.runs import METRICS, PREDICTIONS, plan_runs

from pikvpress.models import tiny_model, tiny_tokenizer

TASKS = ["niah_single_1"] * 3 + ["niah_single_2"] * 3 + ["fwe"] * 2


def rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "context": [f"The number {i} is special. " * 6 for i in range(len(TASKS))],
            "question": ["Which number is special?"] * len(TASKS),
            "answer_prefix": [""] * len(TASKS),
            "answer": [[str(i)] for i in range(len(TASKS))],
            "max_new_tokens": [2] * len(TASKS),
            "task": TASKS,
        }
    )


def sweep(tmp_path):
    config = load_config(
        None,
        [
            "dataset=ruler",
            "press_name=[no_press, knorm, snapkv]",
            "compression_ratio=[0.25, 0.5]",
            f"output_dir={tmp_path / 'sweep'}",
        ],
    )
    Evaluator(config, tiny_model("llama"), tiny_tokenizer()).run(rows())
    return config


def cut(run, keep: int) -> None:
    """The run as an interruption leaves it: its first ``keep`` records, no metrics."""
    path = run.directory / PREDICTIONS
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:keep]) + lines[keep][:10])  # and a torn line
    (run.directory / METRICS).unlink()


def test_interim_scores_every_run_on_the_samples_all_have_done(tmp_path):
    config = sweep(tmp_path)
    runs = plan_runs(config)
    full = {run.directory.name: json.loads((run.directory / METRICS).read_text()) for run in runs}
    cut(runs[1], 5)  # rows run round robin: 0, 3, 6, 1, 4 | 7, 2, 5
    cut(runs[2], 4)  # 0, 3, 6, 1
    assert common_samples(runs, rows()) == [0, 3, 6]  # one per task: niah_single_1 has 0 and 1, fwe only 6
    out = write_interim(config, rows())
    assert out == tmp_path / "sweep_interim"
    interim = {p.parent.name: json.loads(p.read_text()) for p in out.rglob(METRICS)}
    assert interim.keys() == full.keys()
    for name, metrics in interim.items():
        assert metrics["num_samples"] == 3
        directory = next(p.parent for p in out.rglob(METRICS) if p.parent.name == name)
        lines = [json.loads(line) for line in (directory / PREDICTIONS).read_text().splitlines()]
        assert [r["index"] for r in lines] == [0, 3, 6]
        scored = pd.read_csv(directory / "predictions.csv")
        assert len(scored) == 3 and set(scored["task"]) == set(TASKS)
    # the sweep's own directories are untouched: the cut runs resume from where they stopped
    assert not (runs[1].directory / METRICS).exists()
    assert len((runs[2].directory / PREDICTIONS).read_text().splitlines()) == 5  # 4 whole lines and the torn one
    report = write_report(out)
    assert "no_press" in report.read_text()


def test_interim_needs_a_sample_done_by_every_run(tmp_path):
    config = sweep(tmp_path)
    runs = plan_runs(config)
    path = runs[0].directory / PREDICTIONS
    path.write_text("")
    (runs[0].directory / METRICS).unlink()
    with pytest.raises(NothingToReport, match="no sample is done by every run in every task"):
        write_interim(config, rows())
