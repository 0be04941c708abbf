"""RULER generation: the samples of each task fitted to the target length, as a kvpress DataFrame."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .fitting import _fit, _fit_and_fill, _Fitted, _PromptTooLong
from .qa_data import _load_qa, _qa_path, available_tasks
from .splits import check_split, stream_key
from .tasks import (
    _NIAH,
    _CweSample,
    _FweSample,
    _NiahSample,
    _QaSample,
    _Sample,
    _VtExample,
    _VtSample,
)
from .templates import QA_DATASETS, RULER_TASKS, TOKENS_TO_GENERATE, _split
from .tokens import _cache_for, _TokenizerCache, _Tokens

logger = logging.getLogger(__package__)  # the package's name, as when RULER was one module

_VT_EXAMPLE_LENGTH = 500  # RULER makes the few-shot example at max_seq_length=500
#: Fill the target to within this share (the tests check 2%).
_TARGET_SHARE = 0.98
#: The columns of :func:`generate_ruler`'s frame, in order.
_COLUMNS = ["context", "question", "answer_prefix", "answer", "max_new_tokens", "task", "length", "max_length", "index"]


def _vt_example_sentences(cache: _TokenizerCache, seed: int) -> int:
    """Noise sentences of the vt few-shot example: the most that fit RULER's 500 tokens."""
    if cache.vt_example_sentences is None:
        budget = _VT_EXAMPLE_LENGTH - TOKENS_TO_GENERATE["vt"]
        example = _VtExample(f"{seed}|vt|example-size", cache)
        try:
            cache.vt_example_sentences = _fit(example, budget, cache.tokens, _VT_EXAMPLE_LENGTH).units
        except _PromptTooLong:  # a verbose tokenizer: the shortest example (5 noise lines) it is
            logger.debug("vt: the shortest few-shot example exceeds %d tokens", _VT_EXAMPLE_LENGTH)
            cache.vt_example_sentences = example.min_units
    return cache.vt_example_sentences


def _resolve_tasks(tasks: str | Iterable[str] | None, qa_paths: Mapping[str, Any] | None) -> list[str]:
    if tasks is None:
        return list(available_tasks(qa_paths))
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {list(RULER_TASKS)}")
    for task in names:
        if task in QA_DATASETS and _qa_path(task, qa_paths) is None:
            dataset = QA_DATASETS[task]
            what = {
                "squad": "SQuAD v2 dev JSON (dev-v2.0.json)",
                "hotpotqa": "HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json)",
            }[dataset]
            raise ValueError(
                f"{task} is unavailable: it needs a local {what}; pass qa_paths={{{dataset!r}: '/path/to/file'}}"
            )
    return list(dict.fromkeys(names))


def _sample_factory(
    task: str,
    seed: int,
    cache: _TokenizerCache,
    max_seq_length: int,
    qa_paths: Mapping[str, Any] | None,
    split: str | None = None,
) -> Callable[[int], Iterable[_Sample]]:
    """For each sample index, the candidate samples to try (QA: the next random questions)."""
    if task in _NIAH:
        return lambda i: [_NiahSample(task, stream_key(split, seed, task, i), cache, split)]
    if task == "vt":
        example = _vt_example_sentences(cache, seed)
        return lambda i: [_VtSample(task, stream_key(split, seed, task, i), cache, example, split)]
    if task == "cwe":
        return lambda i: [_CweSample(task, stream_key(split, seed, task, i), cache, max_seq_length, split)]
    if task == "fwe":
        return lambda i: [_FweSample(task, stream_key(split, seed, task, i), cache, max_seq_length, split)]
    if split is not None:
        raise ValueError(f"{task}: the QA tasks have no dev/test split (their questions and documents are shared)")
    dataset = QA_DATASETS[task]
    data = _load_qa(dataset, _qa_path(task, qa_paths))
    if not data.questions:
        raise ValueError(f"{task}: the {dataset} file has no answerable questions")
    order = list(range(len(data.questions)))
    random.Random(f"{seed}|{task}|questions").shuffle(order)
    queue = iter(order)

    def candidates(i: int) -> Iterable[_Sample]:
        for q in queue:
            yield _QaSample(task, f"{seed}|{task}|q{q}", cache, data, data.questions[q])

    return candidates


def generate_ruler(
    tokenizer: Any,
    max_seq_length: int,
    tasks: str | Iterable[str] | None = None,
    num_samples: int = 500,
    seed: int = 0,
    qa_paths: Mapping[str, str | PathLike[str]] | None = None,
    split: str | None = None,
) -> pd.DataFrame:
    """Generate RULER samples of ``max_seq_length`` tokens as a kvpress DataFrame.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer; prompt lengths are counted with it (no special tokens).
    max_seq_length : int
        Target length: prompt tokens + tokens to generate, at most this and (synthetic tasks) at
        least 98% of it (exceptions: ``niah_multikey_3`` below ~2k tokens, see the package
        docstring, :mod:`evaluation.benchmarks.ruler`).
    tasks : str or iterable of str, optional
        Task names from :data:`RULER_TASKS`; default: :func:`available_tasks` of ``qa_paths``.
    num_samples : int, default 500
        Samples per task (RULER's default is 500).
    seed : int, default 0
        Seed of every random choice. The same seed gives the same frame; the global random state
        is neither used nor changed.
    qa_paths : mapping, optional
        Local QA files: ``{"squad": "dev-v2.0.json", "hotpotqa": "hotpot_dev_distractor_v1.json"}``
        (the keys ``"qa_1"`` / ``"qa_2"`` also work). ``qa_1`` / ``qa_2`` need them.
    split : {"dev", "test"}, optional
        The dev or test split (:mod:`evaluation.benchmarks.ruler.splits`): no random stream, essay or needle
        value is shared between them. ``None`` (default): the unsplit generator, every essay in RULER's order.

    Returns
    -------
    pandas.DataFrame
        One row per sample, tasks in the given order: ``context, question, answer_prefix, answer,
        max_new_tokens, task, length, max_length, index`` (see the package docstring), with
        ``context + "\\n" + question`` equal to RULER's prompt.

    Raises
    ------
    ValueError
        For an unknown task, a QA task without its file (the message names the ``qa_paths`` key),
        or a ``max_seq_length`` too small for a task (e.g. ``vt``, whose few-shot example alone has
        ~470 tokens).
    FileNotFoundError
        If a QA file does not exist.

    Examples
    --------
    >>> from pikvpress.models import load_model
    >>> _, tokenizer = load_model()  # doctest: +SKIP
    >>> df = generate_ruler(tokenizer, 4096, tasks=["niah_single_1", "vt"], num_samples=20)  # doctest: +SKIP
    """
    if not isinstance(max_seq_length, (int, np.integer)) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    check_split(split)
    names = _resolve_tasks(tasks, qa_paths)
    cache = _cache_for(tokenizer)
    tokens = cache.tokens
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tqdm(total=len(names) * num_samples, desc=f"RULER {max_seq_length}", unit="sample", delay=3.0) as bar:
        for task in names:
            ttg = TOKENS_TO_GENERATE[task]
            budget = max_seq_length - ttg
            if budget <= 0:
                raise ValueError(
                    f"{task}: max_seq_length={max_seq_length} leaves no room beside {ttg} tokens to generate"
                )
            bar.set_postfix_str(task, refresh=False)
            factory = _sample_factory(task, seed, cache, max_seq_length, qa_paths, split)
            task_rows: list[dict[str, Any]] = []
            for index in range(num_samples):
                sample, fitted = _fit_first(task, factory(index), budget, tokens, max_seq_length, index, num_samples)
                task_rows.append(_row(task, sample, fitted, index, max_seq_length))
                bar.update()
            if task_rows:
                _log_lengths(task, max_seq_length, [r["length"] + ttg for r in task_rows])
            rows.extend(task_rows)
    logger.info("Generated %d RULER samples in %.1f s", len(rows), time.perf_counter() - start)
    return pd.DataFrame(rows, columns=_COLUMNS)


def _fit_first(
    task: str,
    candidates: Iterable[_Sample],
    budget: int,
    tokens: _Tokens,
    max_seq_length: int,
    index: int,
    num_samples: int,
) -> tuple[_Sample, _Fitted]:
    """The first candidate whose shortest prompt fits (only QA questions may be skipped), fitted."""
    fitted = sample = None
    skipped = 0
    for sample in candidates:
        try:
            fitted = _fit_and_fill(sample, budget, tokens, max_seq_length)
            break
        except _PromptTooLong:
            if not isinstance(sample, _QaSample):
                raise
            skipped += 1
    if fitted is None or sample is None:
        raise ValueError(
            f"{task}: ran out of questions after {index} of {num_samples} samples "
            f"({skipped} skipped because their gold documents exceed max_seq_length={max_seq_length})"
        )
    if skipped:
        logger.debug("%s: skipped %d questions whose gold documents do not fit", task, skipped)
    return sample, fitted


def _row(task: str, sample: _Sample, fitted: _Fitted, index: int, max_seq_length: int) -> dict[str, Any]:
    """The row of a fitted sample: its prompt cut into ``context`` and ``question``, and the extras."""
    prompt = fitted.text[: len(fitted.text) - len(sample.answer_prefix)]
    context, question = _split(task, prompt)
    return {
        "context": context,
        "question": question,
        "answer_prefix": sample.answer_prefix,
        "answer": list(sample.answer),
        "max_new_tokens": TOKENS_TO_GENERATE[task],
        "task": task,
        "length": fitted.tokens,
        "max_length": int(max_seq_length),
        "index": index,
    }


def _log_lengths(task: str, max_seq_length: int, lengths: list[int]) -> None:
    """Log a task's range of prompt + generation tokens; warn when a synthetic task falls short of the target."""
    logger.info(
        "RULER %s at %d: %d samples, prompt + generation %d-%d tokens",
        task,
        max_seq_length,
        len(lengths),
        min(lengths),
        max(lengths),
    )
    if min(lengths) < _TARGET_SHARE * max_seq_length:
        level = logging.INFO if task in QA_DATASETS else logging.WARNING
        logger.log(
            level,
            "RULER %s: some samples are shorter than %d%% of %d tokens (shortest: %d)%s",
            task,
            round(100 * _TARGET_SHARE),
            max_seq_length,
            min(lengths),
            " (whole documents)" if task in QA_DATASETS else "",
        )
