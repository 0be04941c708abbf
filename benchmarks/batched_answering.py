"""Batched answering on RULER: do answers at batch size B equal the one-at-a-time answers, and how much faster is it?

One prefill per RULER prompt (the harness's shared prefill) builds every press's compressed cache once; then, for
each press, the prompts are answered at every batch size side by side (the batch sizes' order rotates from one press
to the next, and every pass starts from fresh copies of the same caches):

- ``B = 1`` is the harness's one-at-a-time path, kvpress's ``pipeline.generate_answer``;
- ``B > 1`` is :func:`pikvpress_eval.batching.answer_batch` over blocks of ``B`` prompts.

Two tables follow, in markdown:

(a) agreement: the fraction of prompts whose greedy answer at ``--agreement-batch`` (default 8) equals the
    one-at-a-time answer, with every differing prompt listed: the first step where the tokens differ, the top-2 logit
    gap there in both runs, and the same prompt rerun alone in float64 (``model.double()``), whose top-2 gap and
    choice at that step say whether the difference is a floating-point tie;
(b) throughput: answered prompts per second of answering (prefill and compression excluded; combining the caches
    included) at each batch size, and its ratio to ``B = 1``.

    python benchmarks/batched_answering.py                          # 4 prompts per task, 16 in all
    python benchmarks/batched_answering.py --samples 2 --batch-sizes 1 4 --presses no_press knorm
    python benchmarks/batched_answering.py --threads 1    # a machine shared with other jobs: one thread is faster

The one-at-a-time and the batched passes keep every step's logits (for the agreement table) alike.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from pikvpress_eval.batching import RowCache, answer_batch, attention_modules, combine_mode, masked_key_indices
from pikvpress_eval.benchmarks.ruler import generate_ruler
from pikvpress_eval.config import EvalConfig
from pikvpress_eval.prefill import capture_prefill, replay_press
from pikvpress_eval.presses import press_names
from pikvpress_eval.runner import Evaluator
from tabulate import tabulate
from tqdm.auto import tqdm

from pikvpress.cache import cache_nbytes
from pikvpress.models import load_model

logger = logging.getLogger(__name__)

TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2"]
#: the quick sweep's PiKVPress (evaluation/configs/quick.yaml): learned routing, 4 shards packed int4
PIKV_INT4 = [
    {
        "press": "pikv",
        "compression": {"bits": 4, "key_group_size": 32, "residual_length": 32},
        "sharding": {"num_shards": 4},
    }
]


@dataclass
class Prompt:
    """One RULER prompt, tokenized as the harness tokenizes it."""

    task: str
    index: int
    row: object
    context_ids: torch.Tensor
    question_ids: torch.Tensor
    max_new_tokens: int
    caches: dict[str, RowCache] = field(default_factory=dict)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    logits: list[torch.Tensor]


def fresh(model, row: RowCache) -> RowCache:
    """A copy of a compressed cache (answering grows it; the rows' own layers are used in place)."""
    memo = {id(model.config): model.config}
    return RowCache(copy.deepcopy(row.cache, memo), row.context_length, row.masked_key_indices)


@torch.no_grad()
def answer_alone(model, pipe, row: RowCache, prompt: Prompt) -> Answer:
    """kvpress's generate_answer over the prompt's cache (the harness's batch_size=1 path), logits recorded."""
    logits: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: logits.append(o.logits[0, -1].float().clone()))
    for module, masked in zip(attention_modules(model), row.masked_key_indices):
        module.masked_key_indices = masked
    try:
        text = pipe.generate_answer(prompt.question_ids, row.cache, row.context_length, prompt.max_new_tokens)
    finally:
        handle.remove()
    return Answer(text, [int(x.argmax()) for x in logits], logits)


@torch.no_grad()
def answer_all(model, pipe, tokenizer, prompts: list[Prompt], press: str, size: int) -> tuple[list[Answer], float]:
    """Every prompt's answer at batch size ``size``, and the seconds spent answering (copies made beforehand)."""
    rows = [fresh(model, p.caches[press]) for p in prompts]
    answers: list[Answer] = []
    start = time.perf_counter()
    if size == 1:
        answers = [answer_alone(model, pipe, row, p) for row, p in zip(rows, prompts)]
    else:
        for at in range(0, len(prompts), size):
            block, caches = prompts[at : at + size], rows[at : at + size]
            out = answer_batch(
                model,
                tokenizer,
                caches,
                [p.question_ids for p in block],
                [p.max_new_tokens for p in block],
                keep_logits=True,
            )
            answers.extend(Answer(a.text, a.token_ids, [x.float() for x in a.logits]) for a in out)
    return answers, time.perf_counter() - start


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.double().topk(2).values
    return float(top[0] - top[1])


@torch.no_grad()
def float64_check(config, model64, pipe64, prompt: Prompt, press: str, step: int, tokens: tuple[int, int]) -> str:
    """The prompt answered alone in float64: its top-2 gap at ``step`` and which of ``tokens`` (alone, batched) it
    picks there. ``press``: a name of PRESS_SWEEP, or ``"name@ratio"``."""
    name, ratio = PRESS_SWEEP[press] if press in PRESS_SWEEP else (press.split("@")[0], float(press.split("@")[1]))
    try:
        prefill = capture_prefill(model64, prompt.context_ids)
        cache = replay_press(model64, prefill, config.build_press(name, ratio))
        row = RowCache(cache, prompt.context_ids.shape[1], masked_key_indices(model64))
        answer = answer_alone(model64, pipe64, row, prompt)
    except (ValueError, RuntimeError) as err:  # packed shards' kernel takes float16/bfloat16/float32 only
        logger.info("float64 rerun of %s %s#%d failed: %s", press, prompt.task, prompt.index, err)
        return f"n/a: no float64 run ({str(err).splitlines()[0][:70]})"
    if step >= len(answer.logits):
        return f"float64 answer ends before step {step}"
    choice = answer.token_ids[step]
    which = "alone's" if choice == tokens[0] else "batched's" if choice == tokens[1] else "neither"
    return f"gap {top2_gap(answer.logits[step]):.2e}, picks {which} token"


def print_differences(config, model, tokenizer, diffs, size: int, gap_at, what: str = "prompt") -> None:
    """List every differing answer (``diffs``: (press label, prompt, alone, batched, first differing step)): the
    top-2 logit gap there in both runs (``gap_at(answer, step)``) and the job rerun alone in float64."""
    if not diffs:
        print(f"\nNo {what} differs.")
        return
    model64 = copy.deepcopy(model).double()
    from transformers import pipeline

    pipe64 = pipeline("kv-press-text-generation", model=model64, tokenizer=tokenizer, device=model64.device)
    listing = []
    for name, p, a, b, step in tqdm(diffs, desc="float64 reruns", unit=what):
        if step < min(len(a.token_ids), len(b.token_ids)):
            tokens = (a.token_ids[step], b.token_ids[step])
            gaps = f"{gap_at(a, step):.2e} / {gap_at(b, step):.2e}"
            f64 = float64_check(config, model64, pipe64, p, name, step, tokens)
        else:
            gaps, f64 = "-", "one answer is a prefix of the other (a stop token)"
        listing.append([name, f"{p.task}#{p.index}", step, repr(a.text[:40]), repr(b.text[:40]), gaps, f64])
    print(f"\nDiffering {what}s (B=1 vs B={size}; gap: top-2 logit gap at the first differing step)\n")
    headers = ["press", "prompt", "step", "alone", f"B={size}", "gap alone / batched (float32)", "float64 alone"]
    print(tabulate(listing, headers=headers, tablefmt="github"))


#: press name -> (registry or composed name, ratio), filled in main
PRESS_SWEEP: dict[str, tuple[str, float]] = {}


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--context", type=int, default=2048, help="RULER target length in tokens")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--samples", type=int, default=4, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--presses",
        nargs="+",
        default=["no_press", "snapkv", "knorm", "expected_attention_plain", "pikv_int4"],
        help="harness press names (pikv_int4: the quick sweep's PiKVPress int4, 4 shards)",
    )
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--agreement-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer budget (0: each task's own)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = list(dict.fromkeys([1, *args.batch_sizes, args.agreement_batch]))
    model, tokenizer = load_model(args.model) if args.model else load_model()
    model.eval()
    known = press_names()
    presses = []
    for name in args.presses:
        if name == "expected_attention_plain" and name not in known:
            name = "expected_attention"
        presses.append(name)
        PRESS_SWEEP[name] = (name, 0.0 if name == "no_press" else args.ratio)
    config = EvalConfig(
        dataset="ruler",
        model=args.model or "smollm2-135m-instruct",
        max_new_tokens=args.max_new_tokens or None,
        composed_presses={"pikv_int4": PIKV_INT4} if "pikv_int4" in presses else {},
    )
    evaluator = Evaluator(config, model, tokenizer)
    rows = generate_ruler(tokenizer, args.context, args.tasks, num_samples=args.samples, seed=args.seed, split=None)
    prompts = []
    prefill_s = 0.0
    for _, row in tqdm(list(rows.iterrows()), desc="prefill and compress", unit="prompt"):
        context_ids, question_ids = evaluator._tokenize(row)
        start = time.perf_counter()
        prefill = capture_prefill(model, context_ids)
        prefill_s += time.perf_counter() - start
        prompt = Prompt(row["task"], int(row["index"]), row, context_ids, question_ids, evaluator._max_new_tokens(row))
        for name in presses:
            cache = replay_press(model, prefill, config.build_press(*PRESS_SWEEP[name]))
            prompt.caches[name] = RowCache(cache, context_ids.shape[1], masked_key_indices(model))
        prompts.append(prompt)
        del prefill
    pipe = evaluator.pipe
    n = len(prompts)
    results: dict[tuple[str, int], tuple[list[Answer], float]] = {}
    modes = {}
    for k, name in enumerate(tqdm(presses, desc="answer", unit="press")):
        modes[name] = combine_mode([p.caches[name] for p in prompts])
        order = sizes[k % len(sizes) :] + sizes[: k % len(sizes)]  # rotate the batch sizes' order
        for size in order:
            results[name, size] = answer_all(model, pipe, tokenizer, prompts, name, size)

    # (a) agreement
    size = args.agreement_batch
    agree_rows, diffs = [], []
    for name in presses:
        alone, batched = results[name, 1][0], results[name, size][0]
        same = [a.text == b.text for a, b in zip(alone, batched)]
        others = [s for s in sizes if s not in (1, size)]
        extra = [f"{sum(a.text == b.text for a, b in zip(alone, results[name, s][0])) / n:.0%}" for s in others]
        agree_rows.append([name, modes[name], f"{sum(same)}/{n}", f"{sum(same) / n:.0%}", *extra])
        for p, a, b in zip(prompts, alone, batched):
            if a.text == b.text:
                continue
            step = next(
                (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                min(len(a.token_ids), len(b.token_ids)),
            )
            diffs.append((name, p, a, b, step))
    print(f"\n### (a) Agreement at B={size} with one-at-a-time answering ({n} prompts, {args.context} tokens)\n")
    others = [s for s in sizes if s not in (1, size)]
    headers = ["press", "combine", f"same at B={size}", "fraction", *[f"fraction at B={s}" for s in others]]
    print(tabulate(agree_rows, headers=headers, tablefmt="github"))
    print_differences(config, model, tokenizer, diffs, size, lambda answer, step: top2_gap(answer.logits[step]))

    # (b) throughput
    print(f"\n### (b) Answering throughput (prompts/s; prefill excluded; {torch.get_num_threads()} threads)\n")
    table = []
    totals = {s: 0.0 for s in sizes}
    for name in presses:
        base = n / results[name, 1][1]
        cells = []
        for s in sizes:
            seconds = results[name, s][1]
            totals[s] += seconds
            cells.append(f"{n / seconds:.2f} ({n / seconds / base:.2f}x)")
        table.append([name, modes[name], *cells])
    base = len(presses) * n / totals[1]
    table.append(
        [
            "all presses",
            "",
            *[f"{len(presses) * n / totals[s]:.2f} ({len(presses) * n / totals[s] / base:.2f}x)" for s in sizes],
        ]
    )
    print(tabulate(table, headers=["press", "combine", *[f"B={s}" for s in sizes]], tablefmt="github"))
    kv = {name: sum(cache_nbytes(p.caches[name].cache) for p in prompts) / n / 2**20 for name in presses}
    print(
        f"\nPrefill: {prefill_s / n:.2f} s per prompt (excluded). Mean compressed cache: "
        + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in kv.items())
        + f". Answer budget: {args.max_new_tokens or 'each task its own'} tokens."
    )


if __name__ == "__main__":
    main()
