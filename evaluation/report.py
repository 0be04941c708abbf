"""``python -m evaluation report RESULTS_DIR``: every run's metrics aggregated into tables and plots.

Writes, next to the runs: ``report.md`` and ``report.csv`` (rows = presses, columns = compression
ratios, the no-compression baseline and KV bytes shown, per-task breakdowns below), and PNG plots:
score against compression ratio per press, and needle depth x length heatmaps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

_META = {
    "dataset",
    "model",
    "press",
    "compression_ratio",
    "num_samples",
    "kv_bytes",
    "kv_bytes_read",
    "seconds",
    "score",
    "grid",
}


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per finished run (a directory with ``metrics.json``) under ``results_dir``."""
    rows = []
    for path in sorted(Path(results_dir).rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["run_dir"] = str(path.parent)
        rows.append(metrics)
    if not rows:
        raise FileNotFoundError(f"no finished run (metrics.json) under {results_dir}")
    return pd.DataFrame(rows)


def score_table(runs: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Rows = presses (no_press first), columns = compression ratios; cells = ``value``.

    The no-compression baseline runs once, at ratio 0; its row repeats it under every ratio so each
    column reads against it.
    """
    table = runs.pivot_table(index="press", columns="compression_ratio", values=value, aggfunc="mean")
    if "no_press" in table.index and len(table.columns) > 1:
        baseline = table.loc["no_press"].dropna().iloc[0]
        pressed = table.drop(index="no_press")
        if 0.0 in table.columns and pressed[0.0].isna().all():
            table = table.drop(columns=0.0)
        table.loc["no_press"] = baseline
    table.columns = [f"{c:.2f}" for c in table.columns]
    order = (["no_press"] if "no_press" in table.index else []) + sorted(p for p in table.index if p != "no_press")
    return table.loc[order]


def _mib_table(runs: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean ``value`` (bytes) as ``MiB (fraction of no_press)`` per press and ratio."""
    mib = score_table(runs, value) / 2**20
    if "no_press" not in mib.index:
        return mib.map(lambda v: "" if pd.isna(v) else f"{v:.2f} MiB")
    baseline = float(mib.loc["no_press"].dropna().iloc[0])
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


def plot_scores(runs: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for press, group in runs.groupby("press"):
        group = group.sort_values("compression_ratio")
        if press == "no_press":
            ax.axhline(group["score"].iloc[0], color="black", linestyle="--", label="no_press")
        else:
            ax.plot(group["compression_ratio"], group["score"], marker="o", label=press)
    ax.set_xlabel("compression ratio (fraction of the context removed)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_needle_heatmaps(runs: pd.DataFrame, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        path = directory / f"needle_{run['press']}_{run['compression_ratio']:.2f}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


#: what the runner measures: the cache after the prefill, except for a press that evicts while decoding (it runs
#: while the pipeline answers), whose cache is measured after answering, once the answer's tokens are cropped off
KV_HELD_TITLE = "KV cache held (after the prefill; after answering for presses that evict while decoding)"


def write_report(results_dir: str | Path) -> Path:
    """Aggregate every run under ``results_dir``; write report.md, report.csv and plots; return report.md."""
    results_dir = Path(results_dir)
    runs = collect(results_dir)
    sections, csv_parts = [], []
    for (dataset, model), group in runs.groupby(["dataset", "model"]):
        title = f"{dataset} - {model}"
        scores, kv, tasks = score_table(group), kv_table(group), task_table(group)
        sections += [f"## {title}", "", "Score (0-100; rows = presses, columns = compression ratio)", "",
                     scores.to_markdown(floatfmt=".1f"), "", KV_HELD_TITLE, "",
                     kv.to_markdown(), ""]
        read = read_table(group)
        if not read.empty:
            sections += ["KV bytes read by a decode step", "", read.to_markdown(), ""]
        if not tasks.empty:
            sections += ["Per task", "", tasks.to_markdown(floatfmt=".1f"), ""]
        slug = f"{dataset}_{Path(str(model)).name}".replace("/", "_")
        plot = results_dir / f"scores_{slug}.png"
        plot_scores(group, plot, title)
        sections += [f"![scores]({plot.name})", ""]
        if dataset == "needle":
            for path in plot_needle_heatmaps(group, results_dir):
                sections += [f"![needle]({path.name})", ""]
        csv_parts.append(scores.reset_index().assign(dataset=dataset, model=model))
    report = results_dir / "report.md"
    report.write_text("\n".join(["# pikvpress evaluation report", "", *sections]))
    pd.concat(csv_parts).to_csv(results_dir / "report.csv", index=False)
    runs.drop(columns=["grid"], errors="ignore").to_csv(results_dir / "runs.csv", index=False)
    return report
