"""Run directories: one per sweep point, keyed by what changes its results, resumable.

A run lives in ``output_dir/<dataset>/<model>/<press>__<ratio:.2f>__<key hash>`` and holds:

- ``config.yaml``: the resolved run (the config's fields with this run's ``press_name`` and
  ``compression_ratio``; ``composed_presses`` holds only this press's own definition), kvpress's
  ``press_init_command`` (the press as built) and ``run_key`` (``hash`` and ``fields``, below). Written when the
  run starts.
- ``predictions.jsonl``: one line per sample, appended as each finishes (the resumable record).
- when every sample is done, kvpress's files: ``predictions.csv`` (the rows without ``context``, with
  ``predicted_answer``, kvpress's per-row ``compression_ratio``, each sample's ``score`` (0-100, see
  :func:`~.datasets.sample_scores`) and every measurement of ``predictions.jsonl``: ``kv_bytes``,
  ``kv_bytes_read``, ``seconds``, ``context_tokens``, ``bf16_kv_bytes``...), then ``metrics.json``, last:
  the scorer's metrics in kvpress's format (:func:`~.datasets.kvpress_metrics`) with the run's own fields
  (``score``, ``dataset``, ``model``, ``press``, ``compression_ratio``, ``num_samples``, mean ``kv_bytes``,
  ``kv_bytes_read``, ``bf16_kv_bytes``, ``context_tokens``, total ``seconds``).

A run with ``metrics.json`` is finished and never touched again; an interrupted run resumes after its last
whole line of ``predictions.jsonl`` (a line cut by the interruption is dropped and that sample reruns).

The key
-------
A run's key (:func:`run_key`) holds every field that changes its results: every :class:`~.config.EvalConfig`
field except the output-neutral ones below, with the sweep's lists replaced by the run's own press and ratio:
``press_name``, ``compression_ratio``, ``press_definition`` (a composed press's own list of components from
``composed_presses``; the other presses' definitions are not part of it) and ``press_init_command`` (the press
as built, so that a registry press whose definition changes gets a new key). Fields a dataset ignores (say
``needle_depth`` for RULER) are keyed too: changing one reruns, it never returns a stale result. The directory
name carries the first 8 hex digits of the SHA-256 of the key's canonical JSON (sorted keys, no spaces); a
directory whose stored key differs from the expected one is refused (:class:`RunKeyError`), naming the fields
that differ.

Left out of the key, by design (:data:`OUTPUT_NEUTRAL`):

- ``output_dir``: where the run is written, not what it computes;
- ``device``: the same computation on another device;
- ``prefill_reuse``: the shared prefill replays each press's own hooks on the same layer inputs, which gives
  the same cache and answers as the press's own prefill (tested in ``tests/test_harness.py``);
- ``batch_size``: answering several samples at once is designed to give the same answers as one at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from .config import OUTPUT_ONLY, ConfigError, EvalConfig
from .datasets import kvpress_metrics, sample_scores
from .presses import masked_twin

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
PREDICTIONS_CSV = "predictions.csv"
METRICS = "metrics.json"
CONFIG = "config.yaml"

#: EvalConfig fields that never change a run's results (see the module docstring), left out of its key
OUTPUT_NEUTRAL: tuple[str, ...] = ("output_dir", "device", "prefill_reuse", "batch_size")
#: EvalConfig fields of the sweep, replaced in a run's key by the run's own press, ratio and definition
SWEEP_FIELDS: tuple[str, ...] = ("press_name", "compression_ratio", "composed_presses")
#: EvalConfig fields added after run keys existed: in a run's key only when set, so older run directories keep theirs
KEY_IF_SET: tuple[str, ...] = ("max_answer_tokens",)
#: record fields averaged into metrics.json (every record field goes to predictions.csv)
_MEAN_FIELDS: tuple[str, ...] = ("kv_bytes", "kv_bytes_read", "bf16_kv_bytes", "context_tokens")


class RunKeyError(ConfigError):
    """A run directory holds a run whose key differs from the one expected there."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


def _canonical(value: Any, sort_keys: bool = True) -> Any:
    """``value`` as plain JSON data (tuples as lists, numpy scalars as numbers, other objects as text)."""
    return json.loads(json.dumps(value, sort_keys=sort_keys, default=str))


def _normalized(name: str, config: EvalConfig) -> Any:
    """One config field in the form that two equivalent spellings share (``1024`` and ``[1024]``...)."""
    value = getattr(config, name)
    if name == "context_length":
        return config.context_lengths
    if name == "needle_depth" and value is not None:
        return [float(d) for d in (value if isinstance(value, (list, tuple)) else [value])]
    if name == "tasks" and value is not None:
        return [str(t) for t in ([value] if isinstance(value, str) else value)]
    if name == "fraction":
        return float(value)
    if name == "data_dir" and value is not None:
        return str(value)
    if name == "model_kwargs":
        return {str(k): v for k, v in (value or {}).items() if v is not None}
    return value


def _press_init_command(config: EvalConfig, press_name: str, ratio: float) -> str:
    """The press as built (kvpress's ``press_init_command``), without object addresses."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(config.build_press(press_name, ratio)))


def run_key(config: EvalConfig, press_name: str, compression_ratio: float) -> dict[str, Any]:
    """Every field that changes the results of one sweep point (see the module docstring), as plain JSON data.

    Parameters
    ----------
    config : EvalConfig
        The sweep's (validated) config.
    press_name : str
        The run's press (a registry name or a name of ``config.composed_presses``).
    compression_ratio : float
        The run's ratio.

    Returns
    -------
    dict
        ``{field: value}``, sorted by field name.
    """
    key = {
        f.name: _normalized(f.name, config)
        for f in fields(EvalConfig)
        if f.name not in OUTPUT_NEUTRAL
        and f.name not in SWEEP_FIELDS
        and not (f.name in KEY_IF_SET and getattr(config, f.name) is None)
    }
    key.update(
        press_name=press_name,
        compression_ratio=float(compression_ratio),
        press_definition=config.composed_presses.get(press_name),
        press_init_command=_press_init_command(config, press_name, compression_ratio),
    )
    return _canonical(dict(sorted(key.items())))


def seed_globals(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators with ``seed``, as kvpress's evaluate.py does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def key_hash(key: dict[str, Any]) -> str:
    """The first 8 hex digits of the SHA-256 of ``key``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class Run:
    """One sweep point and where its results live.

    Parameters
    ----------
    config : EvalConfig
        The sweep's config.
    press_name : str
        The run's press.
    compression_ratio : float
        The run's ratio.
    directory : Path
        The run directory (:func:`plan_runs` names it after the run's key).
    done : dict
        The records of the samples done, by sample index (filled by :meth:`start`, then :meth:`record`).
    """

    config: EvalConfig
    press_name: str
    compression_ratio: float
    directory: Path
    done: dict[int, dict] = field(default_factory=dict)

    @cached_property
    def key(self) -> dict[str, Any]:
        """The fields that change this run's results (:func:`run_key`)."""
        return run_key(self.config, self.press_name, self.compression_ratio)

    @property
    def finished(self) -> bool:
        return (self.directory / METRICS).exists()

    def sample_seed(self, index: int) -> int:
        """The seed of torch's, Python's and numpy's global generators while this run's press compresses sample
        ``index`` (:func:`seed_globals`): a hash of the run's key and the index, so that a press that draws random
        numbers (LeverageScore's projection, an unseeded RandomPress) draws the same ones whichever runs came before
        it, in a fresh sweep, a resumed one or a sweep split over several processes. A ragged press
        (``ragged_<name>``) draws what its masked twin ``<name>`` draws in the same sweep, so the two keep the same
        tokens (Compactor's sketch) and their answers can be compared."""
        twin = masked_twin(self.press_name)
        key = self.key if twin == self.press_name else run_key(self.config, twin, self.compression_ratio)
        text = f"{key_hash(key)}:{index}"
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)

    def check_key(self) -> None:
        """Refuse a directory whose ``config.yaml`` holds another run's key.

        Raises
        ------
        RunKeyError
            The stored key differs from :attr:`key` (the message names the differing fields), or a
            ``config.yaml`` there has no key.
        """
        path = self.directory / CONFIG
        if not path.exists():
            return
        stored = (yaml.safe_load(path.read_text()) or {}).get("run_key")
        if not isinstance(stored, dict) or not isinstance(stored.get("fields"), dict):
            raise RunKeyError(
                f"{self.directory}: its {CONFIG} has no run_key, so what it computed is unknown; "
                "move the directory away to rerun it"
            )
        expected, found = self.key, _canonical(stored["fields"])
        differing = sorted(
            k for k in set(expected) | set(found) if expected.get(k, "<absent>") != found.get(k, "<absent>")
        )
        if differing:
            details = "; ".join(
                f"{k}: stored {found.get(k, '<absent>')!r}, expected {expected.get(k, '<absent>')!r}" for k in differing
            )
            raise RunKeyError(
                f"{self.directory} holds another run (its {CONFIG} differs in {', '.join(differing)}): {details}. "
                "Move the directory away or use another output_dir"
            )

    def resolved_config(self) -> dict[str, Any]:
        """What ``config.yaml`` holds: the config with this run's press and ratio, its press, its key."""
        resolved = dict(
            self.config.to_dict(),
            press_name=self.press_name,
            compression_ratio=float(self.compression_ratio),
            composed_presses={
                name: spec for name, spec in self.config.composed_presses.items() if name == self.press_name
            },
        )
        key = self.key
        resolved[OUTPUT_ONLY[0]] = key["press_init_command"]
        resolved[OUTPUT_ONLY[1]] = {"hash": key_hash(key), "fields": key}
        return _canonical(resolved, sort_keys=False)  # EvalConfig's order, as kvpress writes its config.yaml

    def start(self) -> None:
        """Create the directory (its ``config.yaml``) or resume it: read the whole lines of ``predictions.jsonl``.

        A last line cut by an interruption (no newline, not a whole JSON record) is dropped, and the file is
        rewritten without it before anything is appended, so that no record is glued to a fragment.
        """
        self.check_key()
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / CONFIG, yaml.safe_dump(self.resolved_config(), sort_keys=False))
        path = self.directory / PREDICTIONS
        if path.exists():
            text = path.read_text()
            lines = text.splitlines()
            records, kept = read_predictions(path, text)
            self.done.update(records)
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
        """Write ``predictions.csv`` then ``metrics.json`` (see the module docstring); return the metrics."""
        records = pd.DataFrame([self.done[i] for i in rows.index], index=rows.index)
        scored = rows.assign(predicted_answer=records["predicted_answer"])
        dataset = self.config.dataset
        samples = scored.drop(columns=["context"], errors="ignore").assign(
            compression_ratio=float(self.compression_ratio), score=sample_scores(dataset, scored)
        )
        for name in records.columns:
            if name in ("index", "predicted_answer"):
                continue
            samples[name if name not in samples.columns else f"measured_{name}"] = records[name]
        _atomic_write(self.directory / PREDICTIONS_CSV, samples.to_csv(index=False))

        metrics = kvpress_metrics(dataset, scored)
        metrics.update(
            dataset=dataset,
            model=self.config.model,
            press=self.press_name,
            compression_ratio=float(self.compression_ratio),
            num_samples=len(rows),
        )
        for name in _MEAN_FIELDS:  # kv_bytes whenever measured; the others when every sample has them
            if name in records and (name == "kv_bytes" or records[name].notna().all()):
                metrics[name] = float(records[name].mean())
        if "seconds" in records:
            metrics["seconds"] = float(records["seconds"].sum())
        _atomic_write(self.directory / METRICS, json.dumps(metrics, indent=2))
        return metrics


def read_predictions(path: Path, text: str | None = None) -> tuple[dict[int, dict], list[str]]:
    """The whole records of a ``predictions.jsonl`` by sample index, and their lines; a line cut by an interruption
    (not a whole JSON record with an ``index``) is left out. Reads only."""
    text = path.read_text() if text is None else text
    records: dict[int, dict] = {}
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            index = int(record["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.info("%s: dropping a line cut by an interruption; that sample reruns", path)
            continue
        records[index] = record
        kept.append(line)
    return records, kept


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan_runs(config: EvalConfig) -> list[Run]:
    """The sweep's runs, each in ``output_dir/<dataset>/<model>/<press>__<ratio:.2f>__<key hash>``.

    Raises
    ------
    RunKeyError
        A run's directory holds a run with another key (checked here, before any model loads).
    """
    base = Path(config.output_dir) / _slug(config.dataset) / _slug(config.model)
    runs = []
    for name, ratio in config.sweep():
        run = Run(config, name, ratio, base)
        run.directory = base / f"{_slug(name)}__{ratio:.2f}__{key_hash(run.key)}"
        run.check_key()
        runs.append(run)
    return runs
