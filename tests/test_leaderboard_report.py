"""The leaderboard report on fabricated run directories (config.yaml, predictions.csv, metrics.json; made up here,
not measured): intervals, per-sample bf16 fractions, the best kvpress press at the same ratio and at the same
bytes, masks-only markers, channel pruning in its own table, timing, plots, the smoke-test sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pikvpress_eval import presses, report
from pikvpress_eval.report import RunResult, best_kvpress_at_bytes, best_kvpress_at_ratio, write_report
from pikvpress_eval.statistics import Interval

TASKS = ("niah_single_1", "vt")
COMPOSED = {"pikv_int4": [{"press": "pikv", "compression": {"bits": 4}}]}


@pytest.fixture(autouse=True)
def press_sets(monkeypatch):
    """The press sets as the report reads them (whether or not presses.py declares them yet)."""
    monkeypatch.setattr(presses, "MASKS_ONLY", frozenset({"adakv_expected_attention"}), raising=False)
    monkeypatch.setattr(presses, "CHANNEL_PRUNING", frozenset({"think"}), raising=False)


def write_run(
    root: Path,
    press: str,
    ratio: float,
    hits: int,
    held: float | list[float],
    per_task: int = 20,
    read: float | None = None,
    split: str = "test",
    drop: int = 0,
) -> Path:
    """One finished run: sample ``i`` of each task scores 100 when ``i < hits`` (nested: runs are correlated),
    holds ``held`` x a bf16 cache (one value, or one per sample), and, with ``read``, read that fraction."""
    directory = root / "ruler" / "model" / f"{press}__{ratio:.2f}"
    directory.mkdir(parents=True)
    config = {
        "dataset": "ruler",
        "model": "model",
        "press_name": press,
        "compression_ratio": ratio,
        "context_length": 1024,
        "tasks": list(TASKS),
        "num_samples": per_task,
        "split": split,
        "seed": 0,
        "composed_presses": COMPOSED,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for t, task in enumerate(TASKS):
        for i in range(per_task):
            index = t * per_task + i
            tokens = 1000 + 37 * index
            bf16 = tokens * 1024.0
            fraction = held[index] if isinstance(held, list) else held
            row = {
                "index": index,
                "task": task,
                "predicted_answer": "x",
                "score": 100.0 * (i < hits),
                "kv_bytes": fraction * bf16,
                "seconds": 0.1,
                "context_tokens": tokens,
                "bf16_kv_bytes": bf16,
            }
            if read is not None:
                row["kv_bytes_read"] = read * bf16
            rows.append(row)
    samples = pd.DataFrame(rows).iloc[drop:]
    samples.to_csv(directory / "predictions.csv", index=False)
    metrics = dict(
        score=100.0 * hits / per_task,
        press=press,
        compression_ratio=ratio,
        num_samples=len(samples),
        dataset="ruler",
        model="model",
        kv_bytes=float(samples["kv_bytes"].mean()),
        seconds=1.0,
        **{task: 100.0 * hits / per_task for task in TASKS},
    )
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


#: (press, ratio, hits of 20 per task, bf16 fraction held)
SWEEP = [
    ("no_press", 0.0, 15, 2.0),
    ("knorm", 0.5, 12, 1.0),
    ("snapkv", 0.5, 14, 1.0),
    ("adakv_expected_attention", 0.5, 13, 2.0),
    ("pikv_int4", 0.5, 14, 0.3),
    ("think", 0.5, 11, 1.5),
    ("knorm", 0.75, 8, 0.5),
    ("snapkv", 0.75, 10, 0.5),
    ("knorm", 0.85, 4, 0.3),
    ("snapkv", 0.85, 7, 0.305),  # within 2% of pikv_int4's 0.3: "the same bytes"
]


@pytest.fixture
def sweep(tmp_path) -> Path:
    for press, ratio, hits, held in SWEEP:
        write_run(tmp_path, press, ratio, hits, held)
    return tmp_path


def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path.parent / "report.csv").set_index(["press", "compression_ratio"])


def markdown_row(text: str, press: str, ratio: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] == press and cells[2] == ratio:
            return cells
    raise AssertionError(f"no row {press} @ {ratio}")


def test_table_shows_scores_with_intervals_and_n(sweep):
    path = write_report(sweep)
    text = path.read_text()
    assert "score [95% CI]" in text and "95% bootstrap intervals" in text
    row = markdown_row(text, "snapkv", "0.50")
    assert row[3].startswith("70.0 [") and row[4] == "40"
    csv = table(path)
    for (press, ratio), r in csv.iterrows():
        assert r["score_low"] <= r["score"] <= r["score_high"], (press, ratio)
        assert r["score_high"] - r["score_low"] > 5  # 40 binary samples: a wide interval
    assert csv.loc[("no_press", 0.0), "score"] == pytest.approx(75.0)


def test_states_n_tasks_split_and_smoke_test(sweep):
    text = write_report(sweep).read_text()
    assert "N = 40 prompts per point" in text
    assert "tasks (2): niah_single_1, vt" in text and "split: test" in text
    head = text.split("## ")[0]
    assert "smoke test: 40 prompts per point, 95% intervals about ±" in head
    assert "the leaderboard (docs/leaderboard.md) is the measured result" in head


def test_no_smoke_test_sentence_for_a_measured_sweep(tmp_path):
    write_run(tmp_path, "no_press", 0.0, 30, 2.0, per_task=50)
    write_run(tmp_path, "knorm", 0.5, 20, 1.0, per_task=50)
    text = write_report(tmp_path).read_text()
    assert "N = 100 prompts per point" in text and "smoke test" not in text


def test_bf16_fractions_are_averaged_per_sample(tmp_path):
    # two tasks x 2 samples; the fractions of the first two samples are small on small caches: the mean of the
    # per-sample fractions (0.5) differs from the fraction of the mean bytes
    held = [0.1, 0.9, 0.1, 0.9]
    write_run(tmp_path, "no_press", 0.0, 1, 2.0, per_task=2)
    run = write_run(tmp_path, "knorm", 0.5, 1, held, per_task=2, read=0.25)
    samples = pd.read_csv(run / "predictions.csv")
    pooled = samples["kv_bytes"].sum() / samples["bf16_kv_bytes"].sum()
    assert abs(pooled - 0.5) > 0.001
    path = write_report(tmp_path)
    csv = table(path)
    assert csv.loc[("knorm", 0.5), "held_bf16_fraction"] == pytest.approx(0.5)
    assert csv.loc[("knorm", 0.5), "read_bf16_fraction"] == pytest.approx(0.25)
    assert csv.loc[("no_press", 0.0), "held_bf16_fraction"] == pytest.approx(2.0)
    assert math.isnan(csv.loc[("no_press", 0.0), "read_bf16_fraction"])  # no kv_bytes_read column: blank
    row = markdown_row(path.read_text(), "knorm", "0.50")
    assert "0.500" in row and "0.250" in row


def test_best_kvpress_at_the_same_ratio_and_bytes(sweep):
    path = write_report(sweep)
    csv = table(path)
    pikv = csv.loc[("pikv_int4", 0.5)]
    assert pikv["family"] == "pikvpress"
    # at 0.5: snapkv (70) over adakv (65) and knorm (60); pikv itself and think (channel pruning) are not kvpress
    assert pikv["best_kvpress_at_ratio"] == "snapkv"
    # at most 0.3 x 1.02 of bf16: knorm@0.85 (20) and snapkv@0.85 (held 0.305, within 2%; 35)
    assert pikv["best_kvpress_at_bytes"] == "snapkv@0.85"
    assert pikv["vs_best_kvpress_at_bytes"] == pytest.approx(70.0 - 35.0)
    assert pikv["vs_best_kvpress_at_ratio"] == pytest.approx(0.0)
    assert pikv["vs_no_press"] == pytest.approx(70.0 - 75.0)
    assert csv.loc[("knorm", 0.5), "best_kvpress_at_bytes"] == "snapkv@0.50"
    assert csv.loc[("adakv_expected_attention", 0.5), "best_kvpress_at_bytes"] == "snapkv@0.50"
    assert csv.loc[("knorm", 0.75), "best_kvpress_at_ratio"] == "snapkv"
    assert csv.loc[("knorm", 0.75), "vs_best_kvpress_at_ratio"] == pytest.approx(-10.0)
    text = path.read_text()
    row = markdown_row(text, "pikv_int4", "0.50")
    assert row[6].endswith("vs snapkv") and row[7].startswith("+35.0 [") and row[7].endswith("vs snapkv@0.85")
    assert markdown_row(text, "snapkv", "0.50")[6] == "(is the best)"
    assert markdown_row(text, "knorm", "0.50")[5].startswith("-15.0 [")  # against no press, paired


def _run(press: str, ratio: float, score: float, held: float, family: str = "kvpress") -> RunResult:
    run = RunResult(Path(press), {}, {"press": press, "compression_ratio": ratio, "score": score}, None, family)
    run.held_fraction = held
    return run


def test_best_choices_follow_score_ratio_tolerance_and_family():
    runs = [
        _run("a", 0.5, 60, 1.0),
        _run("b", 0.5, 65, 1.0),
        _run("c", 0.75, 80, 0.511),  # just above 0.5 x 1.02: not "the same bytes" as a 0.5 run
        _run("d", 0.75, 50, 0.509),
        _run("p", 0.5, 90, 0.5, family="pikvpress"),
        _run("x", 0.5, 99, 0.1, family="other"),
    ]
    channel = _run("t", 0.5, 95, 0.1)
    channel.channel_pruning = True
    runs.append(channel)
    pikv = runs[4]
    assert best_kvpress_at_ratio(pikv, runs).press == "b"
    assert best_kvpress_at_bytes(pikv, runs).press == "d"
    assert best_kvpress_at_bytes(pikv, runs, tolerance=0.03).press == "c"
    assert best_kvpress_at_bytes(_run("q", 0.9, 10, 0.2), runs) is None
    assert best_kvpress_at_bytes(_run("q", 0.9, 10, math.nan), runs) is None


def test_masks_only_marker_and_channel_pruning_table(sweep):
    text = write_report(sweep).read_text()
    leaderboard, channel = text.split("### Channel pruning")
    channel = channel.split("###")[0]
    assert "masks only: frees no memory" in markdown_row(leaderboard, "adakv_expected_attention", "0.50")
    assert "masks only" not in " ".join(markdown_row(leaderboard, "snapkv", "0.50"))
    assert "| think" not in leaderboard.split("### Ranking")[0]
    assert markdown_row(channel, "think", "0.50")[3].startswith("55.0 [")
    assert "| snapkv" not in channel
    csv = table(Path(sweep) / "report.md")
    assert bool(csv.loc[("think", 0.5), "channel_pruning"]) and bool(
        csv.loc[("adakv_expected_attention", 0.5), "masks_only"]
    )


def test_ranking_in_words(tmp_path):
    # 100 samples per task, nested hits: pikv_int4 answers every sample snapkv answers and 10 more per task
    write_run(tmp_path, "no_press", 0.0, 80, 2.0, per_task=100)
    write_run(tmp_path, "snapkv", 0.5, 60, 1.0, per_task=100)
    write_run(tmp_path, "pikv_int4", 0.5, 70, 0.3, per_task=100)
    write_run(tmp_path, "snapkv", 0.75, 40, 0.5, per_task=100)
    write_run(tmp_path, "pikv_int4", 0.75, 41, 0.2, per_task=100)
    write_run(tmp_path, "knorm", 0.9, 30, 0.2, per_task=100)
    write_run(tmp_path, "pikv_int4", 0.9, 20, 0.1, per_task=100)
    text = write_report(tmp_path).read_text()
    assert "best PiKV configuration pikv_int4 beats the best kvpress press snapkv: +10.0 [" in text
    assert "best PiKV configuration pikv_int4 is within noise of the best kvpress press snapkv: +1.0 [" in text
    assert "best PiKV configuration pikv_int4 loses to the best kvpress press knorm: -10.0 [" in text
    assert "- ratio 0.50: 1. pikv_int4 (pikvpress) 70.0 [" in text


def test_mismatched_samples_are_paired_on_the_shared_ones(tmp_path, caplog):
    write_run(tmp_path, "no_press", 0.0, 15, 2.0, drop=5)  # 5 samples of the first task missing
    write_run(tmp_path, "knorm", 0.5, 12, 1.0)
    text = write_report(tmp_path).read_text()
    assert markdown_row(text, "no_press", "0.00")[4] == "35"
    row = markdown_row(text, "knorm", "0.50")
    assert row[4] == "40" and row[5].endswith("(n=35)")
    assert "left out" in caplog.text
    # on the 35 shared samples: task 1 keeps samples 5-19 (no press 10 hits, knorm 7), task 2 all 20 (15, 12)
    expected = ((7 - 10) / 15 + (12 - 15) / 20) / 2 * 100
    assert table(tmp_path / "report.md").loc[("knorm", 0.5), "vs_no_press"] == pytest.approx(expected)


def test_timing_columns(sweep):
    records = [
        {
            "press": "pikv_int4",
            "compression_ratio": 0.5,
            "context_length": 4096,
            "prefill_seconds": 9.0,
            "decode_seconds_per_token": 0.5,
            "prefill_vs_no_press": 9.0,
            "decode_vs_no_press": 9.0,
            "repeats": 3,
        },
        {
            "press": "no_press",
            "compression_ratio": 0.0,
            "context_length": 1024,
            "prefill_seconds": 1.0,
            "decode_seconds_per_token": 0.1,
            "prefill_vs_no_press": 1.0,
            "decode_vs_no_press": 1.0,
            "repeats": 3,
        },
        {
            "press": "pikv_int4",
            "compression_ratio": 0.5,
            "context_length": 1024,
            "prefill_seconds": 1.3,
            "decode_seconds_per_token": 0.07,
            "prefill_vs_no_press": 1.3,
            "decode_vs_no_press": 0.7,
            "repeats": 3,
        },
    ]
    (sweep / "timing.json").write_text(json.dumps(records))
    path = write_report(sweep)
    text = path.read_text()
    assert "prefill vs no press" in text and "decode/token vs no press" in text
    row = markdown_row(text, "pikv_int4", "0.50")
    assert "1.30x" in row and "0.70x" in row
    csv = table(path)
    assert csv.loc[("pikv_int4", 0.5), "decode_vs_no_press"] == pytest.approx(0.7)  # 1024 tokens, not 4096
    assert math.isnan(csv.loc[("knorm", 0.5), "prefill_vs_no_press"])  # not timed: blank
    assert markdown_row(text, "knorm", "0.50")[-3:-1] == ["", ""]


def test_no_timing_columns_without_timing_json(sweep):
    assert "prefill vs no press" not in write_report(sweep).read_text()


def test_plots_are_written(sweep):
    text = write_report(sweep).read_text()
    pngs = sorted(p.name for p in sweep.glob("*.png"))
    assert any(p.startswith("pareto_ruler_model_1024_test") for p in pngs)
    assert any(p.startswith("scores_ruler_model_1024_test") for p in pngs)
    for name in pngs:
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_pareto_plot_draws_held_fraction_on_log_x_with_error_bars(sweep, monkeypatch):
    import matplotlib.axes

    calls = []
    original = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((self, list(x), list(y), kwargs.get("yerr")))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    write_report(sweep)
    pareto = [c for c in calls if c[0].get_xlabel().startswith("KV bytes held")]
    assert pareto and all(axes.get_xscale() == "log" for axes, *_ in pareto)
    by_x = {tuple(np.round(x, 3)): (y, yerr) for _, x, y, yerr in pareto}
    assert (0.3, 0.5, 1.0) in by_x  # knorm across its ratios, by bytes held
    assert by_x[(0.3, 0.5, 1.0)][0] == pytest.approx([20.0, 40.0, 60.0])
    assert by_x[(0.3, 0.5, 1.0)][1] is not None and np.all(np.asarray(by_x[(0.3, 0.5, 1.0)][1]) > 0)


def test_runs_without_predictions_csv_keep_the_old_report(tmp_path):
    for press, ratio, score in (("no_press", 0.0, 80.0), ("knorm", 0.5, 55.0)):
        directory = tmp_path / "needle" / "m" / f"{press}__{ratio:.2f}"
        directory.mkdir(parents=True)
        (directory / "predictions.jsonl").write_text(
            json.dumps({"index": 0, "predicted_answer": "x", "kv_bytes": 100, "seconds": 1}) + "\n"
        )
        (directory / "metrics.json").write_text(
            json.dumps(
                {
                    "dataset": "needle",
                    "model": "m",
                    "press": press,
                    "compression_ratio": ratio,
                    "num_samples": 4,
                    "score": score,
                    "kv_bytes": 2**20 * (1 - ratio),
                    "seconds": 1.0,
                }
            )
        )
    text = write_report(tmp_path).read_text()
    row = markdown_row(text, "knorm", "0.50")
    assert row[3] == "55.0" and row[5] == ""  # no interval, no paired difference
    assert "MiB (0.50x)" in text  # the raw measurements as before
    assert "smoke test: 4 prompts per point, 95% intervals not computed" in text
    assert any(p.name.startswith("scores_needle") for p in tmp_path.glob("*.png"))
    assert not list(tmp_path.glob("pareto_*.png"))  # no bf16 bytes: no Pareto view


def test_intervals_are_seeded(sweep):
    first = (write_report(sweep).parent / "report.csv").read_text()
    assert (write_report(sweep).parent / "report.csv").read_text() == first


def test_report_module_reads_press_sets_lazily(monkeypatch):
    monkeypatch.delattr(presses, "MASKS_ONLY")
    monkeypatch.delattr(presses, "CHANNEL_PRUNING")
    assert report.classify("adakv_expected_attention") == ("kvpress", False, False)
    assert report.classify("pikv_int4", COMPOSED) == ("pikvpress", False, False)
    assert report.classify("no_press") == ("none", False, False)


def test_interval_formatting():
    assert Interval(2.0, -1.04, 5.0, 0.95, 10, 1).format(signed=True) == "+2.0 [-1.0, +5.0]"


def _two_length_run(root: Path, press: str, ratio: float, hits: int, shuffle: int | None = None) -> None:
    """RULER over two context lengths in one run: each length numbers its samples per task from 0."""
    directory = root / "ruler" / "model" / f"{press}__{ratio:.2f}"
    directory.mkdir(parents=True)
    config = {
        "dataset": "ruler",
        "model": "model",
        "press_name": press,
        "compression_ratio": ratio,
        "context_length": [512, 1024],
        "tasks": ["vt"],
        "split": "dev",
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {
            "index": i,
            "task": "vt",
            "context_length": length,
            "score": 100.0 * (i < hits - (length == 1024)),
            "kv_bytes": 1.0,
            "bf16_kv_bytes": 1.0,
        }
        for length in (512, 1024)
        for i in range(10)
    ]
    samples = pd.DataFrame(rows)
    if shuffle is not None:
        samples = samples.sample(frac=1, random_state=shuffle)
    samples.to_csv(directory / "predictions.csv", index=False)
    metrics = {
        "dataset": "ruler",
        "model": "model",
        "press": press,
        "compression_ratio": ratio,
        "num_samples": 20,
        "score": float(samples["score"].mean()),
        "kv_bytes": 1.0,
        "seconds": 1.0,
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_samples_are_keyed_by_context_length_when_a_run_holds_several(tmp_path, caplog):
    _two_length_run(tmp_path, "no_press", 0.0, 8)
    _two_length_run(tmp_path, "knorm", 0.5, 5, shuffle=0)  # another row order: matched by key, not position
    text = write_report(tmp_path).read_text()
    assert "context length: 512, 1024 tokens" in text
    knorm = table(tmp_path / "report.md").loc[("knorm", 0.5)]
    assert knorm["vs_no_press"] == pytest.approx(-30.0) and knorm["n"] == 20
    assert knorm["vs_no_press_low"] < -30.0 < knorm["vs_no_press_high"] < 0
    assert "repeat" not in caplog.text and "left out" not in caplog.text


def test_held_and_read_fractions_count_the_cache_as_a_bf16_run_holds_it():
    """With kv_bytes_bf16, held / bf16 is the bf16-run bytes over the bf16 prefill (no press: 1.00), and the
    bytes read are scaled by the same per-sample factor; without it the float32 bytes are used (2.00)."""
    from pikvpress_eval.report import _per_sample_fraction

    samples = pd.DataFrame(
        {
            "kv_bytes": [400.0, 800.0],  # float32 caches
            "kv_bytes_bf16": [200.0, 300.0],  # the second holds int codes: not exactly half
            "kv_bytes_read": [440.0, 880.0],
            "bf16_kv_bytes": [200.0, 400.0],
        }
    )
    assert _per_sample_fraction(samples, "kv_bytes") == pytest.approx((200 / 200 + 300 / 400) / 2)
    assert _per_sample_fraction(samples, "kv_bytes_read") == pytest.approx((220 / 200 + 330 / 400) / 2)
    legacy = samples.drop(columns="kv_bytes_bf16")
    assert _per_sample_fraction(legacy, "kv_bytes") == pytest.approx((2.0 + 2.0) / 2)


def test_a_second_tier_is_compared_with_the_first_tiers_best(tmp_path):
    first, second = tmp_path / "tier1", tmp_path / "tier2"
    write_run(first, "no_press", 0.0, 15, 2.0)
    write_run(first, "snapkv", 0.5, 14, 1.0)
    write_run(first, "knorm", 0.5, 12, 1.0)
    write_run(first, "knorm", 0.75, 9, 0.5)
    write_run(second, "no_press", 0.0, 16, 2.0)  # its own no press is the one compared with
    write_run(second, "merging_knorm", 0.5, 13, 1.0)
    write_run(second, "random", 0.5, 2, 1.0)

    alone = table(write_report(second))
    assert alone.loc[("random", 0.5), "best_kvpress_at_ratio"] == "merging_knorm"

    path = write_report(second, against=[first])
    csv = table(path)
    assert set(csv.index) == {("no_press", 0.0), ("merging_knorm", 0.5), ("random", 0.5)}  # the first tier's rows
    merging = csv.loc[("merging_knorm", 0.5)]
    assert merging["best_kvpress_at_ratio"] == "snapkv"
    assert merging["vs_best_kvpress_at_ratio"] == pytest.approx(65.0 - 70.0)
    assert merging["best_kvpress_at_bytes"] == "snapkv@0.50"
    assert merging["vs_no_press"] == pytest.approx(65.0 - 80.0)  # its own no press (16 of 20), not the first's
    assert csv.loc[("random", 0.5), "best_kvpress_at_ratio"] == "snapkv"
    assert f"Compared with: no press and the best kvpress presses of {first}" in path.read_text()


def test_against_a_sweep_of_another_context_length_compares_with_nothing(tmp_path, caplog):
    first, second = tmp_path / "tier1", tmp_path / "tier2"
    write_run(first, "snapkv", 0.5, 14, 1.0)
    config = first / "ruler" / "model" / "snapkv__0.50" / "config.yaml"
    config.write_text(config.read_text().replace("context_length: 1024", "context_length: 4096"))
    write_run(second, "knorm", 0.5, 12, 1.0)
    csv = table(write_report(second, against=[first]))
    assert pd.isna(csv.loc[("knorm", 0.5), "best_kvpress_at_ratio"])  # not its own, not the 4k snapkv
    assert "to compare with" in caplog.text
