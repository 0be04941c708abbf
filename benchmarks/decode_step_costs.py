"""What one greedy step costs per press: ``answer_batch`` over ``B`` copies of one replayed cache (the first dev
niah_single_1 prompt of ``evaluation/configs/leaderboard.yaml``, stop token disabled, 12 answer tokens), at B = 1
and 8, with the question's forward and the mean decode step timed by hooks.

    python benchmarks/decode_step_costs.py
"""

from __future__ import annotations

import time

from pikvpress_eval.batching import RowCache, answer_batch, combine_mode, masked_key_indices
from pikvpress_eval.config import load_config
from pikvpress_eval.datasets import load_rows
from pikvpress_eval.prefill import capture_prefill, replay_press
from pikvpress_eval.runner import Evaluator
from tabulate import tabulate

RUNS = [
    ("knorm", 0.875),
    ("no_press", 0.0),
    ("adakv_snapkv", 0.875),
    ("expected_attention", 0.5),
    ("think", 0.5),
    ("pikv_int4", 0.875),
    ("quantization_int4", 0.0),
]


def main() -> None:
    config = load_config("evaluation/configs/leaderboard.yaml", ["split=dev", "num_samples=1", "tasks=[niah_single_1]"])
    evaluator = Evaluator(config)
    model, tokenizer = evaluator.model, evaluator.tokenizer
    model.generation_config.eos_token_id = [10**6]  # no stop token: every row takes its 12 steps
    context_ids, question_ids = evaluator._tokenize(load_rows(config, tokenizer).iloc[0])
    prefill = capture_prefill(model, context_ids)
    times: list[tuple[int, float]] = []
    began: dict[str, float] = {}
    model.register_forward_pre_hook(lambda m, a, kw: began.__setitem__("t", time.perf_counter()), with_kwargs=True)
    model.register_forward_hook(
        lambda m, a, kw, o: times.append((kw["input_ids"].shape[1], time.perf_counter() - began["t"])),
        with_kwargs=True,
    )
    table = []
    for name, ratio in RUNS:
        cells = []
        for b in (1, 8):
            rows = []
            for _ in range(b):
                cache = replay_press(model, prefill, config.build_press(name, ratio))
                rows.append(RowCache(cache, context_ids.shape[1], masked_key_indices(model)))
            times.clear()
            answer_batch(model, tokenizer, rows, [question_ids] * b, [12] * b)
            steps = [t for q, t in times if q == 1]
            cells += [f"{1000 * times[0][1]:.0f}", f"{1000 * sum(steps) / len(steps):.1f}"]
        table.append([f"{name} @ {ratio}", combine_mode(rows[:1]), *cells, f"{float(cells[3]) / 8:.1f}"])
    headers = ["press", "combine", "question B=1 (ms)", "step B=1", "question B=8", "step B=8", "per row B=8"]
    print(tabulate(table, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
