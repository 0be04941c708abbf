"""Press timing: time spent inside a press's hooks, and each press's prefill and decode time against no press.

:func:`timed_hooks` times a press's forward hooks (the benchmarks' side-by-side comparisons).
:func:`measure_press_timing` times, for every (press, ratio) of a sweep and for no press, what a user of
kvpress's pipeline pays: the press's own prefill of the context (not the harness's shared prefill) and the
greedy decode steps over the cache it leaves. Presses run interleaved (round-robin inside each prompt, the
order rotated from one round to the next) so that machine noise hits them alike, and each press is compared
with the no-press run of the same round. :func:`write_timing` stores the records in
``<output_dir>/timing.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from kvpress import BasePress, DecodingPress
from kvpress.presses.finch_press import FinchPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.restorekv_press import RestoreKVPress
from tqdm.auto import tqdm
from transformers import DynamicCache

from .config import EvalConfig
from .presses import NO_PRESS, evicts_while_answering

logger = logging.getLogger(__name__)

#: the file :func:`write_timing` writes in a config's ``output_dir``
TIMING = "timing.json"

T = TypeVar("T")


@contextmanager
def timed_hooks(press: Any) -> Iterator[list[float]]:
    """Accumulate the seconds spent in ``press.forward_hook`` while the block runs.

    Yields a one-item list holding the running total (read it after the block). ``press=None`` times nothing.
    The press's class hook is wrapped on the instance and unwrapped on exit.
    """
    total = [0.0]
    if press is None:
        yield total
        return
    hook = type(press).forward_hook

    def timed(module, input, kwargs, output):
        start = time.perf_counter()
        try:
            return hook(press, module, input, kwargs, output)
        finally:
            total[0] += time.perf_counter() - start

    press.forward_hook = timed
    try:
        yield total
    finally:
        press.__dict__.pop("forward_hook", None)


# --- one press, one prompt ---------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PressTime:
    """One timed run of a press on one prompt.

    Attributes
    ----------
    prefill_seconds : float
        The press's prefill of the context, its context manager's entry and exit included (KVzip
        compresses on exit).
    decode_seconds : list of float
        Each timed greedy decode step (one token), in order.
    """

    prefill_seconds: float
    decode_seconds: list[float]

    @property
    def decode_seconds_per_token(self) -> float:
        """Mean seconds per decode step: what a token costs, periodic compressions included."""
        return sum(self.decode_seconds) / len(self.decode_seconds)


def _prefill_press(press: BasePress | None) -> bool:
    """Whether kvpress's pipeline prefills under ``press`` (``_forward``'s rule)."""
    return press is not None and not isinstance(press, DecodingPress)


@torch.no_grad()
def time_press(
    model, press: BasePress | None, context_ids: torch.Tensor, question_ids: torch.Tensor, decode_tokens: int
) -> PressTime:
    """Time one press's prefill and ``decode_tokens`` decode steps, as kvpress's pipeline runs them.

    Mirrors ``KVPressTextGenerationPipeline._forward`` and ``generate_answer`` (kvpress 0.5.5): the prefill
    ``model.model(input_ids=context_ids, past_key_values=cache)`` runs inside ``press(model)`` unless the press
    is a ``DecodingPress``; the question is fed once at the positions following the context (untimed), then
    ``decode_tokens`` greedy steps are timed one by one, inside ``press(model)`` only for presses that act while
    decoding (``DecodingPress``, ``PrefillDecodingPress``, ``DMSPress(decoding=True)``). Unlike the pipeline,
    the decoding does not stop at an end-of-sequence token, so that every press is timed on as many steps.

    Parameters
    ----------
    model : PreTrainedModel
        A causal language model.
    press : BasePress or None
        A fresh press (``None``: no press).
    context_ids, question_ids : torch.Tensor
        ``(1, n)`` token ids on the model's device, as the pipeline's ``preprocess`` returns them.
    decode_tokens : int
        Decode steps to time (at least 1).

    Returns
    -------
    PressTime
    """
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be at least 1, got {decode_tokens}")
    device = context_ids.device
    cache = DynamicCache()
    context_length = context_ids.shape[1]

    _synchronize(device)
    start = time.perf_counter()
    with press(model) if _prefill_press(press) else contextlib.nullcontext():
        model.model(input_ids=context_ids, past_key_values=cache)
    _synchronize(device)
    prefill = time.perf_counter() - start

    if isinstance(press, RestoreKVPress):
        context_length = cache.get_seq_length()
    steps: list[float] = []
    with press(model) if evicts_while_answering(press) else contextlib.nullcontext():
        if isinstance(press, KeyRerotationPress) or (isinstance(press, FinchPress) and press.rerotate_keys):
            context_length = cache.get_seq_length()
        positions = torch.arange(context_length, context_length + question_ids.shape[1], device=device).unsqueeze(0)
        outputs = model(input_ids=question_ids, past_key_values=cache, position_ids=positions, logits_to_keep=1)
        token = outputs.logits[0, -1].argmax()
        position = positions[:, -1:] + 1
        for step in range(decode_tokens):
            _synchronize(device)
            start = time.perf_counter()
            outputs = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=position + step)
            token = outputs.logits[0, -1].argmax()
            token.item()  # the pipeline reads every new token (its end-of-sequence check): a device sync
            steps.append(time.perf_counter() - start)
    return PressTime(prefill, steps)


# --- a sweep, interleaved --------------------------------------------------------------------------------


def timing_points(config: EvalConfig) -> list[tuple[str, float]]:
    """The (press, ratio) points timed for ``config``: no press first, then the sweep's other points."""
    return [(NO_PRESS, 0.0)] + [point for point in config.sweep() if point[0] != NO_PRESS]


def interleaved_order(points: Sequence[T], round_index: int) -> list[T]:
    """The order of ``points`` in round ``round_index``: round-robin, rotated by one point per round.

    Every round runs each point once; over ``len(points)`` consecutive rounds each point runs once in every
    position, so no press is always the one that runs first (or right after a given other press).
    """
    if not points:
        return []
    shift = round_index % len(points)
    return list(points[shift:]) + list(points[:shift])


def prompt_groups(rows: pd.DataFrame, prompts: int) -> list[tuple[int | None, pd.DataFrame]]:
    """The first ``prompts`` rows of each context length (rows without ``context_length``: one group, ``None``)."""
    if "context_length" not in rows.columns:
        return [(None, rows.head(prompts))]
    return [(int(length), group.head(prompts)) for length, group in rows.groupby("context_length", sort=False)]


def _median_ratio(times: dict[tuple[int, int], float], base: dict[tuple[int, int], float]) -> float:
    """Median over prompts of the prompt's ratio (median over its repeats of the same-round ratios)."""
    per_prompt: dict[int, list[float]] = defaultdict(list)
    for (prompt, repeat), seconds in times.items():
        per_prompt[prompt].append(seconds / base[(prompt, repeat)])
    return statistics.median(statistics.median(ratios) for ratios in per_prompt.values())


def measure_press_timing(
    config: EvalConfig,
    model,
    tokenizer,
    rows: pd.DataFrame,
    prompts: int = 4,
    decode_tokens: int = 16,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Prefill and per-token decode time of every (press, ratio) of ``config`` and of no press, side by side.

    For each context length (the rows' ``context_length`` column; all rows together without one), the first
    ``prompts`` rows are tokenized as the harness tokenizes them (``Evaluator._tokenize``: kvpress's
    ``preprocess``, the row's chat-template rule, ``query_aware``, ``max_context_length``). Every round (one
    prompt, one repeat) times each point once with :func:`time_press`, a fresh press built by
    ``config.build_press``, in the order :func:`interleaved_order` gives for that round. Before the timed
    rounds, every point runs once untimed on the length's first prompt (warm-up: allocator, lazy imports,
    kernel compilation), so that no first-call cost lands in one press's numbers.

    Parameters
    ----------
    config : EvalConfig
        The sweep (``press_name``, ``compression_ratio``, ``composed_presses``...).
    model, tokenizer
        The loaded model and its tokenizer.
    rows : pandas.DataFrame
        The config's rows (:func:`~pikvpress_eval.datasets.load_rows`).
    prompts : int
        Rows timed per context length.
    decode_tokens : int
        Decode steps timed per run.
    repeats : int
        Rounds per prompt.

    Returns
    -------
    list of dict
        One record per (point, context length): ``press``, ``compression_ratio``, ``context_length``,
        ``context_tokens`` (median tokenized context length), ``prefill_seconds`` (median over runs),
        ``decode_seconds_per_token`` (median over runs of each run's mean step time),
        ``prefill_vs_no_press`` and ``decode_vs_no_press`` (median over prompts of the prompt's ratio to
        no press in the same rounds; exactly 1 for no press), ``prompts``, ``repeats``, ``decode_tokens``,
        ``threads`` (``torch.get_num_threads()``).
    """
    for value, name in ((prompts, "prompts"), (decode_tokens, "decode_tokens"), (repeats, "repeats")):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    from .runner import Evaluator  # the harness's tokenization, exactly

    evaluator = Evaluator(config, model, tokenizer)
    points = timing_points(config)
    groups = [
        (length, [evaluator._tokenize(row) for _, row in group.iterrows()])
        for length, group in prompt_groups(rows, prompts)
    ]
    groups = [(length, inputs) for length, inputs in groups if inputs]
    total = sum(len(points) * (1 + len(inputs) * repeats) for _, inputs in groups)
    records: list[dict[str, Any]] = []
    with tqdm(total=total, desc="press timing", unit="prefill") as progress:
        for length, inputs in groups:
            progress.set_postfix_str(f"context_length={length}, warm-up")
            for name, ratio in points:
                time_press(model, config.build_press(name, ratio), *inputs[0], decode_tokens)
                progress.update()
            progress.set_postfix_str(f"context_length={length}")
            runs: dict[tuple[str, float], dict[tuple[int, int], PressTime]] = {point: {} for point in points}
            for prompt, (context_ids, question_ids) in enumerate(inputs):
                for repeat in range(repeats):
                    for name, ratio in interleaved_order(points, prompt * repeats + repeat):
                        press = config.build_press(name, ratio)
                        runs[(name, ratio)][(prompt, repeat)] = time_press(
                            model, press, context_ids, question_ids, decode_tokens
                        )
                        progress.update()
            records.extend(
                _records(runs, length, inputs, prompts=len(inputs), repeats=repeats, decode_tokens=decode_tokens)
            )
    for record in records:
        logger.info(
            "%s@%s, %s tokens: prefill %.3f s (%.2fx no press), decode %.1f ms/token (%.2fx)",
            record["press"],
            record["compression_ratio"],
            record["context_length"],
            record["prefill_seconds"],
            record["prefill_vs_no_press"],
            1000 * record["decode_seconds_per_token"],
            record["decode_vs_no_press"],
        )
    return records


def _records(
    runs: dict[tuple[str, float], dict[tuple[int, int], PressTime]],
    length: int | None,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    **counts: int,
) -> list[dict[str, Any]]:
    base = runs[(NO_PRESS, 0.0)]
    base_prefill = {key: run.prefill_seconds for key, run in base.items()}
    base_decode = {key: run.decode_seconds_per_token for key, run in base.items()}
    records = []
    for (name, ratio), by_round in runs.items():
        prefill = {key: run.prefill_seconds for key, run in by_round.items()}
        decode = {key: run.decode_seconds_per_token for key, run in by_round.items()}
        records.append(
            {
                "press": name,
                "compression_ratio": float(ratio),
                "context_length": length,
                "context_tokens": int(statistics.median(context_ids.shape[1] for context_ids, _ in inputs)),
                "prefill_seconds": statistics.median(prefill.values()),
                "decode_seconds_per_token": statistics.median(decode.values()),
                "prefill_vs_no_press": _median_ratio(prefill, base_prefill),
                "decode_vs_no_press": _median_ratio(decode, base_decode),
                **counts,
                "threads": torch.get_num_threads(),
            }
        )
    return records


# --- timing.json ------------------------------------------------------------------------------------------


def timing_key(record: dict[str, Any]) -> tuple[str, float, int | None]:
    """A record's identity in ``timing.json``: (press, compression_ratio, context_length)."""
    length = record["context_length"]
    return record["press"], float(record["compression_ratio"]), None if length is None else int(length)


def write_timing(config: EvalConfig, records: list[dict[str, Any]]) -> Path:
    """Write ``records`` to ``<config.output_dir>/timing.json`` (a JSON list); return its path.

    Records already in the file are kept unless a new record has the same :func:`timing_key`, which
    replaces it (a rerun at one context length leaves the other lengths' records in place).
    """
    path = Path(config.output_dir) / TIMING
    merged: dict[tuple[str, float, int | None], dict[str, Any]] = {}
    if path.exists():
        for record in json.loads(path.read_text()):
            merged[timing_key(record)] = record
    for record in records:
        merged[timing_key(record)] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(list(merged.values()), indent=2) + "\n")
    temporary.replace(path)
    return path


# --- command line ----------------------------------------------------------------------------------------

#: ``key=value`` options of ``python -m evaluation timing`` that are not config fields, with their defaults
TIMING_OPTIONS: dict[str, int] = {"prompts": 4, "decode_tokens": 16, "repeats": 1}


def split_timing_options(overrides: list[str]) -> tuple[dict[str, int], list[str]]:
    """Separate the timing options (``prompts=``, ``decode_tokens=``, ``repeats=``) from config overrides.

    Returns
    -------
    (dict, list)
        Every option of :data:`TIMING_OPTIONS` (defaults filled in), and the remaining ``field=value`` items.

    Raises
    ------
    ConfigError
        An option whose value is not a positive integer.
    """
    from .config import ConfigError

    options, fields = dict(TIMING_OPTIONS), []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in options:
            fields.append(item)
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}") from None
        if options[key] < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return options, fields


def run_timing(config_path: str | Path | None, overrides: list[str]) -> Path:
    """``python -m evaluation timing``: load the config (failing before any model loads), its model and rows,
    time every press against no press and merge the records into ``<output_dir>/timing.json``."""
    from pikvpress.models import load_model

    from .config import load_config
    from .datasets import load_rows

    options, fields = split_timing_options(overrides)
    config = load_config(config_path, fields)
    model, tokenizer = load_model(config.model, device=config.device, **config.model_kwargs)
    rows = load_rows(config, tokenizer)
    return write_timing(config, measure_press_timing(config, model, tokenizer, rows, **options))


def format_timing(records: list[dict[str, Any]]) -> str:
    """A plain-text table of timing records (``timing.json``), one line per press, ratio and context length."""
    from tabulate import tabulate

    rows = [
        [
            r["context_length"],
            r["press"],
            r["compression_ratio"],
            f"{1000 * r['prefill_seconds']:.0f}",
            f"{r['prefill_vs_no_press']:.2f}x",
            f"{1000 * r['decode_seconds_per_token']:.1f}",
            f"{r['decode_vs_no_press']:.2f}x",
        ]
        for r in records
    ]
    headers = ["context", "press", "ratio", "prefill ms", "vs no press", "decode ms/token", "vs no press"]
    return tabulate(rows, headers=headers)
