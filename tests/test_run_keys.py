"""Run directories: keyed by every field that changes a run's results, refused when they hold another run,
resumable (a torn last line dropped), and finished with kvpress's files (predictions.csv, metrics.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import get_tiny_model
from pikvpress_eval import runs
from pikvpress_eval.benchmarks.longbench import LONGBENCH_TASKS
from pikvpress_eval.benchmarks.ruler import RULER_TASKS
from pikvpress_eval.config import EvalConfig, load_config
from pikvpress_eval.datasets import kvpress_metrics, sample_scores, score_predictions
from pikvpress_eval.runner import Evaluator
from pikvpress_eval.runs import (
    CONFIG,
    KEY_IF_SET,
    METRICS,
    OUTPUT_NEUTRAL,
    PREDICTIONS,
    PREDICTIONS_CSV,
    SWEEP_FIELDS,
    RunKeyError,
    key_hash,
    plan_runs,
)

from pikvpress.models import tiny_tokenizer

COMPOSED = (
    "composed_presses={mine: [{press: snapkv, window_size: 8}, {press: knorm, compression_ratio: 0.2}], "
    "other: [{press: tova}]}"
)
BASE = [
    "dataset=needle",
    "context_length=[160]",
    "needle_depth=[0.5]",
    "press_name=[snapkv, mine, other]",
    "compression_ratio=[0.5]",
    COMPOSED,
]


def directories(tmp_path: Path, *overrides: str, output: str = "out") -> dict[str, Path]:
    """The run directories of BASE + overrides, relative to their output_dir, by press."""
    config = load_config(None, [*BASE, f"output_dir={tmp_path / output}", *overrides])
    return {run.press_name: run.directory.relative_to(tmp_path / output) for run in plan_runs(config)}


# --- keys ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "data_dir=somewhere",
        "model=another-model",
        "fraction=0.5",
        "max_new_tokens=7",
        "max_context_length=100",
        "query_aware=true",
        "needle_depth=[0.25]",
        "context_length=[200]",
        "num_samples=3",
        "tasks=[needle]",
        "model_kwargs={dtype: bfloat16}",
        "seed=1",
        "split=dev",
        "max_answer_tokens=64",
    ],
)
def test_each_result_changing_field_gets_its_own_directory(tmp_path, override):
    base, changed = directories(tmp_path), directories(tmp_path, override)
    for press in base:
        assert changed[press] != base[press], (override, press)
        assert changed[press].parent == base[press].parent or override.startswith("model=")


def test_the_dataset_and_the_ratio_change_the_directory(tmp_path):
    base = directories(tmp_path)
    assert directories(tmp_path, "dataset=ruler", "tasks=null")["snapkv"] != base["snapkv"]
    # 0.5 and 0.501 share the name's "0.50" but not the key
    near = directories(tmp_path, "compression_ratio=[0.501]")["snapkv"]
    assert near.name.startswith("snapkv__0.50__") and near != base["snapkv"]


def test_a_composed_press_is_keyed_by_its_own_definition_only(tmp_path):
    base = directories(tmp_path)
    mine_changed = COMPOSED.replace("window_size: 8", "window_size: 16")
    other_changed = COMPOSED.replace("{press: tova}", "{press: knorm}")
    changed = directories(tmp_path, mine_changed)
    assert changed["mine"] != base["mine"]
    assert changed["snapkv"] == base["snapkv"] and changed["other"] == base["other"]
    changed = directories(tmp_path, other_changed)
    assert changed["other"] != base["other"]
    assert changed["mine"] == base["mine"] and changed["snapkv"] == base["snapkv"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["device=cuda:3"],
        ["prefill_reuse=false"],
        ["batch_size=4"],
        ["press_name=[snapkv, mine, other, knorm]"],  # the sweep's other presses
        ["compression_ratio=[0.25, 0.5]"],  # and its other ratios
        ["context_length=160"],  # the same value, spelled as a scalar
        ["model_kwargs={attn_implementation: null}"],  # a null model argument is no argument
    ],
)
def test_output_neutral_fields_keep_the_directory(tmp_path, overrides):
    base = directories(tmp_path)
    changed = directories(tmp_path, *overrides, output="elsewhere")  # output_dir is neutral too
    assert {p: changed[p] for p in base} == base


def test_the_key_holds_every_field_but_the_neutral_ones(tmp_path):
    config = load_config(None, [*BASE, f"output_dir={tmp_path}"])
    run = plan_runs(config)[1]
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    assert set(run.key) == (fields - set(OUTPUT_NEUTRAL) - set(SWEEP_FIELDS) - set(KEY_IF_SET)) | {
        "press_name",
        "compression_ratio",
        "press_definition",
        "press_init_command",
    }  # a field added later is in the key only when set: the directories of runs made before it keep their names
    capped = plan_runs(load_config(None, [*BASE, f"output_dir={tmp_path}", "max_answer_tokens=64"]))[1]
    assert capped.key == {**run.key, "max_answer_tokens": 64}
    assert run.key["press_definition"] == [
        {"press": "snapkv", "window_size": 8},
        {"press": "knorm", "compression_ratio": 0.2},
    ]
    assert run.directory.name == f"mine__0.50__{key_hash(run.key)}"
    assert len(key_hash(run.key)) == 8 and int(key_hash(run.key), 16) >= 0


def test_a_registered_press_whose_definition_changes_gets_a_new_key(tmp_path, monkeypatch):
    from pikvpress_eval import presses

    before = directories(tmp_path)["snapkv"]
    factory = presses.BASELINES["snapkv"]
    monkeypatch.setitem(presses.BASELINES, "snapkv", lambda r: dataclasses.replace(factory(r), window_size=3))
    assert directories(tmp_path)["snapkv"] != before


# --- stored keys ---------------------------------------------------------------------------------------------


def test_a_directory_holding_another_run_is_refused_naming_the_fields(tmp_path):
    config = load_config(None, [*BASE, f"output_dir={tmp_path}"])
    run = plan_runs(config)[0]
    run.start()
    stored = yaml.safe_load((run.directory / CONFIG).read_text())
    assert stored["run_key"]["fields"] == run.key and stored["run_key"]["hash"] in run.directory.name
    assert stored["press_name"] == "snapkv" and stored["composed_presses"] == {}
    assert stored["press_init_command"].startswith("SnapKVPress(")
    # the same directory, but what it holds was computed with other samples and another seed
    stored["run_key"]["fields"].update(num_samples=99, seed=5)
    (run.directory / CONFIG).write_text(yaml.safe_dump(stored))
    with pytest.raises(RunKeyError, match=r"differs in num_samples, seed.*num_samples: stored 99, expected 10"):
        plan_runs(config)
    with pytest.raises(RunKeyError, match="num_samples, seed"):
        run.start()
    del stored["run_key"]
    (run.directory / CONFIG).write_text(yaml.safe_dump(stored))
    with pytest.raises(RunKeyError, match="has no run_key"):
        plan_runs(config)


def test_a_run_config_yaml_reads_back_as_the_same_run(tmp_path):
    config = load_config(None, [*BASE, f"output_dir={tmp_path}"])
    run = plan_runs(config)[1]
    run.start()
    again = load_config(run.directory / CONFIG)  # press_init_command and run_key are ignored on input
    (same,) = plan_runs(again)
    assert same.directory == run.directory and same.key == run.key


# --- resume --------------------------------------------------------------------------------------------------


def test_a_torn_last_line_is_dropped_not_glued_to_the_next_record(tmp_path):
    config = load_config(None, [*BASE, f"output_dir={tmp_path}"])
    run = plan_runs(config)[0]
    run.start()
    run.record(0, "zero", kv_bytes=1, seconds=0.1)
    run.record(1, "one", kv_bytes=1, seconds=0.1)
    path = run.directory / PREDICTIONS
    with open(path, "a") as f:
        f.write('{"index": 2, "predicted_ans')  # interrupted mid-write: no newline
    resumed = plan_runs(config)[0]
    resumed.start()
    assert sorted(resumed.done) == [0, 1]
    resumed.record(2, "two", kv_bytes=1, seconds=0.1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["predicted_answer"] for r in records] == ["zero", "one", "two"]


def run_sweep(model, output_dir: Path, *extra: str):
    config = load_config(
        None,
        [
            "dataset=needle",
            "context_length=[160, 240]",
            "needle_depth=[0.5, 1.0]",
            "press_name=[no_press, knorm]",
            "compression_ratio=[0.5]",
            f"output_dir={output_dir}",
            *extra,
        ],
    )
    return config, Evaluator(config, model, tiny_tokenizer()).run()


def test_resuming_reuses_the_directories_and_redoes_only_what_is_missing(tmp_path, monkeypatch):
    model = get_tiny_model("llama")
    config, first = run_sweep(model, tmp_path)
    finished, interrupted = plan_runs(config)
    finished_mtime = (finished.directory / METRICS).stat().st_mtime_ns
    (interrupted.directory / METRICS).unlink()
    path = interrupted.directory / PREDICTIONS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")
    calls = []
    record = runs.Run.record

    def counting(self, index, *args, **kwargs):
        calls.append((self.press_name, index))
        return record(self, index, *args, **kwargs)

    monkeypatch.setattr(runs.Run, "record", counting)
    again, second = run_sweep(model, tmp_path, "prefill_reuse=false")  # an output-neutral change
    assert [r.directory for r in plan_runs(again)] == [finished.directory, interrupted.directory]
    assert calls == [("knorm", 2), ("knorm", 3)]
    assert (finished.directory / METRICS).stat().st_mtime_ns == finished_mtime
    assert [r["score"] for r in second] == [r["score"] for r in first]
    assert [r["kv_bytes"] for r in second] == [r["kv_bytes"] for r in first]


# --- kvpress's files -----------------------------------------------------------------------------------------


def test_a_finished_run_writes_kvpress_files_with_the_measurements(tmp_path):
    model = get_tiny_model("llama")
    config, results = run_sweep(model, tmp_path)
    run = plan_runs(config)[1]
    samples = pd.read_csv(run.directory / PREDICTIONS_CSV)
    records = [json.loads(line) for line in (run.directory / PREDICTIONS).read_text().splitlines()]
    assert "context" not in samples and len(samples) == len(records) == 4
    assert {
        "predicted_answer",
        "score",
        "compression_ratio",
        "question",
        "answer",
        "kv_bytes",
        "kv_bytes_read",
        "seconds",
    } <= set(samples.columns)
    assert samples["predicted_answer"].fillna("").tolist() == [r["predicted_answer"] for r in records]
    assert samples["kv_bytes"].tolist() == [r["kv_bytes"] for r in records]
    assert (samples["compression_ratio"] == 0.5).all() and samples["score"].between(0, 100).all()
    metrics = json.loads((run.directory / METRICS).read_text())
    assert metrics == results[1]
    assert {
        "score",
        "dataset",
        "model",
        "press",
        "compression_ratio",
        "num_samples",
        "kv_bytes",
        "kv_bytes_read",
        "seconds",
        "grid",
    } <= set(metrics)
    assert metrics["score"] == pytest.approx(samples["score"].mean())
    assert metrics["kv_bytes"] == pytest.approx(samples["kv_bytes"].mean())
    assert metrics["seconds"] == pytest.approx(samples["seconds"].sum())


def _ruler_rows() -> pd.DataFrame:
    """Made-up RULER rows: shares of references found of 0, 1/3, 1/2, 2/3, 1; qa matches any reference."""
    rows = [
        ("niah_single_1", ["7381"], "the number is 7381"),
        ("niah_single_1", ["1234"], "I do not know"),
        ("niah_single_1", ["555"], " 555\x07 "),
        ("niah_multivalue", ["11", "22", "33"], "11 and 33"),
        ("niah_multivalue", ["44", "55", "66"], "44"),
        ("niah_multivalue", ["a", "b"], "A"),
        ("cwe", ["x", "y", "z"], "X, Y and Z"),
        ("cwe", ["u", "v", "w"], "none"),
        ("qa_1", ["Paris", "France"], "It is paris."),
        ("qa_1", ["Rome"], "London"),
        ("qa_1", ["Oslo", "Norway"], "norway"),
    ]
    frame = pd.DataFrame(rows, columns=["task", "answer", "predicted_answer"])
    return frame.assign(context="c", question="q", index=range(len(frame)))


def test_ruler_sample_scores_average_to_the_headline():
    rows = _ruler_rows()
    scores = sample_scores("ruler", rows)
    assert scores.index.equals(rows.index) and scores.between(0, 100).all()
    assert scores.tolist()[:6] == [100.0, 0.0, 100.0, pytest.approx(200 / 3), pytest.approx(100 / 3), 50.0]
    # the headline: the mean over tasks of the task means (each rounded to 2 decimals, as RULER rounds them)
    task_means = [round(float(scores[rows["task"] == t].mean()), 2) for t in RULER_TASKS if t in set(rows["task"])]
    assert round(float(np.mean(task_means)), 2) == score_predictions("ruler", rows)["score"]


def test_needle_and_longbench_sample_scores_average_to_the_headline():
    needle = pd.DataFrame(
        {
            "answer": [["123"], ["456"], ["789"]],
            "predicted_answer": ["123", "no", "it is 789"],
            "context_length": [100, 100, 200],
            "depth": [0.0, 1.0, 0.5],
        }
    )
    assert sample_scores("needle", needle).tolist() == [100.0, 0.0, 100.0]
    assert float(sample_scores("needle", needle).mean()) == score_predictions("needle", needle)["score"]

    longbench = pd.DataFrame(
        {
            "task": ["hotpotqa", "hotpotqa", "passage_count", "trec", "trec"],
            "answer": [["Paris"], ["the Eiffel tower"], ["3"], ["Location"], ["Person"]],
            "all_classes": [None, None, None, ["Location", "Person"], ["Location", "Person"]],
            "predicted_answer": ["Paris", "Eiffel tower in Paris", "3 or 4", "Location", "Person or Location"],
            "length": [1000, 5000, 9000, 3000, 7000],
        }
    )
    for dataset, flag in (("longbench", False), ("longbench-e", True)):
        rows = longbench.assign(longbench_e=flag)
        scores = sample_scores(dataset, rows)
        assert scores.between(0, 100).all() and 0 < scores.iloc[1] < 100  # a partial F1
        task_means = [
            round(float(scores[rows["task"] == t].mean()), 2) for t in LONGBENCH_TASKS if t in set(rows["task"])
        ]
        assert round(float(np.mean(task_means)), 2) == score_predictions(dataset, rows)["score"]

    v2 = pd.DataFrame(
        {
            "answer": ["A", "B", "C", "D"],
            "difficulty": ["easy", "hard", "hard", "easy"],
            "length": ["short", "long", "medium", "short"],
            "predicted_answer": [
                "The correct answer is (A)",
                "The correct answer is C",
                "no idea",
                "**The correct answer is (D)**",
            ],
        }
    )
    scores = sample_scores("longbench-v2", v2)
    assert scores.tolist() == [100.0, 0.0, 0.0, 100.0]
    assert round(float(scores.mean()), 1) == score_predictions("longbench-v2", v2)["score"]


def test_metrics_are_written_in_kvpress_scorer_format():
    rows = _ruler_rows()
    metrics = kvpress_metrics("ruler", rows)
    headline = score_predictions("ruler", rows)
    tasks = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    assert set(tasks) == {"niah_single_1", "niah_multivalue", "cwe", "qa_1"}
    assert all(set(v) == {"string_match"} and v["string_match"] == headline[k] for k, v in tasks.items())
    assert metrics["score"] == headline["score"] == metrics["average"]
    # a kvpress script that averages the task entries it finds gets the headline
    values = [v["string_match"] for v in metrics.values() if isinstance(v, dict) and "string_match" in v]
    assert round(sum(values) / len(values), 2) == metrics["score"]
    v2 = pd.DataFrame(
        {
            "answer": ["A"],
            "difficulty": ["easy"],
            "length": ["short"],
            "predicted_answer": ["The correct answer is (A)"],
        }
    )
    assert {"average", "easy", "hard", "short", "medium", "long"} <= set(kvpress_metrics("longbench-v2", v2))


def test_a_ragged_press_draws_what_its_masked_twin_draws(tmp_path):
    """ragged_<name> gets its own directory but the per-sample seeds of <name> in the same sweep (Compactor's random
    sketch picks the same tokens), so the two can be compared answer for answer."""
    config = load_config(
        None, [*BASE, f"output_dir={tmp_path}", "press_name=[adakv_compactor, ragged_adakv_compactor, compactor]"]
    )
    runs = {run.press_name: run for run in plan_runs(config)}
    ragged, masked, other = runs["ragged_adakv_compactor"], runs["adakv_compactor"], runs["compactor"]
    assert ragged.directory != masked.directory
    assert [ragged.sample_seed(i) for i in range(3)] == [masked.sample_seed(i) for i in range(3)]
    assert ragged.sample_seed(0) != other.sample_seed(0)
