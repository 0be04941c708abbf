"""``python -m evaluation report RESULTS_DIR``: a sweep's runs as a leaderboard with 95% bootstrap intervals.

Every finished run directory under ``RESULTS_DIR`` (one with ``metrics.json``) is read with its
``config.yaml`` and, when the run wrote it, ``predictions.csv`` (one row per sample: ``task``, ``index``,
``score``, ``kv_bytes``, ``bf16_kv_bytes``, optionally ``kv_bytes_read``...). Runs are grouped by dataset,
model, context length and split; per group the report has

- a leaderboard table, one row per (press, ratio): the task-averaged score with its 95% bootstrap interval
  and N; paired differences (same samples, :mod:`.statistics`) against no press, against the best kvpress
  press at the same ratio and against the best kvpress run holding at most the same bytes; the KV bytes held
  after the prefill and read by the last decode step as fractions of a bf16 cache of the same tokens
  (per sample, then averaged); prefill and per-token decode time against no press when the sweep's root has
  a ``timing.json``; a marker for presses that only mask keys (they free no memory). Presses that prune key
  channels (remove no token) get their own table;
- a ranking per ratio, with the best PiKV configuration's paired difference against the best kvpress press
  in words ("beats", "within noise", "loses");
- plots: score against the bytes held (fraction of bf16, log x; the Pareto view) and score against the
  compression ratio, both with the intervals as error bars; needle depth x length heatmaps for ``needle``;
- the raw measurements (MiB held and read per press and ratio, per-task scores).

Runs from before ``predictions.csv`` (``predictions.jsonl`` + ``metrics.json`` only) are shown with their
score and no interval or paired difference. ``report.md`` is written next to the runs, with ``report.csv``
(the leaderboard rows, numbers split into columns), ``runs.csv`` (every run's metrics) and the PNG plots.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .statistics import Interval, bootstrap_interval, paired_difference

logger = logging.getLogger(__name__)

NO_PRESS = "no_press"
#: interval coverage, resamples and seed of every interval in the report
LEVEL, N_BOOT, SEED = 0.95, 2000, 0
#: below this many prompts per point a report calls itself a smoke test
SMOKE_TEST_SAMPLES = 100
#: "at the same bytes": a kvpress run qualifies when it holds at most (1 + this) x the row's bytes
BYTES_TOLERANCE = 0.02
LEADERBOARD = "docs/leaderboard.md"
PREDICTIONS_CSV = "predictions.csv"
TIMING = "timing.json"

_META = {
    "dataset",
    "model",
    "press",
    "compression_ratio",
    "num_samples",
    "kv_bytes",
    "kv_bytes_read",
    "kv_bytes_bf16",
    "bf16_kv_bytes",
    "context_tokens",
    "context_length",
    "split",
    "seconds",
    "score",
    "grid",
    "average",
    "overall",
}

#: what the runner measures: the cache after the prefill, except for a press that evicts while decoding (it runs
#: while the pipeline answers), whose cache is measured after answering, once the answer's tokens are cropped off
KV_HELD_TITLE = "KV cache held (after the prefill; after answering for presses that evict while decoding)"


# --- runs ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One finished run: its files and what the report derives from them.

    Attributes
    ----------
    directory : Path
        The run directory.
    config : dict
        ``config.yaml`` (empty if absent).
    metrics : dict
        ``metrics.json``.
    samples : pandas.DataFrame or None
        ``predictions.csv`` (None for runs from before it: no interval, no paired difference).
    family : str
        ``"none"`` (no press), ``"kvpress"``, ``"pikvpress"`` or ``"other"``.
    masks_only : bool
        A kvpress press that only masks keys (AdaKV-style): it frees no memory.
    channel_pruning : bool
        Prunes key channels and removes no token (reported in its own table).
    scored : pandas.DataFrame or None
        The per-sample scores keyed for pairing: ``task``, ``index``, ``score`` (see :func:`_sample_scores`).
    score : Interval or None
        Task-averaged score with its bootstrap interval (None without per-sample scores).
    """

    directory: Path
    config: dict
    metrics: dict
    samples: pd.DataFrame | None
    family: str = "other"
    masks_only: bool = False
    channel_pruning: bool = False
    scored: pd.DataFrame | None = None
    score: Interval | None = None
    held_fraction: float = math.nan
    read_fraction: float = math.nan
    timing: dict = field(default_factory=dict)

    @property
    def press(self) -> str:
        return str(self.metrics.get("press", self.config.get("press_name", "?")))

    @property
    def ratio(self) -> float:
        return round(float(self.metrics.get("compression_ratio", self.config.get("compression_ratio", 0.0))), 4)

    @property
    def dataset(self) -> str:
        return str(self.metrics.get("dataset", self.config.get("dataset", "?")))

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", self.config.get("model", "?")))

    @property
    def context_length(self) -> str:
        """The config's context length(s) for RULER and needle (other datasets: ``""``)."""
        if self.dataset not in ("ruler", "needle"):
            return ""
        lengths = self.config.get("context_length")
        if lengths is None:
            return ""
        if isinstance(lengths, (list, tuple)):
            return ", ".join(str(int(n)) for n in lengths)
        return str(int(lengths))

    @property
    def split(self) -> str:
        split = self.config.get("split")
        return "unsplit" if split is None else str(split)

    @property
    def n(self) -> int:
        if self.samples is not None:
            return len(self.samples)
        return int(self.metrics.get("num_samples", 0))

    @property
    def point(self) -> float:
        """The score shown: the interval's estimate, else ``metrics.json``'s score."""
        return self.score.estimate if self.score is not None else float(self.metrics.get("score", math.nan))

    @property
    def label(self) -> str:
        return f"{self.press}@{self.ratio:.2f}"


def classify(press: str, composed: dict | None = None) -> tuple[str, bool, bool]:
    """``(family, masks_only, channel_pruning)`` of a press name (composed presses: from their components).

    Parameters
    ----------
    press : str
        A registry name or a name declared in ``composed``.
    composed : dict, optional
        The config's ``composed_presses``.

    Returns
    -------
    tuple
        family: ``"none"`` for no press, ``"pikvpress"`` if any component is a pikvpress press, ``"kvpress"``
        if every component is a kvpress baseline, else ``"other"``; masks_only / channel_pruning: every
        component is in ``presses.MASKS_ONLY`` / ``presses.CHANNEL_PRUNING``.
    """
    from . import presses

    if press == NO_PRESS:
        return "none", False, False
    parts = presses.components(press, composed)
    masks = getattr(presses, "MASKS_ONLY", frozenset())
    channels = getattr(presses, "CHANNEL_PRUNING", frozenset())
    if any(p in presses.PRESSES or p in getattr(presses, "RAGGED", {}) for p in parts):
        family = "pikvpress"
    elif parts and all(p in presses.BASELINES or p == NO_PRESS for p in parts):
        family = "kvpress"
    else:
        family = "other"
    real = [p for p in parts if p != NO_PRESS]
    return family, bool(real) and all(p in masks for p in real), bool(real) and all(p in channels for p in real)


def _per_sample_fraction(samples: pd.DataFrame, column: str) -> float:
    """Mean over samples of ``column / bf16_kv_bytes`` (NaN when a column is missing or nothing is valid).

    With ``kv_bytes_bf16`` (the bytes the compressed cache holds in a bf16 run), ``column`` is first scaled to
    bf16 by the sample's ``kv_bytes_bf16 / kv_bytes``: the held bytes become exactly ``kv_bytes_bf16``, the bytes
    read by the same factor (a decode step reads tensors of the kinds the cache holds).
    """
    if column not in samples or "bf16_kv_bytes" not in samples:
        return math.nan
    numerator = pd.to_numeric(samples[column], errors="coerce")
    if "kv_bytes_bf16" in samples and "kv_bytes" in samples:
        held = pd.to_numeric(samples["kv_bytes"], errors="coerce")
        scale = pd.to_numeric(samples["kv_bytes_bf16"], errors="coerce") / held.where(held > 0)
        numerator = numerator * scale.fillna(1.0)
    denominator = pd.to_numeric(samples["bf16_kv_bytes"], errors="coerce")
    fraction = (numerator / denominator.where(denominator > 0)).dropna()
    return float(fraction.mean()) if len(fraction) else math.nan


def _sample_scores(samples: pd.DataFrame, source: Path | str = "") -> pd.DataFrame:
    """The ``task, index, score`` frame of a run's samples, one key per sample.

    ``task`` is "all" when the column is missing. The key ``index`` is the dataset's ``index`` column, prefixed
    with the ``context_length`` when the run holds several (RULER numbers its samples per length); without an
    ``index`` column, or when it still repeats within a task, it is the row's position (the rows' order is the
    dataset's, the same in every run of a sweep).
    """
    position = pd.Series(range(len(samples)), index=samples.index)
    task = samples["task"].astype(str) if "task" in samples else pd.Series("all", index=samples.index)
    index = samples.get("index", position)
    if "context_length" in samples and samples["context_length"].nunique() > 1:
        index = samples["context_length"].astype(str) + ":" + index.astype(str)
    if pd.DataFrame({"task": task, "index": index}).duplicated().any():
        logger.warning("%s: the samples' (task, index) repeat; they are matched by their row position", source)
        index = position
    return pd.DataFrame({"task": task, "index": index, "score": pd.to_numeric(samples["score"], errors="coerce")})


def load_run(directory: Path) -> RunResult:
    """A finished run directory (``metrics.json``, ``config.yaml``, ``predictions.csv`` when present)."""
    metrics = json.loads((directory / "metrics.json").read_text())
    config_path = directory / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    csv = directory / PREDICTIONS_CSV
    samples = pd.read_csv(csv) if csv.exists() else None
    run = RunResult(directory, config, metrics, samples)
    run.family, run.masks_only, run.channel_pruning = classify(run.press, config.get("composed_presses") or {})
    if samples is not None and "score" in samples and len(samples):
        scored = _sample_scores(samples, directory)
        if scored["score"].isna().any():
            logger.warning("%s: %d samples without a score are left out", directory, scored["score"].isna().sum())
            scored = scored.dropna(subset=["score"])
        run.scored = scored
        by_task = {task: group["score"].to_numpy() for task, group in scored.groupby("task")}
        if by_task:
            run.score = bootstrap_interval(by_task, n_boot=N_BOOT, seed=SEED, level=LEVEL)
            headline = metrics.get("score")
            if headline is not None and abs(float(headline) - run.score.estimate) > 0.05:
                logger.warning(
                    "%s: metrics.json's score %.2f differs from the task average of predictions.csv %.2f; "
                    "the report shows the latter",
                    directory,
                    float(headline),
                    run.score.estimate,
                )
        run.held_fraction = _per_sample_fraction(samples, "kv_bytes")
        run.read_fraction = _per_sample_fraction(samples, "kv_bytes_read")
    elif samples is not None:
        logger.warning("%s: predictions.csv has no score column; no interval", directory)
    return run


def load_runs(results_dir: str | Path) -> list[RunResult]:
    """Every finished run (a directory with ``metrics.json``) under ``results_dir``, sorted by path.

    Raises
    ------
    FileNotFoundError
        No finished run.
    """
    runs = [load_run(path.parent) for path in sorted(Path(results_dir).rglob("metrics.json"))]
    if not runs:
        raise FileNotFoundError(f"no finished run (metrics.json) under {results_dir}")
    return runs


def _frame(runs: Sequence[RunResult]) -> pd.DataFrame:
    rows = []
    for run in runs:
        # kvpress's scorer format holds a task's score as {"string_match": x}: flatten it to the number
        metrics = {
            k: v["string_match"] if isinstance(v, dict) and set(v) == {"string_match"} else v
            for k, v in run.metrics.items()
        }
        rows.append(
            dict(
                metrics,
                dataset=run.dataset,
                model=run.model,
                press=run.press,
                compression_ratio=run.ratio,
                run_dir=str(run.directory),
            )
        )
    return pd.DataFrame(rows)


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per finished run (its ``metrics.json`` plus ``run_dir``) under ``results_dir``."""
    return _frame(load_runs(results_dir))


def load_timing(results_dir: Path) -> list[dict]:
    """The records of ``results_dir/timing.json`` (a list; ``[]`` when absent or unreadable)."""
    path = results_dir / TIMING
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        logger.warning("%s is not JSON (%s); no timing columns", path, err)
        return []
    if isinstance(records, dict):
        records = records.get("records", [])
    return [r for r in records if isinstance(r, dict) and "press" in r]


def _timing_of(run: RunResult, records: list[dict]) -> dict:
    for record in records:
        if record["press"] != run.press:
            continue
        if not math.isclose(float(record.get("compression_ratio", 0.0)), run.ratio, abs_tol=1e-6):
            continue
        length = record.get("context_length")
        if length is not None and run.context_length and str(int(length)) != run.context_length:
            continue
        return record
    return {}


# --- comparisons ---------------------------------------------------------------------------------------------
class Comparisons:
    """Paired differences between runs of one group, each computed once."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], Interval | None] = {}

    def __call__(self, a: RunResult, b: RunResult | None) -> Interval | None:
        if b is None or a.scored is None or b.scored is None or a.score is None or b.score is None:
            return None
        key = (id(a), id(b))
        if key not in self._cache:
            try:
                self._cache[key] = paired_difference(
                    a.scored,
                    b.scored,
                    n_boot=N_BOOT,
                    seed=SEED,
                    level=LEVEL,
                )
            except ValueError as err:
                logger.warning("%s vs %s: no paired difference (%s)", a.label, b.label, err)
                self._cache[key] = None
        return self._cache[key]


def _kvpress_candidates(runs: Sequence[RunResult]) -> list[RunResult]:
    return [r for r in runs if r.family == "kvpress" and not r.channel_pruning and not math.isnan(r.point)]


def _best(runs: Sequence[RunResult]) -> RunResult | None:
    """The highest point score (ties: the first by press name, then ratio)."""
    if not runs:
        return None
    return min(runs, key=lambda r: (-r.point, r.press, r.ratio))


def best_kvpress_at_ratio(run: RunResult, runs: Sequence[RunResult]) -> RunResult | None:
    """The kvpress press (channel pruning excluded) with the highest point score at ``run``'s ratio."""
    return _best([r for r in _kvpress_candidates(runs) if math.isclose(r.ratio, run.ratio, abs_tol=1e-6)])


def best_kvpress_at_bytes(
    run: RunResult, runs: Sequence[RunResult], tolerance: float = BYTES_TOLERANCE
) -> RunResult | None:
    """The best-scoring kvpress run, any ratio, holding at most ``run``'s bytes (fraction of bf16; ``tolerance``
    relative). None when ``run``'s bytes are unknown or no kvpress run holds so few."""
    if math.isnan(run.held_fraction):
        return None
    limit = run.held_fraction * (1 + tolerance)
    return _best([r for r in _kvpress_candidates(runs) if not math.isnan(r.held_fraction) and r.held_fraction <= limit])


def verdict(difference: Interval) -> str:
    """``"beats"`` / ``"loses"`` when the interval excludes 0 (above / below), else ``"within noise"``."""
    if difference.low > 0:
        return "beats"
    if difference.high < 0:
        return "loses"
    return "within noise"


# --- tables ------------------------------------------------------------------------------------------------
def _fmt(value: float, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _diff_cell(
    difference: Interval | None,
    run: RunResult,
    against: RunResult | None = None,
    name: Callable[[RunResult], str] | None = None,
) -> str:
    if against is None:
        return ""
    if against is run:
        return "(is the best)"
    if difference is None:
        return f"vs {name(against)}" if name else ""
    text = difference.format(signed=True)
    if difference.n < run.n:
        text += f" (n={difference.n})"
    return f"{text} vs {name(against)}" if name else text


def _order(runs: Sequence[RunResult]) -> list[RunResult]:
    return sorted(runs, key=lambda r: (r.press != NO_PRESS, r.ratio, -np.nan_to_num(r.point, nan=-1e9), r.press))


def leaderboard(
    runs: Sequence[RunResult], compare: Comparisons, pool: Sequence[RunResult] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The group's rows: ``(markdown cells, numbers)``, one row per run in table order.

    Parameters
    ----------
    runs : sequence of RunResult
        The rows: runs of one group (same dataset, model, context length, split).
    compare : Comparisons
        The group's paired-difference cache.
    pool : sequence of RunResult, optional
        The runs no press and the best kvpress presses are picked from (default: ``runs``).

    Returns
    -------
    tuple of pandas.DataFrame
        Display cells (intervals as text) and the same rows as numbers (for ``report.csv``).
    """
    pool = runs if pool is None else pool
    baseline = next((r for r in pool if r.press == NO_PRESS), None)
    cells, numbers = [], []
    for run in _order(runs):
        vs_none = None if run is baseline else compare(run, baseline)
        at_ratio = best_kvpress_at_ratio(run, pool) if run.press != NO_PRESS else None
        at_bytes = best_kvpress_at_bytes(run, pool) if run.press != NO_PRESS else None
        vs_ratio = compare(run, at_ratio) if at_ratio is not None and at_ratio is not run else None
        vs_bytes = compare(run, at_bytes) if at_bytes is not None and at_bytes is not run else None
        score = run.score.format() if run.score is not None else _fmt(run.point, ".1f")
        cells.append(
            {
                "press": run.press,
                "family": run.family,
                "ratio": f"{run.ratio:.2f}",
                "score [95% CI]": score,
                "N": run.n,
                "Δ no press": _diff_cell(vs_none, run, baseline if run is not baseline else None),
                "Δ best kvpress @ratio": _diff_cell(vs_ratio, run, at_ratio, lambda r: r.press),
                "Δ best kvpress @bytes": _diff_cell(vs_bytes, run, at_bytes, lambda r: r.label),
                "held / bf16": _fmt(run.held_fraction, ".3f"),
                "read / bf16": _fmt(run.read_fraction, ".3f"),
                "prefill vs no press": _fmt(run.timing.get("prefill_vs_no_press", math.nan), ".2f", "x"),
                "decode/token vs no press": _fmt(run.timing.get("decode_vs_no_press", math.nan), ".2f", "x"),
                "memory": "masks only: frees no memory" if run.masks_only else "",
            }
        )

        def bounds(interval: Interval | None, prefix: str) -> dict[str, float]:
            if interval is None:
                return {prefix: math.nan, f"{prefix}_low": math.nan, f"{prefix}_high": math.nan}
            return {prefix: interval.estimate, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high}

        numbers.append(
            {
                "press": run.press,
                "family": run.family,
                "compression_ratio": run.ratio,
                "score": run.point,
                "score_low": run.score.low if run.score else math.nan,
                "score_high": run.score.high if run.score else math.nan,
                "n": run.n,
                **bounds(vs_none, "vs_no_press"),
                "best_kvpress_at_ratio": at_ratio.press if at_ratio is not None else "",
                **bounds(vs_ratio, "vs_best_kvpress_at_ratio"),
                "best_kvpress_at_bytes": at_bytes.label if at_bytes is not None else "",
                **bounds(vs_bytes, "vs_best_kvpress_at_bytes"),
                "held_bf16_fraction": run.held_fraction,
                "read_bf16_fraction": run.read_fraction,
                "prefill_vs_no_press": run.timing.get("prefill_vs_no_press", math.nan),
                "decode_vs_no_press": run.timing.get("decode_vs_no_press", math.nan),
                "masks_only": run.masks_only,
                "channel_pruning": run.channel_pruning,
                "run_dir": str(run.directory),
            }
        )
    return pd.DataFrame(cells), pd.DataFrame(numbers)


_OPTIONAL = ("read / bf16", "prefill vs no press", "decode/token vs no press", "memory")


def _markdown(cells: pd.DataFrame) -> str:
    empty = [c for c in _OPTIONAL if c in cells and (cells[c] == "").all()]
    return cells.drop(columns=empty).astype(str).to_markdown(index=False, disable_numparse=True)


def ranking(runs: Sequence[RunResult], compare: Comparisons) -> list[str]:
    """Markdown lines: per ratio, the presses in score order, then the best PiKV configuration's paired
    difference against the best kvpress press at that ratio, in words."""
    lines: list[str] = []
    pressed = [r for r in runs if r.press != NO_PRESS and not r.channel_pruning and not math.isnan(r.point)]
    for ratio in sorted({r.ratio for r in pressed}):
        at_ratio = sorted([r for r in pressed if r.ratio == ratio], key=lambda r: (-r.point, r.press))
        ranked = ", ".join(
            f"{i}. {r.press} ({r.family}) {r.score.format() if r.score else _fmt(r.point, '.1f')}"
            for i, r in enumerate(at_ratio, 1)
        )
        lines += [f"- ratio {ratio:.2f}: {ranked}"]
        pikv = _best([r for r in at_ratio if r.family == "pikvpress"])
        kv = _best(_kvpress_candidates(at_ratio))
        if pikv is None or kv is None:
            continue
        difference = compare(pikv, kv)
        if difference is None:
            lines.append(
                f"  - best PiKV ({pikv.press}, {pikv.point:.1f}) vs best kvpress ({kv.press}, {kv.point:.1f}): "
                "no per-sample scores, no paired interval"
            )
            continue
        word = verdict(difference)
        reason = "the interval includes 0" if word == "within noise" else "the interval excludes 0"
        phrase = {"beats": "beats", "within noise": "is within noise of", "loses": "loses to"}[word]
        lines.append(
            f"  - best PiKV configuration {pikv.press} {phrase} the best kvpress press {kv.press}: "
            f"{difference.format(signed=True)} points (paired, {difference.n} samples; {reason})"
        )
    return lines


# --- raw measurements (the tables the harness wrote before intervals) -----------------------------------------------
def score_table(runs: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Rows = presses (no_press first), columns = compression ratios; cells = ``value``.

    The no-compression baseline runs once, at ratio 0; its row repeats it under every ratio so each
    column reads against it.
    """
    table = runs.pivot_table(index="press", columns="compression_ratio", values=value, aggfunc="mean")
    if NO_PRESS in table.index and len(table.columns) > 1:
        baseline = table.loc[NO_PRESS].dropna().iloc[0]
        pressed = table.drop(index=NO_PRESS)
        if 0.0 in table.columns and pressed[0.0].isna().all():
            table = table.drop(columns=0.0)
        table.loc[NO_PRESS] = baseline
    table.columns = [f"{c:.2f}" for c in table.columns]
    order = ([NO_PRESS] if NO_PRESS in table.index else []) + sorted(p for p in table.index if p != NO_PRESS)
    return table.loc[order]


def _mib_table(runs: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean ``value`` (bytes) as ``MiB (fraction of no_press)`` per press and ratio."""
    mib = score_table(runs, value) / 2**20
    if NO_PRESS not in mib.index:
        return mib.map(lambda v: "" if pd.isna(v) else f"{v:.2f} MiB")
    baseline = float(mib.loc[NO_PRESS].dropna().iloc[0])
    return mib.map(lambda v: "" if pd.isna(v) else f"{v:.2f} MiB ({v / baseline:.2f}x)")


def kv_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean KV-cache bytes held: ``MiB (fraction of no_press)`` per press and ratio (see :data:`KV_HELD_TITLE`)."""
    return _mib_table(runs, "kv_bytes")


def read_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean KV bytes the last decode step of each answer read, ``MiB (fraction of no_press)``; empty without
    that measurement (runs from before it was recorded)."""
    if "kv_bytes_read" not in runs or runs["kv_bytes_read"].isna().all():
        return pd.DataFrame()
    return _mib_table(runs.dropna(subset=["kv_bytes_read"]), "kv_bytes_read")


def task_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-task scores: rows = (press, ratio), columns = tasks."""
    tasks = [c for c in runs.columns if c not in _META and c != "run_dir" and pd.api.types.is_numeric_dtype(runs[c])]
    if not tasks:
        return pd.DataFrame()
    return runs.set_index(["press", "compression_ratio"])[tasks].sort_index()


# --- plots -------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errors(runs: Sequence[RunResult]) -> np.ndarray | None:
    if not all(r.score is not None for r in runs):
        return None
    return np.array([[r.point - r.score.low for r in runs], [r.score.high - r.point for r in runs]])


#: markers cycled with the colours, so that presses sharing a colour still differ
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _styles(groups: dict[str, list[RunResult]]) -> dict[str, dict[str, Any]]:
    """A line style per press: pikvpress's drawn thick and solid, masks-only presses dotted, every other press
    thin; colours from tab20 and markers cycled together, so that no two presses of a plot look alike."""
    plt = _pyplot()
    colours = plt.get_cmap("tab20").colors
    styles = {}
    for i, (press, group) in enumerate(sorted(groups.items())):
        first = group[0]
        style = {"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)], "markersize": 4}
        if first.family == "pikvpress":
            style.update(linewidth=2.4, markersize=6)
        else:
            style.update(linewidth=1.0, linestyle=":" if first.masks_only else "-")
        styles[press] = style
    return styles


def _figure(plt, n_presses: int):
    """A figure wide enough for its legend, placed outside the axes on the right."""
    return plt.subplots(figsize=(7 + (2.6 if n_presses > 8 else 0), 4.5 + 0.08 * max(0, n_presses - 14)))


def _legend(ax, n_presses: int) -> None:
    if n_presses > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7)


def plot_scores(runs: Sequence[RunResult], path: Path, title: str) -> None:
    """Score (with its interval) against the compression ratio, one line per press; no press as a band."""
    plt = _pyplot()
    by_press: dict[str, list[RunResult]] = {}
    for run in runs:
        if not math.isnan(run.point):
            by_press.setdefault(run.press, []).append(run)
    fig, ax = _figure(plt, len(by_press))
    styles = _styles(by_press)
    for press, group in sorted(by_press.items()):
        group = sorted(group, key=lambda r: r.ratio)
        if press == NO_PRESS:
            run = group[0]
            ax.axhline(run.point, color="black", linestyle="--", label=NO_PRESS)
            if run.score is not None:
                ax.axhspan(run.score.low, run.score.high, color="black", alpha=0.08)
            continue
        ax.errorbar(
            [r.ratio for r in group],
            [r.point for r in group],
            yerr=_errors(group),
            capsize=2,
            elinewidth=0.8,
            label=press,
            **styles[press],
        )
    ax.set_xlabel("compression ratio (fraction of the context removed)")
    ax.set_ylabel("score (95% interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax, len(by_press))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(runs: Sequence[RunResult], path: Path, title: str) -> bool:
    """Score (with its interval) against the KV bytes held as a fraction of bf16 (log x), one line per press
    across its ratios. Returns False (and writes nothing) when no run has that fraction."""
    points = [r for r in runs if not math.isnan(r.held_fraction) and not math.isnan(r.point)]
    if not points:
        return False
    plt = _pyplot()
    by_press: dict[str, list[RunResult]] = {}
    for run in points:
        by_press.setdefault(run.press, []).append(run)
    fig, ax = _figure(plt, len(by_press))
    styles = _styles(by_press)
    for press, group in sorted(by_press.items()):
        group = sorted(group, key=lambda r: r.held_fraction)
        style = {"color": "black", "marker": "s"} if press == NO_PRESS else styles[press]
        ax.errorbar(
            [r.held_fraction for r in group],
            [r.point for r in group],
            yerr=_errors(group),
            capsize=2,
            elinewidth=0.8,
            label=press,
            **style,
        )
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes held after the prefill (fraction of a bf16 cache of the same tokens, log)")
    ax.set_ylabel("score (95% interval)")
    ax.set_title(f"{title}\nthick: pikvpress; dotted: masks only (frees nothing)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(by_press))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_needle_heatmaps(runs: pd.DataFrame, directory: Path, prefix: str = "needle") -> list[Path]:
    """One depth x length heatmap per run with a needle ``grid`` in its metrics."""
    plt = _pyplot()
    paths = []
    for _, run in runs.iterrows():
        grid = run.get("grid")
        if not isinstance(grid, dict) or not grid:
            continue
        cells = pd.Series({tuple(float(x) for x in key.split("|")): v for key, v in grid.items()})
        heat = cells.unstack(0).sort_index()  # rows = depth, columns = length
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * heat.shape[1], 1.2 + 0.5 * heat.shape[0]))
        image = ax.imshow(heat.values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(heat.shape[1]), [f"{int(c)}" for c in heat.columns])
        ax.set_yticks(range(heat.shape[0]), [f"{d:.2f}" for d in heat.index])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{run['press']} @ {run['compression_ratio']:.2f}", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = directory / f"{prefix}_{run['press']}_{run['compression_ratio']:.2f}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --- the report ------------------------------------------------------------------------------------------------
def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _tasks(runs: Sequence[RunResult]) -> list[str]:
    tasks: set[str] = set()
    for run in runs:
        if run.samples is not None and "task" in run.samples:
            tasks |= set(run.samples["task"].astype(str))
        elif run.config.get("tasks"):
            tasks |= {str(t) for t in run.config["tasks"]}
    return sorted(tasks)


def _half_width(runs: Sequence[RunResult]) -> float:
    widths = [r.score.half_width for r in runs if r.score is not None]
    return float(np.median(widths)) if widths else math.nan


def smoke_test_line(runs: Sequence[RunResult], name: str = "") -> str | None:
    """The smoke-test sentence when the points have fewer than :data:`SMOKE_TEST_SAMPLES` prompts (or the sweep's
    directory ends with "quick"); None for a measured sweep."""
    sizes = [r.n for r in runs if r.n]
    if not sizes or (min(sizes) >= SMOKE_TEST_SAMPLES and not name.endswith("quick")):
        return None
    width = _half_width(runs)
    about = f"about ±{width:.0f} points" if not math.isnan(width) else "not computed (runs without predictions.csv)"
    return (
        f"**smoke test: {_span(sizes)} prompts per point, 95% intervals {about}; the leaderboard "
        f"({LEADERBOARD}) is the measured result.**"
    )


def _group_header(runs: Sequence[RunResult]) -> list[str]:
    first = runs[0]
    tasks = _tasks(runs)
    seeds = sorted({str(r.config.get("seed")) for r in runs if r.config.get("seed") is not None})
    facts = [
        f"N = {_span([r.n for r in runs])} prompts per point",
        f"tasks ({len(tasks)}): {', '.join(tasks) if tasks else 'not recorded'}",
        f"split: {first.split}",
    ]
    if first.context_length:
        facts.append(f"context length: {first.context_length} tokens")
    if seeds:
        facts.append(f"seed: {', '.join(seeds)}")
    return ["; ".join(facts) + ".", ""]


NOTES = [
    (
        "Intervals are 95% bootstrap intervals (percentile, 2000 resamples; samples resampled within each task, "
        "the score being the mean over tasks of each task's mean sample score). Δ columns are paired differences "
        "in points (this row minus the other run, on the samples both answered, matched on (task, index); "
        "'(n=...)' when fewer than the row's N): an interval that excludes 0 is a difference the samples resolve."
    ),
    (
        "Best kvpress @ratio: the kvpress press (kvpress's presses and compositions of them; channel pruning "
        "excluded) with the highest point score at the row's ratio. Best kvpress @bytes: the best-scoring kvpress "
        f"run at any ratio holding at most the row's bytes ({BYTES_TOLERANCE:.0%} tolerance), named press@ratio."
    ),
    (
        "held / bf16: the KV bytes held after the prefill over the bytes a bf16 cache of the same prompt tokens, "
        "uncompressed, holds, per sample, averaged; the compressed cache is counted as a bf16 run holds it (its "
        "floating-point tensors at 2 bytes, packed codes and indices as they are; no press reads 1.00; runs "
        "recorded before kv_bytes_bf16 existed show the float32 bytes, 2.00 for no press). read / bf16: the bytes "
        "the last decode step read (the question and the answer so far included) over that same bf16 cache, "
        "scaled to bf16 like the held bytes. Masks only: the press masks keys and frees no memory."
    ),
]


def _comparison_pool(group: Sequence[RunResult], against: Sequence[RunResult]) -> list[RunResult] | None:
    """The runs a group's rows are compared with when ``against`` runs are given: the group's own no press (else
    the other sweep's) and the other sweep's runs of the same dataset, model, context length and split (its best
    kvpress presses). None without ``against``: each row is compared within its own sweep."""
    if not against:
        return None
    first = group[0]
    key = (first.dataset, first.model, first.context_length, first.split)
    others = [r for r in against if (r.dataset, r.model, r.context_length, r.split) == key and not r.channel_pruning]
    own = [r for r in group if r.press == NO_PRESS]
    return own + [r for r in others if not (own and r.press == NO_PRESS)]


def write_report(results_dir: str | Path, against: Sequence[str | Path] = ()) -> Path:
    """Aggregate every run under ``results_dir``; write report.md, report.csv, runs.csv and plots.

    Parameters
    ----------
    results_dir : str or Path
        A sweep's ``output_dir`` (run directories anywhere below it; ``timing.json`` at its root).
    against : sequence of str or Path
        Other sweeps' ``output_dir``: each row's best kvpress press (at its ratio, at its bytes) is picked from
        their runs of the same dataset, model, context length and split instead of from this sweep's, and the
        paired differences are taken on the prompts both answered (a leaderboard's second tier against its
        first: ``python -m evaluation report results/leaderboard_more --against results/leaderboard``). No press
        is this sweep's own when it has one.

    Returns
    -------
    Path
        ``results_dir/report.md``.

    Raises
    ------
    FileNotFoundError
        No finished run under ``results_dir``.
    """
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    others = [run for directory in against for run in load_runs(directory)]
    timing = load_timing(results_dir)
    for run in runs:
        run.timing = _timing_of(run, timing)
    groups: dict[tuple[str, str, str, str], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.model, run.context_length, run.split), []).append(run)

    header, sections, csv_parts = [], [], []
    for (dataset, model, length, split), group in sorted(groups.items()):
        title = f"{dataset} - {model}" + (f" - {length} tokens" if length else "") + f" - split {split}"
        smoke = smoke_test_line(group, results_dir.name)
        if smoke:
            header += [smoke if len(groups) == 1 else f"{title}: {smoke}", ""]
        compare = Comparisons()
        main = [r for r in group if not r.channel_pruning]
        channel = [r for r in group if r.channel_pruning]
        pool = _comparison_pool(group, others)
        if pool is not None and not [r for r in pool if r.press != NO_PRESS]:
            logger.warning("%s: no run of %s in %s to compare with", title, results_dir, ", ".join(map(str, against)))
        cells, numbers = leaderboard(main, compare, pool=pool)
        header_lines = _group_header(group)
        if pool is not None:
            header_lines = [
                (
                    f"Compared with: no press and the best kvpress presses of {', '.join(map(str, against))} "
                    "(paired on the prompts both answered)."
                ),
                "",
                *header_lines,
            ]
        sections += [f"## {title}", "", *header_lines, "### Leaderboard", "", _markdown(cells), ""]
        if channel:
            channel_cells, channel_numbers = leaderboard(channel, compare, pool=main if pool is None else pool)
            sections += [
                "### Channel pruning (prunes key channels, removes no token)",
                "",
                _markdown(channel_cells),
                "",
            ]
            numbers = pd.concat([numbers, channel_numbers], ignore_index=True)
        sections += ["### Ranking per ratio", "", *ranking(group, compare), ""]
        slug = "_".join(x for x in (dataset, Path(str(model)).name, length.replace(", ", "-"), split) if x)
        slug = slug.replace("/", "_").replace(" ", "")
        pareto = results_dir / f"pareto_{slug}.png"
        if plot_pareto(group, pareto, title):
            sections += [f"![score against KV bytes held]({pareto.name})", ""]
        plot = results_dir / f"scores_{slug}.png"
        plot_scores(group, plot, title)
        sections += [f"![score against compression ratio]({plot.name})", ""]

        frame = _frame(group)
        sections += ["### Raw measurements", "", KV_HELD_TITLE, "", kv_table(frame).to_markdown(), ""]
        read = read_table(frame)
        if not read.empty:
            sections += ["KV bytes read by a decode step", "", read.to_markdown(), ""]
        tasks = task_table(frame)
        if not tasks.empty:
            sections += ["Per task", "", tasks.to_markdown(floatfmt=".1f"), ""]
        if dataset == "needle":
            needle_groups = sum(key[0] == "needle" for key in groups)
            prefix = "needle" if needle_groups == 1 else f"needle_{slug}"
            for path in plot_needle_heatmaps(frame, results_dir, prefix=prefix):
                sections += [f"![needle]({path.name})", ""]
        csv_parts.append(numbers.assign(dataset=dataset, model=model, context_length=length, split=split))

    notes = [f"- {note}" for note in NOTES]
    if timing:
        notes.append(
            f"- Prefill and decode/token vs no press: {TIMING}, measured side by side in one run "
            "(time over no press's time at the same context length)."
        )
    report = results_dir / "report.md"
    report.write_text("\n".join(["# pikvpress evaluation report", "", *header, *notes, "", *sections]))
    table = pd.concat(csv_parts, ignore_index=True)
    first = ["dataset", "model", "context_length", "split"]
    table[first + [c for c in table.columns if c not in first]].to_csv(results_dir / "report.csv", index=False)
    _frame(runs).drop(columns=["grid"], errors="ignore").to_csv(results_dir / "runs.csv", index=False)
    return report
