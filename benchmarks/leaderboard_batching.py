"""The harness's batching on the leaderboard's own prompts: do its batched answers equal the one-at-a-time answers, and
how much faster is it at B = 1, 4, 8, 16?

The harness (``pikvpress_eval.runner``) answers a block's (press, ratio, prompt) jobs ``batch_size`` at a time, prompt
by prompt, from the most compressed run to the least, with the ratio-independent scores shared between a press's
ratios. This benchmark builds exactly those jobs for the first ``--samples`` prompts per task of a config (the
leaderboard's test split by default: the same prompts as the leaderboard's first rows), and answers each prompt's
jobs at each batch size side by side, from fresh copies of the same caches. As in the harness, the jobs of several
prompts form one block (:func:`~pikvpress_eval.batching.answer_stream` over each prompt's jobs cut into chunks of
``B``, the long answers of the whole block set aside and merged); the prompts are split into two blocks, answered at
B = 1, 4, 8, 16 in that order in the first and in the reverse order in the second, so that a drift of the machine's
speed weighs on every batch size alike:

- ``B = 1`` is the harness's one-at-a-time path, kvpress's ``pipeline.generate_answer``;
- ``B > 1`` is the harness's :func:`pikvpress_eval.batching.answer_stream` over the block's jobs, ``B`` at a time
  (dense and packed caches in separate batches; a batch down to ``B // 4`` rows still answering is set aside and goes
  on merged with the other batches' long answers).

It prints (a) the agreement of the answers at ``--agreement-batch`` with the one-at-a-time answers, per press and in
all, with every difference listed (first differing step, top-2 logit gaps, the job rerun alone in float64), and (b) the
answering throughput (jobs per second of answering, compression excluded) at each batch size, with its ratio to B=1.

    python benchmarks/leaderboard_batching.py                                   # leaderboard.yaml, 1 prompt per task
    python benchmarks/leaderboard_batching.py --samples 2 --ratios 0.5 0.875
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pikvpress_eval.batching import Job, RowCache, answer_stream, combine_mode, masked_key_indices
from pikvpress_eval.config import load_config
from pikvpress_eval.datasets import load_rows
from pikvpress_eval.prefill import can_reuse_prefill, capture_prefill, replay_press
from pikvpress_eval.presses import keeps_every_token
from pikvpress_eval.runner import Evaluator
from pikvpress_eval.score_memo import ScoreMemo
from tabulate import tabulate
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batched_answering import Answer, Prompt, answer_alone, fresh, print_differences, top2_gap

logger = logging.getLogger(__name__)


@dataclass
class Light:
    """An answer without its logits (a sweep's worth of logits does not fit in memory): its text, tokens and the
    top-2 logit gap at every step."""

    text: str
    token_ids: list[int]
    gaps: list[float]


def light(answer: Answer) -> Light:
    return Light(answer.text, answer.token_ids, [top2_gap(x) for x in answer.logits])


@torch.no_grad()
def answer_at(model, pipe, tokenizer, block, size: int) -> tuple[list[Answer], float]:
    """Every job's answer of a block of prompts (``block``: each prompt's jobs) at batch size ``size`` as the harness
    gives it (:func:`answer_stream`: each prompt's jobs in chunks of ``size``, dense and packed caches batched apart,
    the block's long answers set aside and continued together), in the block's job order, and the seconds spent."""
    jobs = [job for prompt_jobs in block for job in prompt_jobs]
    rows = [fresh(model, row) for _, _, row in jobs]
    answers: list[Answer | None] = [None] * len(jobs)
    start = time.perf_counter()
    if size == 1:
        for i, ((_, prompt, _), row) in enumerate(zip(jobs, rows)):
            answers[i] = answer_alone(model, pipe, row, prompt)
        return answers, time.perf_counter() - start
    stream = [Job(i, rows[i], jobs[i][1].question_ids, jobs[i][1].max_new_tokens) for i in range(len(jobs))]
    chunks, first = [], 0
    for prompt_jobs in block:
        mine = stream[first : first + len(prompt_jobs)]
        chunks += [mine[at : at + size] for at in range(0, len(mine), size)]
        first += len(prompt_jobs)
    for i, a in answer_stream(model, tokenizer, chunks, size, keep_logits=True):
        answers[i] = Answer(a.text, a.token_ids, [x.float() for x in a.logits])
    return answers, time.perf_counter() - start


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="evaluation/configs/leaderboard.yaml")
    parser.add_argument("--samples", type=int, default=1, help="prompts per task (the config's first ones)")
    parser.add_argument("--presses", nargs="+", default=None, help="a subset of the config's presses")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="a subset of the config's ratios")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--agreement-batch", type=int, default=None, help="default: the config's batch_size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"num_samples={args.samples}"]
    if args.presses:
        overrides.append(f"press_name=[{', '.join(args.presses)}]")
    if args.ratios:
        overrides.append(f"compression_ratio=[{', '.join(str(r) for r in args.ratios)}]")
    config = load_config(args.config, overrides)
    agreement = args.agreement_batch or max(int(config.batch_size), 2)
    sizes = list(dict.fromkeys([1, *args.batch_sizes, agreement]))
    evaluator = Evaluator(config)
    model, tokenizer, pipe = evaluator.model, evaluator.tokenizer, evaluator.pipe
    model.eval()
    runs = [
        (name, ratio) for name, ratio in config.sweep() if can_reuse_prefill(config.build_press(name, ratio), model)
    ]
    runs.sort(  # the harness's order within a prompt: from the fewest kept tokens to the most (Evaluator._kept_share)
        key=lambda run: 1.0 if keeps_every_token(run[0], config.composed_presses) else 1.0 - run[1]
    )
    rows = load_rows(config, tokenizer)
    verdicts: dict = {}
    results: dict[int, list[tuple[str, Prompt, Light]]] = {s: [] for s in sizes}
    seconds = {s: 0.0 for s in sizes}
    modes: dict[str, int] = {}
    prompts: list[list[tuple[str, Prompt, RowCache]]] = []
    for _, row in tqdm(list(rows.iterrows()), desc="prefill and compression", unit="prompt"):
        context_ids, question_ids = evaluator._tokenize(row)
        prefill = capture_prefill(model, context_ids)
        memo = ScoreMemo(prefill, verdicts)
        prompt = Prompt(row["task"], int(row["index"]), row, context_ids, question_ids, evaluator._max_new_tokens(row))
        jobs = []
        for name, ratio in runs:
            press = config.build_press(name, ratio)
            with memo.sharing(press, name):
                cache = replay_press(model, prefill, press)
            row_cache = RowCache(cache, context_ids.shape[1], masked_key_indices(model))
            mode = combine_mode([row_cache])
            modes[mode] = modes.get(mode, 0) + 1
            jobs.append((f"{name}@{ratio:g}", prompt, row_cache))
        prompts.append(jobs)
        del prefill, memo
    half = (len(prompts) + 1) // 2
    blocks = [block for block in (prompts[:half], prompts[half:]) if block]
    progress = tqdm(total=len(rows) * len(runs) * len(sizes), desc="answers", unit="job")
    for number, block in enumerate(blocks):
        jobs = [job for prompt_jobs in block for job in prompt_jobs]  # answer_at's order
        for size in sizes if number % 2 == 0 else sizes[::-1]:
            answers, spent = answer_at(model, pipe, tokenizer, block, size)
            seconds[size] += spent
            results[size].extend((label, p, light(a)) for (label, p, _), a in zip(jobs, answers))
            progress.update(len(jobs))
            del answers
    progress.close()
    del prompts
    n = len(results[1])

    # (a) agreement
    per_press: dict[str, list[bool]] = {}
    diffs = []
    for (label, p, a), (_, _, b) in zip(results[1], results[agreement]):
        same = a.text == b.text
        per_press.setdefault(label.split("@")[0], []).append(same)
        if not same:
            step = next(
                (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                min(len(a.token_ids), len(b.token_ids)),
            )
            diffs.append((label, p, a, b, step))
    total_same = sum(sum(v) for v in per_press.values())
    print(
        f"\n### (a) Agreement at B={agreement} with one-at-a-time answering: {total_same}/{n} jobs "
        f"({total_same / n:.2%}); {len(rows)} prompts of {args.config} ({config.split or 'unsplit'} split, "
        f"{config.context_length} tokens), {len(runs)} (press, ratio) runs each\n"
    )
    others = [s for s in sizes if s not in (1, agreement)]
    table = []
    for name, same in per_press.items():
        labels = [i for i, (lab, _, _) in enumerate(results[1]) if lab.split("@")[0] == name]
        extra = [f"{sum(results[1][i][2].text == results[s][i][2].text for i in labels)}/{len(labels)}" for s in others]
        table.append([name, f"{sum(same)}/{len(same)}", *extra])
    print(
        tabulate(
            table, headers=["press", f"same at B={agreement}", *[f"same at B={s}" for s in others]], tablefmt="github"
        )
    )
    print_differences(config, model, tokenizer, diffs, agreement, lambda answer, step: answer.gaps[step], "job")

    # (b) throughput
    print(
        f"\n### (b) Answering throughput (jobs/s; prefill and compression excluded; {torch.get_num_threads()} threads)\n"
    )
    base = n / seconds[1]
    cells = [f"{n / seconds[s]:.2f} ({n / seconds[s] / base:.2f}x)" for s in sizes]
    print(tabulate([["all jobs", n, *cells]], headers=["", "jobs", *[f"B={s}" for s in sizes]], tablefmt="github"))
    print(f"\nCaches: {modes} (padded: dense, batched together; rows: packed/sharded, batched apart).")


if __name__ == "__main__":
    main()
