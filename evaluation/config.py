"""Evaluation configuration: a YAML file plus command-line overrides, validated before any model loads.

The fields are kvpress's evaluation fields; ``press_name`` and ``compression_ratio`` also accept lists,
which makes the run a sweep over every (press, ratio) pair. Composed presses are declared in YAML::

    press_name: [no_press, snapkv, snapkv_then_knorm]
    compression_ratio: [0.25, 0.5, 0.75]
    composed_presses:
      snapkv_then_knorm:            # a new press name usable in press_name
        - press: snapkv             # components without compression_ratio take the sweep's ratio
        - press: knorm
          compression_ratio: 0.2
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .presses import EAGER_PRESSES, build_press, chain_presses, press_names, takes_ratio

DATASETS = ("ruler", "longbench", "longbench-e", "longbench-v2", "needle")
SPLITS = (None, "dev", "test")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is loaded."""


@dataclass
class EvalConfig:
    """One evaluation run or sweep.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    data_dir : str, optional
        LongBench: a hub name or a local directory of ``{task}.jsonl`` files (v2: a JSON/JSONL file).
        RULER: a directory with ``squad.json`` / ``hotpotqa.json`` enabling qa_1 / qa_2.
    model : str
        Default alias, hub id or local path (see :func:`pikvpress.models.load_model`).
    press_name : str or list of str
        Registry names (``evaluation.presses``) or names declared in ``composed_presses``.
    compression_ratio : float or list of float
        Fraction of the context removed, in [0, 1).
    fraction : float
        Fraction of the dataset rows evaluated (sampled with ``seed``), in (0, 1].
    max_new_tokens : int, optional
        Overrides each row's ``max_new_tokens``.
    max_context_length : int, optional
        Contexts longer than this many tokens are truncated.
    query_aware : bool
        Compress the context together with the question (the question is appended to the context).
    needle_depth : float or list of float, optional
        Needle: depths in [0, 1] (default 0, 0.25, 0.5, 0.75, 1).
    context_length : int or list of int
        RULER and needle: target prompt lengths in tokens.
    num_samples : int
        RULER: samples per task.
    tasks : list of str, optional
        Subset of the dataset's tasks.
    device : str
        Torch device.
    model_kwargs : dict
        Extra ``from_pretrained`` arguments (``attn_implementation``, ``dtype``...).
    output_dir : str
        Where run directories and reports are written.
    seed : int
        Seed of data generation and sampling.
    prefill_reuse : bool
        Share one prefill per sample among every press that compresses inside kvpress's forward hook.
    composed_presses : dict
        Named chains of presses (see the module docstring).
    split : str, optional
        RULER: ``"dev"`` or ``"test"`` (see ``docs/leaderboard.md``, "Dev and test splits"): the
        splits share no seed stream, no essay and no needle value. ``None``: the unsplit generator (every
        essay, RULER's order).
    batch_size : int
        Samples answered at once over their compressed caches (left padding and attention masks).
    """

    dataset: str = "ruler"
    data_dir: str | None = None
    model: str = "smollm2-135m-instruct"
    press_name: str | list[str] = "no_press"
    compression_ratio: float | list[float] = 0.0
    fraction: float = 1.0
    max_new_tokens: int | None = None
    max_context_length: int | None = None
    query_aware: bool = False
    needle_depth: float | list[float] | None = None
    context_length: int | list[int] = 1024
    num_samples: int = 10
    tasks: list[str] | None = None
    device: str = "cpu"
    model_kwargs: dict = field(default_factory=dict)
    output_dir: str = "results"
    seed: int = 0
    prefill_reuse: bool = True
    composed_presses: dict = field(default_factory=dict)
    split: str | None = None
    batch_size: int = 1

    # ---------------------------------------------------------------------------------------------
    @property
    def press_names(self) -> list[str]:
        return list(self.press_name) if isinstance(self.press_name, (list, tuple)) else [self.press_name]

    @property
    def ratios(self) -> list[float]:
        ratios = self.compression_ratio
        return [float(r) for r in ratios] if isinstance(ratios, (list, tuple)) else [float(ratios)]

    @property
    def context_lengths(self) -> list[int]:
        lengths = self.context_length
        return [int(n) for n in lengths] if isinstance(lengths, (list, tuple)) else [int(lengths)]

    def sweep(self) -> list[tuple[str, float]]:
        """Every (press, ratio) pair to run; ``no_press`` once, at ratio 0."""
        pairs: list[tuple[str, float]] = []
        for name in self.press_names:
            if not self.takes_ratio(name):
                pairs.append((name, 0.0))
            else:
                pairs.extend((name, ratio) for ratio in self.ratios)
        return list(dict.fromkeys(pairs))

    def takes_ratio(self, name: str) -> bool:
        """Whether the sweep's ratios apply to ``name`` (a composed press: to any of its components)."""
        if name in self.composed_presses:
            return any(
                "compression_ratio" not in component and takes_ratio(component["press"])
                for component in self.composed_presses[name]
            )
        return name in press_names() and takes_ratio(name)

    def build_press(self, name: str, ratio: float):
        """A fresh press for one sweep point (composed presses included)."""
        if name in self.composed_presses:
            parts = []
            for component in self.composed_presses[name]:
                spec = dict(component)
                part_name = spec.pop("press")
                part_ratio = spec.pop("compression_ratio", ratio if takes_ratio(part_name) else 0.0)
                parts.append(build_press(part_name, part_ratio, **spec))
            return chain_presses([p for p in parts if p is not None])
        return build_press(name, ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> EvalConfig:
        """Raise :class:`ConfigError` naming the field and the allowed values; return self."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: unknown {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        allowed = press_names() + list(self.composed_presses)
        for name in self.press_names:
            if name not in allowed:
                raise ConfigError(f"press_name: unknown {name!r}; allowed: {', '.join(allowed)}")
        for ratio in self.ratios:
            if math.isnan(ratio) or not 0 <= ratio < 1:
                raise ConfigError(f"compression_ratio: {ratio} is outside [0, 1)")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction: {self.fraction} is outside (0, 1]")
        for value, name in ((self.max_new_tokens, "max_new_tokens"), (self.max_context_length, "max_context_length")):
            if value is not None and int(value) <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value}")
        if any(n <= 0 for n in self.context_lengths):
            raise ConfigError(f"context_length: must be positive, got {self.context_length}")
        if self.split not in SPLITS:
            raise ConfigError(f"split: unknown {self.split!r}; allowed: dev, test (or null: unsplit)")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"batch_size: must be a positive integer, got {self.batch_size}")
        if self.num_samples <= 0:
            raise ConfigError(f"num_samples: must be positive, got {self.num_samples}")
        depths = self.needle_depth if isinstance(self.needle_depth, (list, tuple)) else [self.needle_depth]
        if any(d is not None and not 0 <= float(d) <= 1 for d in depths):
            raise ConfigError(f"needle_depth: values must be in [0, 1], got {self.needle_depth}")
        for name, components in self.composed_presses.items():
            if name in press_names():
                raise ConfigError(f"composed_presses: {name!r} shadows a registered press")
            if not isinstance(components, list) or not components:
                raise ConfigError(f"composed_presses.{name}: must be a non-empty list of components")
            for component in components:
                if not isinstance(component, dict) or "press" not in component:
                    raise ConfigError(f"composed_presses.{name}: each component needs a 'press' key")
        known_tasks = _dataset_tasks(self.dataset)
        for task in self.tasks or []:
            if known_tasks is not None and task not in known_tasks:
                raise ConfigError(f"tasks: unknown {self.dataset} task {task!r}; allowed: {', '.join(known_tasks)}")
        eager = self.model_kwargs.get("attn_implementation") == "eager"
        for name in self.press_names:
            if name in EAGER_PRESSES and not eager:
                raise ConfigError(
                    f"press_name: {name!r} reads attention weights; set model_kwargs: {{attn_implementation: eager}}"
                )
        for name, ratio in self.sweep():  # every press builds, with its fields
            try:
                self.build_press(name, ratio)
            except (ValueError, TypeError, AssertionError) as err:
                raise ConfigError(f"press {name!r} at ratio {ratio}: {err}") from err
        return self


def _dataset_tasks(dataset: str) -> tuple[str, ...] | None:
    """The task names a dataset accepts (None: the dataset has no task subsets)."""
    if dataset == "ruler":
        from .benchmarks.ruler import RULER_TASKS

        return RULER_TASKS
    if dataset == "longbench":
        from .benchmarks.longbench import LONGBENCH_TASKS

        return tuple(LONGBENCH_TASKS)
    if dataset == "longbench-e":
        from .benchmarks.longbench import LONGBENCH_E_TASKS

        return tuple(LONGBENCH_E_TASKS)
    return None


_FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}


def _parse_value(text: str) -> Any:
    """A command-line value as YAML: ``0.5`` -> float, ``[a, b]`` -> list, ``true`` -> bool."""
    return yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides; validate before returning.

    Raises
    ------
    ConfigError
        Unknown fields (naming the allowed ones), unknown press or dataset names, bad values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of fields")
        data.update(loaded or {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r}: write it as key=value")
        data[key] = _parse_value(value)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    return EvalConfig(**data).validate()
