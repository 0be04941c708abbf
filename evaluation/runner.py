"""Runs a sweep (its run directories: :mod:`.runs`), sharing prefills, answering ``batch_size`` samples at once.

Rows go in blocks of ``config.batch_size``. Each row of a block is prefilled once (:func:`~.prefill.capture_prefill`)
for every run that can share a prefill. Every (run, row) job of the block is then compressed on its own
(:func:`~.prefill.replay_press`; the scores that do not depend on the ratio are computed once per row and press,
:mod:`.score_memo`) and the jobs are answered ``batch_size`` at a time over their caches (:func:`~.batching.answer_stream`:
left padding, each row's own positions, stop tokens and budget; rows leave the batch when their answers end, and a
batch down to a quarter of its rows is set aside and goes on merged with other batches' long answers), each answer
what the job alone would give. Jobs go row by row, so that the answers of one batch (one prompt, several presses)
tend to end together. ``batch_size=1`` answers one job at a time with kvpress's ``generate_answer``, as before.
Runs whose presses need their own prefill (their own pipeline logic, eviction while decoding) run one row at a time
through kvpress's pipeline (:meth:`Evaluator._run_alone`); so do shared jobs whose caches cannot be batched
(:func:`~.batching.batching_blocker`, logged once per run).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress.cache import cache_bytes_read, cache_nbytes

from .batching import Job, RowCache, answer_stream, batching_blocker, masked_key_indices, prefill_bf16_bytes
from .config import EvalConfig
from .datasets import load_rows
from .prefill import CapturedPrefill, can_reuse_prefill, capture_prefill, replay_press
from .presses import evicts_while_answering, keeps_every_token
from .runs import METRICS, PREDICTIONS, Run, plan_runs, seed_globals  # noqa: F401  (PREDICTIONS: the tests' import)
from .score_memo import ScoreMemo

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


@contextlib.contextmanager
def _prefill_elements(cache: DynamicCache) -> Iterator[dict]:
    """While active, ``seen`` holds what the first update of each layer of ``cache`` stored (the uncompressed
    prefill, before any press's hook runs): ``seen["tokens"]``, the prefill's tokens, and ``seen["bf16_bytes"]``, 2
    bytes per element of the keys and values each layer held right after it (what :func:`capture_prefill` reads)."""
    seen: dict = {"tokens": None, "bf16_bytes": 0}
    layers: set[int] = set()
    update = cache.update

    def first_update(key_states, value_states, layer_idx, *args, **kwargs):
        out = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx not in layers:
            layers.add(layer_idx)
            stored = cache.layers[layer_idx]
            seen["tokens"] = key_states.shape[2] if seen["tokens"] is None else seen["tokens"]
            seen["bf16_bytes"] += prefill_bf16_bytes([(stored.keys, stored.values)])
        return out

    cache.update = first_update
    try:
        yield seen
    finally:
        del cache.update


@contextlib.contextmanager
def _held_when_answering(pipe, cache: DynamicCache) -> Iterator[dict]:
    """While active, ``held`` gets the bytes ``cache`` holds when kvpress's pipeline starts answering (its prefill
    compressed, before the question): ``held["bytes"]`` and ``held["bf16"]`` (:func:`~pikvpress.cache.cache_nbytes`).

    What the pipeline leaves after answering is not always that cache: it crops the question and the answer off, but
    a packed layer packs context tokens that the question pushed out of its full-precision residual, and they stay
    packed (fewer bytes than after the prefill). The shared path measures its cache before the question too."""
    held: dict = {}
    generate = pipe.generate_answer

    def first_call(*args, **kwargs):
        if not held:
            held["bytes"], held["bf16"] = cache_nbytes(cache), cache_nbytes(cache, torch.bfloat16)
        return generate(*args, **kwargs)

    pipe.generate_answer = first_call
    try:
        yield held
    finally:
        del pipe.generate_answer


def processing_order(rows: pd.DataFrame) -> list[Any]:
    """The order a sweep runs its rows in: round robin over the tasks (the first sample of every task, then the second
    of every task...), each task's samples in their order, so that a run stopped part way holds the same number of
    samples of every task (a stratified subset that can be reported with its intervals). Rows without a ``task``
    column keep their order. The rows' indices, which the records carry, do not change."""
    if "task" not in rows.columns or rows["task"].nunique() < 2:
        return list(rows.index)
    tasks = list(dict.fromkeys(rows["task"]))
    rank = rows.groupby("task", sort=False).cumcount()
    position = rows["task"].map({task: i for i, task in enumerate(tasks)})
    return sorted(rows.index, key=lambda index: (int(rank[index]), int(position[index])))


@dataclass
class _Prefilled:
    """One row's shared prefill, and what its runs record from it."""

    index: Any
    row: pd.Series
    context_ids: torch.Tensor
    question_ids: torch.Tensor
    prefill: CapturedPrefill | None  # None once every run sharing it has compressed its cache (:meth:`release`)
    seconds: float  # the prefill's time divided among the runs sharing it
    memo: ScoreMemo | None  # the scores of this prefill that the ratios of a press share
    bf16_kv_bytes: int = 0  # bytes a bf16 cache of the uncompressed prefill holds (2 per key and value element)

    def __post_init__(self) -> None:
        if self.prefill is not None:
            layers = self.prefill.layers.values()
            self.bf16_kv_bytes = prefill_bf16_bytes([(layer.keys, layer.values) for layer in layers])

    def release(self) -> None:
        """Drop the captured layer inputs and the shared scores (every run of the row has compressed its cache; the
        answers still to come need only the row, its ids and its measurements)."""
        self.prefill = None
        self.memo = None


def _released_before(last: _Prefilled | None, p: _Prefilled) -> _Prefilled:
    """``p``, after releasing ``last`` when the jobs have moved on from it (a row's jobs come one after another)."""
    if last is not None and last is not p:
        last.release()
    return p


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
        self._logged_fallbacks: set = set()  # runs whose caches could not be batched, reason logged
        self._score_verdicts: dict = {}  # which scorers may share their scores across ratios (ScoreMemo)

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
        """The row's answer budget: ``max_new_tokens`` or the row's own, capped by ``max_answer_tokens``."""
        budget = int(self.config.max_new_tokens or row["max_new_tokens"])
        cap = self.config.max_answer_tokens
        return budget if cap is None else min(budget, int(cap))

    @torch.no_grad()
    def _answer(self, cache, context_ids, question_ids, row) -> tuple[str, float | None]:
        """The answer, and the KV bytes its last decode step read (before the answer leaves the cache)."""
        lengths = [cache.get_seq_length(i) for i in range(len(cache))]
        with _last_step_reads(self.model) as reads:
            answer = self.pipe.generate_answer(
                question_ids=question_ids,
                cache=cache,
                context_length=context_ids.shape[1],
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
        seed_globals(run.sample_seed(index))
        press = self.config.build_press(run.press_name, run.compression_ratio)
        with (
            _chat_template(self.tokenizer, chat),
            _last_step_reads(self.model) as reads,
            _prefill_elements(cache) as prefill,
            _held_when_answering(self.pipe, cache) as held,
        ):
            answer = self.pipe(
                context,
                question=question,
                answer_prefix=answer_prefix,
                press=press,
                max_new_tokens=self._max_new_tokens(row),
                max_context_length=self.config.max_context_length,
                cache=cache,
            )["answer"]
        self.prefills += 1
        if evicts_while_answering(press) or not held:  # after answering (the report's KV_HELD_TITLE)
            held = {"bytes": cache_nbytes(cache), "bf16": cache_nbytes(cache, torch.bfloat16)}
        run.record(
            index,
            answer,
            kv_bytes=held["bytes"],
            kv_bytes_bf16=held["bf16"],
            seconds=time.perf_counter() - start,
            kv_bytes_read=reads["bytes"],
            context_tokens=prefill["tokens"],
            bf16_kv_bytes=prefill["bf16_bytes"],
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
            run
            for run in pending
            if self.config.prefill_reuse
            and can_reuse_prefill(self.config.build_press(run.press_name, run.compression_ratio), self.model)
        ]
        alone = [run for run in pending if run not in shared]
        size = max(1, int(self.config.batch_size))
        order = processing_order(rows)
        for start in range(0, len(order), size):
            block = rows.loc[order[start : start + size]]
            if shared:
                self._run_shared(shared, block, progress)
            for index, row in block.iterrows():
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

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_shared(self, runs: list[Run], block: pd.DataFrame, progress) -> None:
        """A block of rows: one prefill per row (its time split among the runs lacking the row), then every (run, row)
        the runs lack, answered ``batch_size`` at a time (:meth:`_answer_jobs`), or one at a time with kvpress's
        generate_answer when ``batch_size`` is 1.

        The jobs go row by row (a row's answers tend to have the same length whatever the press: a batch of them ends
        together), and within a row from the run that keeps the fewest tokens to the one that keeps the most
        (:meth:`_kept_share`; the caches of a batch are left-padded to its longest)."""
        order = sorted(runs, key=self._kept_share)  # stable: the config's order within a share
        jobs = ((run, p) for p in self._prefilled(runs, block) for run in order if p.index not in run.done)
        size = max(1, int(self.config.batch_size))
        for (run, p, nbytes, replay), answer in answer_stream(
            self.model, self.tokenizer, self._chunks(jobs, size, progress), size
        ):
            self._record(run, p, answer.text, nbytes, p.seconds + replay + answer.seconds, answer.kv_bytes_read)
            progress.update()

    def _prefilled(self, runs: list[Run], block: pd.DataFrame) -> Iterator[_Prefilled]:
        """The block's rows that some run lacks, each prefilled when its first job is due (so that only the rows being
        compressed hold their captured prefill; see :meth:`_chunks`), its time split among the runs lacking it."""
        for index, row in block.iterrows():
            sharing = sum(index not in run.done for run in runs)
            if not sharing:
                continue
            start = time.perf_counter()
            context_ids, question_ids = self._tokenize(row)
            prefill = capture_prefill(self.model, context_ids)
            self.prefills += 1
            seconds = (time.perf_counter() - start) / sharing
            memo = ScoreMemo(prefill, self._score_verdicts)
            yield _Prefilled(index, row, context_ids, question_ids, prefill, seconds, memo)

    def _record(
        self, run: Run, p: _Prefilled, answer: str, held: tuple[int, int], seconds: float, read: float | None
    ) -> None:
        """Record one row; ``held``: the bytes its compressed cache holds, and would hold in a bf16 run."""
        run.record(
            p.index,
            answer,
            kv_bytes=held[0],
            kv_bytes_bf16=held[1],
            seconds=seconds,
            kv_bytes_read=read,
            context_tokens=p.context_ids.shape[1],
            bf16_kv_bytes=p.bf16_kv_bytes,
        )

    def _replay(self, run: Run, p: _Prefilled) -> DynamicCache:
        """Row ``p``'s cache compressed by a fresh press of ``run``, sharing the scores that do not depend on the
        ratio with the run's other ratios (:class:`~.score_memo.ScoreMemo`)."""
        press = self.config.build_press(run.press_name, run.compression_ratio)
        seed_globals(run.sample_seed(p.index))
        with p.memo.sharing(press, run.press_name):
            return replay_press(self.model, p.prefill, press)

    def _answer_one(self, run: Run, p: _Prefilled, progress) -> None:
        """One row of a shared prefill: its cache compressed by a fresh press, answered alone with kvpress's
        generate_answer; ``seconds``: its prefill share plus the compression and the answer."""
        start = time.perf_counter()
        cache = self._replay(run, p)
        kv_bytes = (cache_nbytes(cache), cache_nbytes(cache, torch.bfloat16))
        self._answer_replayed(run, p, cache, kv_bytes, time.perf_counter() - start, progress)

    def _answer_replayed(
        self, run: Run, p: _Prefilled, cache: DynamicCache, kv_bytes: tuple[int, int], replay: float, progress
    ) -> None:
        """Answer a job's cache just replayed (its head-wise masked keys still on the attention modules) alone with
        kvpress's generate_answer, and record it; ``replay``: the seconds its compression took."""
        start = time.perf_counter()
        answer, read = self._answer(cache, p.context_ids, p.question_ids, p.row)
        self._record(run, p, answer, kv_bytes, p.seconds + replay + time.perf_counter() - start, read)
        progress.update()

    def _kept_share(self, run: Run) -> float:
        """The share of a prompt's tokens that ``run``'s caches keep: 1 for no press and the presses that remove no
        token (masks only, channel pruning; :func:`~.presses.keeps_every_token`), else ``1 - ratio``. Jobs go from
        the smallest share to the largest, so that a batch pads its rows to about their own length."""
        if keeps_every_token(run.press_name, self.config.composed_presses):
            return 1.0
        return 1.0 - float(run.compression_ratio)

    def _chunks(self, jobs: Iterable[tuple[Run, _Prefilled]], size: int, progress) -> Iterator[list[Job]]:
        """The jobs, ``size`` at a time, each compressed by a fresh press of its run, for
        :func:`~.batching.answer_stream` (which answers a chunk's dense and packed caches as two batches and lets the
        answers that run long go on together with other chunks'). A chunk of one job is answered alone with kvpress's
        generate_answer; so is a job whose cache cannot be batched (the reason is logged once per run). A job's key
        carries what its record needs: its run, its prefill, the bytes its cache holds, its compression time."""
        jobs = iter(jobs)
        last: _Prefilled | None = None
        while chunk := list(itertools.islice(jobs, size)):
            if len(chunk) == 1:  # a batch of one: exactly the one-at-a-time path
                last = _released_before(last, chunk[0][1])
                self._answer_one(*chunk[0], progress)
                continue
            batchable = []
            for run, p in chunk:
                last = _released_before(last, p)
                began = time.perf_counter()
                cache = self._replay(run, p)
                row_cache = RowCache(cache, p.context_ids.shape[1], masked_key_indices(self.model))
                nbytes = (cache_nbytes(cache), cache_nbytes(cache, torch.bfloat16))
                replay = time.perf_counter() - began
                reason = batching_blocker(self.model, [row_cache])
                if reason is None:
                    key = (run, p, nbytes, replay)
                    batchable.append(Job(key, row_cache, p.question_ids, self._max_new_tokens(p.row)))
                    continue
                if run.directory not in self._logged_fallbacks:
                    self._logged_fallbacks.add(run.directory)
                    logger.info(
                        "%s at %.2f: answering one sample at a time: %s", run.press_name, run.compression_ratio, reason
                    )
                self._answer_replayed(run, p, cache, nbytes, replay, progress)
            if batchable:
                yield batchable
        if last is not None:
            last.release()
