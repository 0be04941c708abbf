"""Runs a sweep (its run directories: :mod:`.runs`), sharing prefills."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress.cache import cache_bytes_read, cache_nbytes

from .config import EvalConfig
from .datasets import load_rows
from .prefill import can_reuse_prefill, capture_prefill, replay_press
from .runs import METRICS, PREDICTIONS, Run, plan_runs  # noqa: F401  (PREDICTIONS: the tests' import)

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def _chat_template(tokenizer, enabled: bool) -> Iterator[None]:
    """Hide the tokenizer's chat template for rows that are scored without one (LongBench's rule)."""
    saved = tokenizer.chat_template
    if not enabled:
        tokenizer.chat_template = None
    try:
        yield
    finally:
        tokenizer.chat_template = saved


@contextlib.contextmanager
def _last_step_reads(model) -> Iterator[dict]:
    """While active, ``reads["bytes"]`` is the KV bytes the model's latest forward read
    (:func:`~pikvpress.cache.cache_bytes_read` of its cache right after the forward, before kvpress's pipeline
    removes the answer)."""
    reads: dict = {"bytes": None}

    def hook(module, args, kwargs, output) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            reads["bytes"] = cache_bytes_read(cache)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield reads
    finally:
        handle.remove()


class Evaluator:
    """Runs every (press, ratio) of a config on every sample, sharing prefills where it can.

    Parameters
    ----------
    config : EvalConfig
        A validated configuration.
    model, tokenizer : optional
        Already loaded; otherwise loaded from ``config.model``.
    """

    def __init__(self, config: EvalConfig, model=None, tokenizer=None):
        self.config = config
        if model is None:
            from pikvpress.models import load_model

            model, tokenizer = load_model(config.model, device=config.device, **config.model_kwargs)
        self.model, self.tokenizer = model, tokenizer
        self.pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
        self.prefills = 0  # model prefills run (shared or not), for the speed-up report

    # ---------------------------------------------------------------------------------------------
    def _texts(self, row: pd.Series) -> tuple[str, str, str]:
        """(context, question, answer_prefix); query-aware runs compress the question with the context."""
        context, question = row["context"], row["question"]
        if self.config.query_aware:
            context, question = context + question, ""
        return context, question, row.get("answer_prefix", "") or ""

    def _tokenize(self, row: pd.Series) -> tuple[torch.Tensor, torch.Tensor]:
        context, question, answer_prefix = self._texts(row)
        max_len = self.config.max_context_length or int(1e10)
        with _chat_template(self.tokenizer, bool(row.get("use_chat_template", True))):
            inputs = self.pipe.preprocess(context, [question], answer_prefix, max_len)
        return inputs["context_ids"].to(self.model.device), inputs["questions_ids"][0].to(self.model.device)

    def _max_new_tokens(self, row: pd.Series) -> int:
        return int(self.config.max_new_tokens or row["max_new_tokens"])

    @torch.no_grad()
    def _answer(self, cache, context_ids, question_ids, row) -> tuple[str, float | None]:
        """The answer, and the KV bytes its last decode step read (before the answer leaves the cache)."""
        lengths = [cache.get_seq_length(i) for i in range(len(cache))]
        with _last_step_reads(self.model) as reads:
            answer = self.pipe.generate_answer(
                question_ids=question_ids, cache=cache, context_length=context_ids.shape[1],
                max_new_tokens=self._max_new_tokens(row),
            )
        self.pipe._remove_answer_from_cache(cache, lengths)
        return answer, reads["bytes"]

    @torch.no_grad()
    def _run_alone(self, run: Run, row: pd.Series, index: int) -> None:
        """A plain kvpress pipeline call, with the press's own prefill."""
        start = time.perf_counter()
        context, question, answer_prefix = self._texts(row)
        cache = DynamicCache()
        chat = bool(row.get("use_chat_template", True))
        with _chat_template(self.tokenizer, chat), _last_step_reads(self.model) as reads:
            answer = self.pipe(
                context,
                question=question,
                answer_prefix=answer_prefix,
                press=self.config.build_press(run.press_name, run.compression_ratio),
                max_new_tokens=self._max_new_tokens(row),
                max_context_length=self.config.max_context_length,
                cache=cache,
            )["answer"]
        self.prefills += 1
        run.record(
            index, answer, kv_bytes=cache_nbytes(cache), seconds=time.perf_counter() - start, kv_bytes_read=reads["bytes"]
        )

    # ---------------------------------------------------------------------------------------------
    def run(self, rows: pd.DataFrame | None = None) -> list[dict[str, Any]]:
        """Run (or resume) the sweep; return every run's metrics."""
        rows = load_rows(self.config, self.tokenizer) if rows is None else rows
        runs = plan_runs(self.config)
        for run in runs:
            if not run.finished:
                run.start()
        pending = [run for run in runs if not run.finished]
        todo = sum(len(rows) - len(run.done) for run in pending)
        progress = tqdm(total=todo, desc=f"{self.config.dataset} sweep", unit="run")
        shared = [
            run for run in pending
            if self.config.prefill_reuse
            and can_reuse_prefill(self.config.build_press(run.press_name, run.compression_ratio), self.model)
        ]
        alone = [run for run in pending if run not in shared]
        for index, row in rows.iterrows():
            waiting = [run for run in shared if index not in run.done]
            if waiting:
                self._run_shared(waiting, row, index, progress)
            for run in alone:
                if index not in run.done:
                    self._run_alone(run, row, index)
                    progress.update()
        progress.close()
        results = []
        for run in runs:
            if run.finished:
                results.append(json.loads((run.directory / METRICS).read_text()))
            else:
                results.append(run.finish(rows))
        return results

    @torch.no_grad()
    def _run_shared(self, runs: list[Run], row: pd.Series, index: int, progress) -> None:
        start = time.perf_counter()
        context_ids, question_ids = self._tokenize(row)
        prefill = capture_prefill(self.model, context_ids)
        self.prefills += 1
        shared_seconds = (time.perf_counter() - start) / len(runs)
        for run in runs:
            start = time.perf_counter()
            press = self.config.build_press(run.press_name, run.compression_ratio)
            cache = replay_press(self.model, prefill, press)
            kv_bytes = cache_nbytes(cache)
            answer, read = self._answer(cache, context_ids, question_ids, row)
            run.record(
                index, answer, kv_bytes=kv_bytes, seconds=shared_seconds + time.perf_counter() - start, kv_bytes_read=read
            )
            progress.update()
