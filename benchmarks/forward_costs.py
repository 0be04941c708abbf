"""Where a sweep's forwards go: every forward of the model timed, by kind (prefill, question, decode step) and batch
size.

Runs ``evaluation/configs/leaderboard.yaml`` on the dev split (1 prompt per task, 50% and 87.5% removed by default)
into a temporary directory, with hooks timing each forward, and prints the forwards, seconds, milliseconds per forward
and per row at each (kind, batch size).

    python benchmarks/forward_costs.py                                  # the defaults above
    python benchmarks/forward_costs.py num_samples=2 "compression_ratio=[0.25]"
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time

from pikvpress_eval.config import load_config
from pikvpress_eval.runner import Evaluator
from tabulate import tabulate


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:
        overrides = ["split=dev", "num_samples=1", "compression_ratio=[0.5, 0.875]", "batch_size=16", *argv]
        config = load_config("evaluation/configs/leaderboard.yaml", [*overrides, f"output_dir={out}"])
        evaluator = Evaluator(config)
        log: list[tuple[int, int, float]] = []
        began: dict[str, float] = {}
        evaluator.model.register_forward_pre_hook(
            lambda m, a, kw: began.__setitem__("t", time.perf_counter()), with_kwargs=True
        )
        evaluator.model.register_forward_hook(
            lambda m, a, kw, o: log.append((*kw["input_ids"].shape, time.perf_counter() - began["t"])),
            with_kwargs=True,
        )
        start = time.perf_counter()
        evaluator.run()
        total = time.perf_counter() - start
    table = collections.defaultdict(lambda: [0, 0.0, 0])
    for b, q, seconds in log:
        kind = "decode" if q == 1 else ("prefill" if b == 1 and q > 500 else "question")
        cell = table[kind, b]
        cell[0], cell[1], cell[2] = cell[0] + 1, cell[1] + seconds, cell[2] + b
    rows = [
        [kind, b, n, f"{t:.1f}", f"{1000 * t / n:.1f}", f"{1000 * t / rows:.1f}"]
        for (kind, b), (n, t, rows) in sorted(table.items())
    ]
    print(f"\n{total:.1f} s in all, {sum(t for *_, t in log):.1f} s in forwards ({' '.join(overrides)})\n")
    print(tabulate(rows, headers=["kind", "B", "forwards", "s", "ms each", "ms per row"], tablefmt="github"))


if __name__ == "__main__":
    main(sys.argv[1:])
