"""Do a sweep's records equal what a plain kvpress pipeline call gives? Reruns a seeded draw of recorded samples
one at a time and compares.

The sweep records each (press, ratio, prompt) through the harness's fast path: one prefill shared by every press
(each press's hooks replayed on the captured layer inputs), ratio-independent scores shared between ratios, answers
``batch_size`` at a time over padded or stacked caches. This draws ``--per-press`` recorded samples of every press
of a config (uniformly over its ratios and prompts, seeded) from the config's own run directories and reruns each
with ``prefill_reuse=False`` and ``batch_size=1``: the harness's one-at-a-time path, which is a kvpress pipeline
call with the press's own prefill (``pipeline(context, question=..., press=...)``), the same per-sample seed. It
prints, per press and in all, how many answers, held bytes and bytes read are the same, and lists every difference;
for each differing answer, the step where the one-at-a-time answer leaves the recorded one, the top-2 logit gap
there and whether the record took the second choice (a near tie); with ``--float64``, the same rerun in float64
(which answer does the more precise arithmetic give?).

    python benchmarks/verify_records.py --config evaluation/configs/leaderboard.yaml --per-press 8
    python benchmarks/verify_records.py --config evaluation/configs/leaderboard.yaml --per-press 2 --press snapkv
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from pikvpress_eval.config import load_config
from pikvpress_eval.datasets import load_rows
from pikvpress_eval.runner import Evaluator
from pikvpress_eval.runs import PREDICTIONS, plan_runs, read_predictions
from tabulate import tabulate
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: the record fields compared besides the answer (exactly: they are counted from tensors and token ids)
MEASURED = ("kv_bytes", "kv_bytes_bf16", "kv_bytes_read", "context_tokens", "bf16_kv_bytes")


def draw(config, per_press: int, seed: int, presses: list[str] | None = None) -> list[tuple[str, float, int, dict]]:
    """``per_press`` recorded samples of each press (all when it has fewer), as (press, ratio, index, record).
    Every press is drawn in turn whatever ``presses`` keeps, so a subset gets the same samples as the whole."""
    by_press: dict[str, list[tuple[str, float, int, dict]]] = defaultdict(list)
    for run in plan_runs(config):
        path = run.directory / PREDICTIONS
        if not path.exists():
            continue
        records, _ = read_predictions(path)
        by_press[run.press_name] += [(run.press_name, run.compression_ratio, i, r) for i, r in sorted(records.items())]
    rng = random.Random(f"verify|{seed}")
    drawn = []
    for press in sorted(by_press):
        pool = by_press[press]
        chosen = rng.sample(pool, min(per_press, len(pool)))
        if not presses or press in presses:
            drawn += chosen
    return drawn


def named(config, samples: list[str]) -> list[tuple[str, float, int, dict]]:
    """The records named ``press@ratio#index`` (e.g. ``compactor@0.75#152``), as :func:`draw` returns them."""
    runs = {(run.press_name, round(run.compression_ratio, 6)): run for run in plan_runs(config)}
    chosen = []
    for text in samples:
        press, _, rest = text.partition("@")
        ratio, _, index = rest.partition("#")
        run = runs.get((press, round(float(ratio), 6)))
        records = (
            read_predictions(run.directory / PREDICTIONS)[0] if run and (run.directory / PREDICTIONS).exists() else {}
        )
        if int(index) not in records:
            raise SystemExit(f"{text}: no such record under {config.output_dir}")
        chosen.append((press, run.compression_ratio, int(index), records[int(index)]))
    return chosen


def alone(
    config, model, tokenizer, rows, press: str, ratio: float, index: int, directory: Path, logits: list | None = None
) -> dict:
    """The record of one sample answered the harness's one-at-a-time way (its own prefill, batch 1); with
    ``logits``, the next-token logits of every answering forward are appended to it (the question's forward, then
    each decode step: kvpress's pipeline prefills through the inner model, so only answering reaches the head)."""
    single = dataclasses.replace(
        config,
        press_name=[press],
        compression_ratio=[ratio] if ratio else config.compression_ratio,
        prefill_reuse=False,
        batch_size=1,
        output_dir=str(directory),
    ).validate()
    (run,) = [r for r in plan_runs(single) if r.press_name == press and r.compression_ratio == ratio]
    handle = None
    if logits is not None:
        handle = model.register_forward_hook(lambda m, a, o: logits.append(o.logits[0, -1].double().clone()))
    try:
        Evaluator(single, model, tokenizer).run(rows.loc[[index]])
    finally:
        if handle is not None:
            handle.remove()
    records, _ = read_predictions(run.directory / PREDICTIONS)
    return records[index]


def first_difference(tokenizer, logits: list, recorded: str) -> str:
    """Where a one-at-a-time answer (its step ``logits``) leaves the ``recorded`` text: the step, the top-2 logit
    gap there, and whether the recorded text goes on with that step's second choice (a near tie)."""
    ids = [int(step.argmax()) for step in logits]
    for k in range(len(ids)):
        if not recorded.startswith(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)):
            top = logits[k].topk(2)
            gap = float(top.values[0] - top.values[1])
            second = tokenizer.decode([*ids[:k], int(top.indices[1])], skip_special_tokens=True)
            follows = "yes" if recorded.startswith(second) else "no"
            return f"step {k}: top-2 gap {gap:.2e}, recorded takes the 2nd choice: {follows}"
    return "the recorded answer goes on past the alone answer's end (a stop token)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--per-press", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--press", nargs="*", help="only these presses")
    parser.add_argument("--sample", nargs="*", help="these records only: press@ratio#index (no draw)")
    parser.add_argument("--float64", action="store_true", help="rerun each differing sample alone in float64")
    parser.add_argument("overrides", nargs="*", help="field=value (as for python -m evaluation run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from pikvpress.models import load_model

    config = load_config(args.config, args.overrides)
    drawn = named(config, args.sample) if args.sample else draw(config, args.per_press, args.seed, args.press)
    if not drawn:
        raise SystemExit(f"no record under {config.output_dir}")
    model, tokenizer = load_model(config.model, device=config.device, **config.model_kwargs)
    rows = load_rows(config, tokenizer)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for n, (press, ratio, index, record) in enumerate(tqdm(drawn, desc="rerun alone", unit="sample")):
            again = alone(config, model, tokenizer, rows, press, ratio, index, Path(scratch) / str(n))
            same = {name: record.get(name) == again.get(name) for name in MEASURED if name in record}
            results.append((press, ratio, index, record, again, same))
        differing = [r for r in results if r[3]["predicted_answer"] != r[4]["predicted_answer"]]
        where: dict[tuple, str] = {}
        for k, (press, ratio, index, record, _, _) in enumerate(differing):
            logits: list = []
            alone(config, model, tokenizer, rows, press, ratio, index, Path(scratch) / f"gap_{k}", logits)
            where[(press, ratio, index)] = first_difference(tokenizer, logits, record["predicted_answer"])
        wide = {}
        if args.float64 and differing:
            model64 = model.to(torch.float64)
            for k, (press, ratio, index, record, _, _) in enumerate(differing):
                logits = []
                answer = alone(
                    config, model64, tokenizer, rows, press, ratio, index, Path(scratch) / f"f64_{k}", logits
                )["predicted_answer"]
                wide[(press, ratio, index)] = (answer, first_difference(tokenizer, logits, record["predicted_answer"]))
            model.to(torch.float32)
    seconds = time.perf_counter() - start

    def tally(name: str, mine: list) -> list:
        """A table row: how many of ``mine`` have the same answer, bytes held and bytes read."""
        answers = sum(r[3]["predicted_answer"] == r[4]["predicted_answer"] for r in mine)
        held = sum(r[5].get("kv_bytes", True) and r[5].get("kv_bytes_bf16", True) for r in mine)
        read = sum(r[5].get("kv_bytes_read", True) for r in mine)
        n = len(mine)
        return [
            name,
            n,
            f"{answers}/{n}" + (f" ({answers / n:.1%})" if name == "all" else ""),
            f"{held}/{n}",
            f"{read}/{n}",
        ]

    table = [tally(press, [r for r in results if r[0] == press]) for press in sorted({r[0] for r in results})]
    table.append(tally("all", results))
    total = len(results)
    print(
        f"\n{config.output_dir}: {total} records drawn (seed {args.seed}, up to {args.per_press} per press), "
        f"rerun one at a time with the press's own prefill in {seconds:.0f} s\n"
    )
    print(tabulate(table, headers=["press", "drawn", "same answer", "same bytes held", "same bytes read"]))
    for press, ratio, index, record, again, same in results:
        if record["predicted_answer"] != again["predicted_answer"] or not all(same.values()):
            line = (
                f"\n- {press} @ {ratio} sample {index}: recorded {record['predicted_answer']!r}, "
                f"alone {again['predicted_answer']!r}"
            )
            if (press, ratio, index) in where:
                line += f"\n  float32 alone against the record: {where[(press, ratio, index)]}"
            if (press, ratio, index) in wide:
                answer, gap = wide[(press, ratio, index)]
                line += f"\n  float64 alone {answer!r}; against the record: {gap}"
            for name, equal in same.items():
                if not equal:
                    line += f"; {name} {record.get(name)} vs {again.get(name)}"
            print(line)


if __name__ == "__main__":
    main()
