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

kvpress's command line (``python evaluate.py --dataset ruler --data_dir 4096 --press_name snapkv ...``) is read
by :func:`load_kvpress_flags`, which maps kvpress's fields onto :class:`EvalConfig` (see its docstring).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .presses import (
    EAGER_PRESSES,
    build_press,
    chain_presses,
    press_names,
    refusal,
    takes_ratio,
)

logger = logging.getLogger(__name__)

DATASETS = ("ruler", "longbench", "longbench-e", "longbench-v2", "needle")
SPLITS = (None, "dev", "test")
#: fields a run's ``config.yaml`` adds (kvpress's ``press_init_command``, the run's key: :mod:`.runs`); a config
#: read back ignores them, so a run's ``config.yaml`` can be given as a config
OUTPUT_ONLY = ("press_init_command", "run_key")


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
    max_answer_tokens : int, optional
        Caps each row's answer budget: the smaller of it and the row's (or ``max_new_tokens``); unlike
        ``max_new_tokens`` it never raises a budget. Part of a run's key only when set.
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
    max_answer_tokens: int | None = None

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
            reason = refusal(name)
            if reason is not None:
                raise ConfigError(f"press_name: {name!r} {reason}")
            if name not in allowed:
                raise ConfigError(f"press_name: unknown {name!r}; allowed: {', '.join(allowed)}")
        for ratio in self.ratios:
            if math.isnan(ratio) or not 0 <= ratio < 1:
                raise ConfigError(f"compression_ratio: {ratio} is outside [0, 1)")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction: {self.fraction} is outside (0, 1]")
        for value, name in (
            (self.max_new_tokens, "max_new_tokens"),
            (self.max_context_length, "max_context_length"),
            (self.max_answer_tokens, "max_answer_tokens"),
        ):
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
        data.update(_read_yaml(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r}: write it as key=value")
        data[key] = _parse_value(value)
    for key in OUTPUT_ONLY:
        data.pop(key, None)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    return EvalConfig(**data).validate()


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping of fields ({} for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields")
    return dict(loaded or {})


# --- kvpress's command line -----------------------------------------------------------------------------------

#: kvpress 0.5.5's evaluation fields (``evaluation/evaluate.py``, ``EvaluationConfig``), in its order
KVPRESS_FIELDS: tuple[str, ...] = (
    "dataset",
    "data_dir",
    "model",
    "device",
    "press_name",
    "compression_ratio",
    "key_channel_compression_ratio",
    "head_compression_ratio",
    "threshold",
    "fraction",
    "max_new_tokens",
    "max_context_length",
    "query_aware",
    "needle_depth",
    "compression_interval",
    "target_size",
    "hidden_states_buffer_size",
    "output_dir",
    "log_level",
    "model_kwargs",
    "trust_remote_code",
    "press_init_command",
    "seed",
    "fp8",
)
#: the flags naming a YAML file of fields (kvpress's ``--config_file``, and ``--config``)
CONFIG_FLAGS: tuple[str, ...] = ("config", "config_file")
#: this harness's fields the flag form also takes
EXTRA_FLAGS: tuple[str, ...] = tuple(name for name in _FIELDS if name not in KVPRESS_FIELDS)
#: kvpress's dataset names that are named otherwise here
KVPRESS_DATASETS: dict[str, str] = {"needle_in_haystack": "needle"}
#: RULER's context length when neither ``data_dir`` nor ``context_length`` gives one (kvpress's
#: ``evaluate_config.yaml``: ``data_dir: "4096"``)
KVPRESS_RULER_LENGTH = 4096
#: the flag form's defaults: kvpress's (its ``EvaluationConfig`` under its ``evaluate_config.yaml``: ruler at
#: 4096 tokens, knorm at 0.5, seed 42, ``./results``, the device auto-detected), RULER's 500 samples per task,
#: and this harness's default model (offline) instead of kvpress's Llama-3.1-8B-Instruct
KVPRESS_DEFAULTS: dict[str, Any] = {
    "dataset": "ruler",
    "model": _FIELDS["model"].default,
    "device": None,
    "press_name": "knorm",
    "compression_ratio": 0.5,
    "fraction": 1.0,
    "output_dir": "./results",
    "log_level": "INFO",
    "seed": 42,
    "num_samples": 500,
    "trust_remote_code": False,
    "fp8": False,
}
#: kvpress flags that set fields of presses this harness does not run: refused unless null
_PRESS_ONLY_FLAGS: dict[str, str] = {
    "threshold": "kvpress sets it on DMSPress (kvzap_linear, kvzap_mlp), whose trained KVzap models "
    "this offline harness does not load",
    "head_compression_ratio": "kvpress sets it on DuoAttentionPress (duo_attention), whose attention "
    "patterns this offline harness does not load",
    **{
        name: "kvpress sets it on DecodingPress (the decoding_* presses), which this harness's registry does not run"
        for name in ("compression_interval", "target_size", "hidden_states_buffer_size")
    },
}
_BOOL_FLAGS = frozenset({"query_aware", "trust_remote_code", "fp8", "prefill_reuse"})


def allowed_flags() -> tuple[str, ...]:
    """Every flag name the flag form takes: kvpress's fields, this harness's, ``config`` / ``config_file``."""
    return KVPRESS_FIELDS + EXTRA_FLAGS + CONFIG_FLAGS


def _flag_value(text: str) -> Any:
    """A flag's value as python-fire reads it (a Python literal: ``4096``, ``0.5``, ``[0.25, 0.5]``, ``True``,
    ``None``), else as YAML (``true``, ``null``, ``[snapkv, knorm]``, ``{attn_implementation: eager}``), else
    the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """python-fire style flags as ``{name: value}``: ``--name value``, ``--name=value``, ``--flag`` /
    ``--noflag`` for the boolean fields; ``-`` in names read as ``_``.

    Raises
    ------
    ConfigError
        For a token that is not a flag, or a flag without its value.
    """
    allowed = set(allowed_flags())
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: write flags as --name value or --name=value")
        name, eq, text = token[2:].partition("=")
        name = name.replace("-", "_")
        following = argv[i + 1] if i + 1 < len(argv) else None
        if eq:
            value = _flag_value(text)
        elif name not in allowed and name.startswith("no") and name[2:] in _BOOL_FLAGS:
            name, value = name[2:], False
        elif name in _BOOL_FLAGS:
            value = True
            if following is not None and not following.startswith("--"):
                parsed = _flag_value(following)
                if isinstance(parsed, bool):
                    value, i = parsed, i + 1
        elif following is None or following.startswith("--"):
            if name in allowed:
                raise ConfigError(f"--{name} needs a value")
            value = True  # reported as unknown below
        else:
            value, i = _flag_value(following), i + 1
        values[name] = value
        i += 1
    return values


def load_kvpress_flags(argv: Sequence[str]) -> tuple[EvalConfig, str]:
    """kvpress's ``evaluate.py`` command line as a validated :class:`EvalConfig`, and the log level.

    The fields come from :data:`KVPRESS_DEFAULTS`, then the YAML file of ``--config`` / ``--config_file``
    (kvpress's field names, this harness's, or a run's ``config.yaml``), then the flags (see
    :func:`kvpress_config` for the mapping).

    Raises
    ------
    ConfigError
        Unknown flags (naming the allowed ones), kvpress flags this harness cannot honour, bad values; before
        any model is loaded.
    """
    flags = parse_flags(argv)
    files = [flags.pop(name) for name in CONFIG_FLAGS if name in flags]
    if len(files) > 1:
        raise ConfigError("give one of --config and --config_file (both name the YAML file of fields)")
    given = _read_yaml(str(files[0])) if files else {}
    given.update(flags)
    return kvpress_config(given)


def kvpress_config(given: Mapping[str, Any]) -> tuple[EvalConfig, str]:
    """kvpress's evaluation fields (and this harness's) mapped onto a validated :class:`EvalConfig`.

    Fields missing from ``given`` take :data:`KVPRESS_DEFAULTS`. The mapping:

    - ``dataset``: kvpress's names; ``needle_in_haystack`` is :data:`KVPRESS_DATASETS`'s ``needle``.
    - ``data_dir``: RULER, the context length of kvpress's ``simonjegou/ruler`` subset (``"4096"``) ->
      ``context_length`` (default :data:`KVPRESS_RULER_LENGTH`; a directory keeps this harness's meaning: the
      QA files); LongBench / LongBench-E, the task subset of ``Xnhyacinth/LongBench`` (``hotpotqa``,
      ``hotpotqa_e``) -> ``tasks: [hotpotqa]`` read from that hub dataset (unset: every task; a local directory
      or a hub name keeps this harness's meaning); LongBench v2: unset -> ``simonjegou/LongBench-v2``.
    - ``needle_in_haystack``: ``max_context_length`` is the haystack's length -> ``context_length``, and
      ``needle_depth`` is in percent (0-100) -> fractions; kvpress requires both.
    - ``device``: unset -> ``cuda`` when available, else ``cpu``; ``trust_remote_code`` -> ``model_kwargs``;
      presses reading attention weights get ``attn_implementation: eager``, as kvpress sets it.
    - ``key_channel_compression_ratio``: honoured for presses with ThinK's key-channel pruning, whose
      key-channel ratio is the sweep's ratio here (``think``: the ratio becomes it, kvpress ignores
      ``compression_ratio`` for ThinK; a composed press such as ``snap_think``: it must equal
      ``compression_ratio``); refused for any other press.
    - ``fp8``, ``threshold``, ``head_compression_ratio``, ``compression_interval``, ``target_size``,
      ``hidden_states_buffer_size``: refused unless false / null (no press here takes them).
    - ``log_level``: returned (the caller sets it); ``press_init_command`` (an output of kvpress) is ignored.

    Returns
    -------
    tuple
        ``(config, log_level)``.

    Raises
    ------
    ConfigError
        As :func:`load_kvpress_flags`.
    """
    given = {name: value for name, value in given.items() if name not in OUTPUT_ONLY}
    unknown = sorted(set(given) - set(KVPRESS_FIELDS) - set(EXTRA_FLAGS))
    if unknown:
        raise ConfigError(
            f"unknown flag(s) {', '.join('--' + n for n in unknown)}; allowed: kvpress's "
            f"{', '.join('--' + n for n in KVPRESS_FIELDS if n not in OUTPUT_ONLY)}, this harness's "
            f"{', '.join('--' + n for n in EXTRA_FLAGS)}, and --config / --config_file FILE.yaml"
        )
    values = dict(KVPRESS_DEFAULTS)
    values.update({k: v for k, v in given.items() if v is not None or KVPRESS_DEFAULTS.get(k) is None})

    kvpress_dataset = str(values.pop("dataset"))
    dataset = KVPRESS_DATASETS.get(kvpress_dataset, kvpress_dataset)
    if dataset not in DATASETS:
        names = [*DATASETS, *(f"{k} (kvpress's name of {v})" for k, v in KVPRESS_DATASETS.items())]
        raise ConfigError(f"--dataset: unknown {kvpress_dataset!r}; allowed: {', '.join(names)}")
    values["dataset"] = dataset

    log_level = str(values.pop("log_level")).upper()
    if not isinstance(logging.getLevelName(log_level), int):
        raise ConfigError(f"--log_level: unknown {log_level!r}; allowed: DEBUG, INFO, WARNING, ERROR, CRITICAL")
    if _as_bool("fp8", values.pop("fp8")):
        raise ConfigError(
            "--fp8: FP8 weights (transformers' FineGrainedFP8Config) are not supported by this harness; "
            "leave it false (model_kwargs can still set a dtype)"
        )
    for name, reason in _PRESS_ONLY_FLAGS.items():
        value = values.pop(name, None)
        if value is not None:
            raise ConfigError(f"--{name} {value}: not supported: {reason}")
    channel_ratio = values.pop("key_channel_compression_ratio", None)

    model_kwargs = values.get("model_kwargs") or {}
    if not isinstance(model_kwargs, dict):
        raise ConfigError(f"--model_kwargs: must be a mapping, got {model_kwargs!r}")
    model_kwargs = {str(k): v for k, v in model_kwargs.items() if v is not None}
    if _as_bool("trust_remote_code", values.pop("trust_remote_code")):
        model_kwargs["trust_remote_code"] = True
    if values.get("device") is None:
        import torch

        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"

    _map_data_dir(kvpress_dataset, values, given)
    _coerce(values)
    if "attn_implementation" not in model_kwargs and any(
        name in EAGER_PRESSES for name in _as_list(values.get("press_name"))
    ):
        model_kwargs["attn_implementation"] = "eager"  # kvpress sets it for ObservedAttentionPress
    values["model_kwargs"] = model_kwargs

    config = EvalConfig(**values).validate()
    if channel_ratio is not None:
        config = _with_key_channel_ratio(config, channel_ratio, "compression_ratio" in given)
    return config, log_level


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"--{name}: must be true or false, got {value!r}")


def _map_data_dir(kvpress_dataset: str, values: dict[str, Any], given: Mapping[str, Any]) -> None:
    """kvpress's ``data_dir`` (and ``needle_in_haystack``'s fields) in this harness's terms, in place."""
    dataset, data_dir = values["dataset"], values.get("data_dir")
    if dataset == "ruler":
        if isinstance(data_dir, int) or (isinstance(data_dir, str) and data_dir.strip().isdigit()):
            length = int(data_dir)
            if "context_length" in given and _as_list(given["context_length"]) != [length]:
                raise ConfigError(
                    f"--data_dir {data_dir} is RULER's context length (kvpress's simonjegou/ruler subset); "
                    f"it contradicts --context_length {given['context_length']}: give one of them"
                )
            values["context_length"], values["data_dir"] = length, None
        elif data_dir is not None and not Path(str(data_dir)).is_dir():
            raise ConfigError(
                f"--data_dir {data_dir!r}: for ruler it is the context length in tokens (kvpress's subsets of "
                "simonjegou/ruler: 4096, 8192...) or a directory holding squad.json / hotpotqa.json (qa_1, qa_2)"
            )
        values.setdefault("context_length", KVPRESS_RULER_LENGTH)
    elif dataset in ("longbench", "longbench-e"):
        from .benchmarks.longbench import HUB_LONGBENCH, LONGBENCH_E_TASKS, LONGBENCH_TASKS

        if data_dir is None:
            values["data_dir"] = HUB_LONGBENCH
            return
        text = str(data_dir)
        if Path(text).expanduser().exists():
            return
        base = text[:-2] if text.endswith(("_e", "-e")) else text
        if base in LONGBENCH_TASKS:
            if dataset == "longbench" and base != text:
                raise ConfigError(f"--data_dir {text!r} is a LongBench-E subset: use --dataset longbench-e")
            if dataset == "longbench-e" and base not in LONGBENCH_E_TASKS:
                raise ConfigError(
                    f"--data_dir {text!r}: not a LongBench-E task; LongBench-E has: {', '.join(LONGBENCH_E_TASKS)}"
                )
            if given.get("tasks") is not None and [str(t) for t in _as_list(given["tasks"])] != [base]:
                raise ConfigError(f"--data_dir {text!r} selects the task {base!r}; it contradicts --tasks")
            values["tasks"], values["data_dir"] = [base], HUB_LONGBENCH
    elif dataset == "longbench-v2":
        from .benchmarks.longbench import HUB_LONGBENCH_V2

        if data_dir is None:
            values["data_dir"] = HUB_LONGBENCH_V2
    elif kvpress_dataset == "needle_in_haystack":
        length = values.pop("max_context_length", None)
        if "context_length" in given and length is not None and _as_list(given["context_length"]) != _as_list(length):
            raise ConfigError(
                "needle_in_haystack: --max_context_length is the haystack length; it contradicts "
                "--context_length: give one of them"
            )
        length = length if length is not None else given.get("context_length")
        depths = values.get("needle_depth")
        if length is None or depths is None:
            raise ConfigError(
                "needle_in_haystack needs --needle_depth (percent, 0-100, one or a list) and --max_context_length "
                "(the haystack's length in tokens), as in kvpress"
            )
        try:
            percents = [float(d) for d in _as_list(depths)]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--needle_depth: numbers in percent (0-100), got {depths!r}") from err
        if any(not 0 <= d <= 100 for d in percents):
            raise ConfigError(f"--needle_depth: kvpress's needle depths are percentages in [0, 100], got {depths!r}")
        values["context_length"] = length
        values["needle_depth"] = [d / 100 for d in percents]


_INT_FIELDS = ("seed", "num_samples", "batch_size", "max_new_tokens", "max_context_length", "max_answer_tokens")
_STR_FIELDS = ("data_dir", "model", "output_dir", "device", "split")


def _coerce(values: dict[str, Any]) -> None:
    """Flag values of the wrong type converted (``--data_dir 4096`` is read as a number), or refused."""

    def convert(name: str, value: Any, kind: type) -> Any:
        if value is None or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)  # python-fire reads 1e3 as a float
        try:
            if kind is int and not (isinstance(value, int) or str(value).strip().lstrip("-").isdigit()):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected {kind.__name__}, got {value!r}") from None

    for name in _INT_FIELDS:
        if name in values:
            values[name] = convert(name, values[name], int)
    for name in _STR_FIELDS:
        if name in values:
            values[name] = convert(name, values[name], str)
    if "fraction" in values:
        values["fraction"] = convert("fraction", values["fraction"], float)
    for name, kind in (("compression_ratio", float), ("context_length", int), ("press_name", str)):
        value = values.get(name)
        if isinstance(value, (list, tuple)):
            values[name] = [convert(name, v, kind) for v in value]
        elif value is not None:
            values[name] = convert(name, value, kind)
    if isinstance(values.get("tasks"), str):
        values["tasks"] = [values["tasks"]]
    for name in ("query_aware", "prefill_reuse"):
        if name in values:
            values[name] = _as_bool(name, values[name])


def _press_parts(press: Any) -> list[Any]:
    """A press and every press inside it (ComposedPress parts, wrapped and prefill/decoding presses)."""
    parts, stack = [], [press]
    while stack:
        part = stack.pop()
        if part is None or any(part is p for p in parts):
            continue
        parts.append(part)
        stack.extend(getattr(part, "presses", None) or [])
        stack.extend(getattr(part, name, None) for name in ("press", "prefilling_press", "decoding_press"))
    return parts


def _with_key_channel_ratio(config: EvalConfig, channel_ratio: Any, ratio_given: bool) -> EvalConfig:
    """kvpress's ``key_channel_compression_ratio`` honoured where the press prunes key channels (see
    :func:`kvpress_config`), else refused."""
    try:
        channel_ratio = float(channel_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"--key_channel_compression_ratio: expected a number, got {channel_ratio!r}") from None
    names, ratios = config.press_names, config.ratios
    if len(names) != 1 or len(ratios) != 1:
        raise ConfigError("--key_channel_compression_ratio: give it with one press and one compression ratio")
    name, ratio = names[0], ratios[0]
    press = config.build_press(name, ratio)
    parts = _press_parts(press)
    channels = [p for p in parts if hasattr(p, "key_channel_compression_ratio")]
    if not channels:
        raise ConfigError(
            f"--key_channel_compression_ratio: press {name!r} prunes no key channels (kvpress sets it on "
            "ThinKPress, e.g. think and snap_think); leave it unset"
        )
    if any(press is p for p in channels):  # ThinK alone: kvpress uses only the key-channel ratio
        if ratio_given and ratio != channel_ratio:
            logger.info(
                "press %r: --compression_ratio %s is ignored, as kvpress ignores it for ThinKPress", name, ratio
            )
        ratio = channel_ratio
    elif ratio != channel_ratio:
        raise ConfigError(
            f"--key_channel_compression_ratio {channel_ratio} with --compression_ratio {ratio}: press {name!r} "
            "takes one ratio for its tokens and its key channels here; give equal values, or declare the "
            "composition in YAML (composed_presses: {name: [{press: snapkv}, {press: think, compression_ratio: "
            f"{channel_ratio}}}]}})"
        )
    config = dataclasses.replace(config, compression_ratio=ratio).validate()
    built = [p for p in _press_parts(config.build_press(name, ratio)) if hasattr(p, "key_channel_compression_ratio")]
    if any(float(p.key_channel_compression_ratio) != channel_ratio for p in built):
        raise ConfigError(
            f"--key_channel_compression_ratio: press {name!r} does not take its key-channel ratio from the "
            "compression ratio here; leave it unset"
        )
    return config
