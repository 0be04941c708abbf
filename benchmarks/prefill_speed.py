"""Prefill time with ExpertRoutingPress (each router) against no press, SnapKV and KVzip, side by side.

Every configuration prefills the same context (essay text wrapped in the model's chat template, as
kvpress's pipeline wraps it) under its press; configurations run in interleaved rounds so machine
noise hits them alike, and the table reports the median time, its ratio to the no-press prefill
measured in the same run, and the time spent inside the press's hooks (its whole overhead, measured
directly: whole-prefill differences of a few percent drown in machine noise) against SnapKV's.

    python benchmarks/prefill_speed.py                              # default model, 1k / 2k / 4k tokens
    python benchmarks/prefill_speed.py --tokens 1024 --rounds 2     # quicker
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from kvpress import KVzipPress, SnapKVPress
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress_eval.benchmark_cli import benchmark_parser, load_benchmark_model
from pikvpress_eval.haystack import essay_context_ids
from pikvpress_eval.timing import timed_hooks
from pikvpress import ExpertRoutingPress

logger = logging.getLogger(__name__)

RATIO = 0.5


def presses() -> dict[str, object]:
    return {
        "no press": None,
        "snapkv": SnapKVPress(RATIO),
        "expert_routing gate": ExpertRoutingPress(RATIO, router="gate"),
        "expert_routing keys": ExpertRoutingPress(RATIO, router="keys"),
        "expert_routing keys + attention": ExpertRoutingPress(RATIO, router="keys", scorer="attention"),
        "expert_routing learned": ExpertRoutingPress(RATIO, router="learned"),
        "expert_routing learned heads": ExpertRoutingPress(RATIO, router="learned", head_budget="adaptive"),
        "kvzip": KVzipPress(RATIO),
    }


@torch.no_grad()
def prefill_seconds(model, press, ids: torch.Tensor) -> tuple[float, float]:
    """(whole prefill, time inside the press's forward hooks) in seconds."""
    cache = DynamicCache()
    timed = None if isinstance(press, KVzipPress) else press  # KVzip works after the prefill, not in hooks
    start = time.perf_counter()
    with timed_hooks(timed) as in_hooks:
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
    return time.perf_counter() - start, in_hooks[0]


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model, tokenizer = load_benchmark_model(args)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    configs = presses()
    rows = []
    for tokens in args.tokens:
        ids = essay_context_ids(pipe, tokens).to(model.device)
        prefill_seconds(model, None, ids)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in configs}
        hooks: dict[str, list[float]] = {name: [] for name in configs}
        for _ in tqdm(range(args.rounds), desc=f"{tokens} tokens", unit="round"):
            for name, press in configs.items():
                total, in_hooks = prefill_seconds(model, press, ids)
                times[name].append(total)
                hooks[name].append(in_hooks)
        base = statistics.median(times["no press"])
        snap_hooks = statistics.median(hooks["snapkv"])
        for name, values in times.items():
            t = statistics.median(values)
            h = statistics.median(hooks[name])
            in_hooks = "" if name in ("no press", "kvzip") else f"{h * 1000:.0f}"
            vs_snap = "" if name in ("no press", "snapkv", "kvzip") else f"{h / snap_hooks:.2f}x"
            rows.append([tokens, name, f"{t * 1000:.0f}", f"{t / base:.2f}x", in_hooks, vs_snap])
    print(f"prefill of the context, median of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads;")
    print("press time: inside the press's hooks (scoring, routing, pruning) during that prefill")
    print(tabulate(rows, headers=["tokens", "press", "prefill ms", "vs no press", "press ms", "press vs snapkv"]))


if __name__ == "__main__":
    main()
