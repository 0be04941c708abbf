"""Run directories: one per sweep point, resumable.

Each run directory holds ``config.yaml`` (the resolved run), ``predictions.jsonl`` (one line per
sample, appended as it finishes) and, once every sample is done, ``metrics.json``. A run with
``metrics.json`` is finished and never touched again; an interrupted run resumes after its last
written prediction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .config import EvalConfig
from .datasets import score_predictions

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


@dataclass
class Run:
    """One sweep point and where its results live."""

    config: EvalConfig
    press_name: str
    compression_ratio: float
    directory: Path
    done: dict[int, dict] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return (self.directory / METRICS).exists()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        resolved = dict(self.config.to_dict(), press_name=self.press_name, compression_ratio=self.compression_ratio)
        _atomic_write(self.directory / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        path = self.directory / PREDICTIONS
        if path.exists():
            text = path.read_text()
            lines = text.splitlines()
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption: that sample reruns
                    continue
                self.done[int(record["index"])] = record
                kept.append(line)
            if len(kept) < len(lines) or (text and not text.endswith("\n")):
                # drop what the interruption cut, and end the last record's line, before appending to the file
                _atomic_write(path, "".join(line + "\n" for line in kept))

    def record(self, index: int, predicted_answer: str, **fields: Any) -> None:
        """Append one sample's prediction and its measurements (``kv_bytes``, ``seconds``, ``kv_bytes_read``,
        ``context_tokens``...; ``None`` values are left out)."""
        record = {"index": index, "predicted_answer": predicted_answer}
        record.update({key: value for key, value in fields.items() if value is not None})
        with open(self.directory / PREDICTIONS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[index] = record

    def finish(self, rows: pd.DataFrame) -> dict[str, Any]:
        predictions = pd.DataFrame([self.done[i] for i in rows.index]).set_index(rows.index)
        scored = rows.assign(predicted_answer=predictions["predicted_answer"])
        metrics = score_predictions(self.config.dataset, scored)
        metrics.update(
            dataset=self.config.dataset,
            model=self.config.model,
            press=self.press_name,
            compression_ratio=self.compression_ratio,
            num_samples=len(rows),
            kv_bytes=float(predictions["kv_bytes"].mean()),
            seconds=float(predictions["seconds"].sum()),
        )
        if "kv_bytes_read" in predictions and predictions["kv_bytes_read"].notna().all():
            metrics["kv_bytes_read"] = float(predictions["kv_bytes_read"].mean())
        _atomic_write(self.directory / METRICS, json.dumps(metrics, indent=2))
        return metrics


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan_runs(config: EvalConfig) -> list[Run]:
    """The sweep's runs, each in ``output_dir/<dataset>/<model>/<press>__<ratio>``."""
    base = Path(config.output_dir) / _slug(config.dataset) / _slug(config.model)
    runs = []
    for name, ratio in config.sweep():
        runs.append(Run(config, name, ratio, base / f"{_slug(name)}__{ratio:.2f}"))
    return runs
