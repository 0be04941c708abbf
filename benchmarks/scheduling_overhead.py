"""Decode-step time with AdaptiveSchedulingPress against no press and kvpress's DecodingPress, side by side.

One prefill (essay text in the chat template) fills a cache; every configuration decodes from a copy of it,
one token per step with explicit positions, in interleaved rounds so machine noise hits them alike. The
table reports the median step time, its ratio to decoding without a press in the same run, and the time
spent inside the press's hooks per step (statistics, scoring, evictions), measured directly.

    python benchmarks/scheduling_overhead.py                            # default model, 1k tokens
    python benchmarks/scheduling_overhead.py --steps 64 --rounds 2      # quicker
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from contextlib import nullcontext

import torch
from kvpress import DecodingPress, KnormPress, StreamingLLMPress
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress_eval.benchmark_cli import benchmark_parser, load_benchmark_model
from pikvpress_eval.haystack import essay_context_ids
from pikvpress_eval.timing import timed_hooks
from pikvpress import AdaptiveSchedulingPress

logger = logging.getLogger(__name__)


def presses(budget: int, interval: int) -> dict[str, object]:
    return {
        "no press": None,
        "adaptive": AdaptiveSchedulingPress(budget=budget, policy="adaptive", interval=interval),
        "h2o": AdaptiveSchedulingPress(budget=budget, policy="h2o", interval=interval),
        "DecodingPress(knorm)": DecodingPress(
            base_press=KnormPress(), compression_interval=interval, target_size=budget, hidden_states_buffer_size=0
        ),
        "DecodingPress(streaming_llm)": DecodingPress(
            base_press=StreamingLLMPress(),
            compression_interval=interval,
            target_size=budget,
            hidden_states_buffer_size=0,
        ),
    }


@torch.no_grad()
def decode_seconds(model, press, prefilled: DynamicCache, first: torch.Tensor, start: int, steps: int):
    """(median step seconds, mean seconds per step inside the press's hooks)."""
    cache = copy.deepcopy(prefilled)
    times = []
    token = first
    with timed_hooks(press) as in_hooks, press(model) if press is not None else nullcontext():
        for step in range(steps):
            position = torch.tensor([start + step])
            t0 = time.perf_counter()
            logits = model(
                input_ids=token, past_key_values=cache, cache_position=position, position_ids=position[None]
            ).logits
            times.append(time.perf_counter() - t0)
            token = logits[:, -1:].argmax(-1)
    return statistics.median(times), in_hooks[0] / steps


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model, tokenizer = load_benchmark_model(args)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    ids = essay_context_ids(pipe, args.tokens).to(model.device)
    prefilled = DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=prefilled).logits
    first = logits[:, -1:].argmax(-1)
    configs = presses(args.budget, args.interval)
    steps: dict[str, list[float]] = {name: [] for name in configs}
    hooks: dict[str, list[float]] = {name: [] for name in configs}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name, press in configs.items():
            step, in_hooks = decode_seconds(model, press, prefilled, first, ids.shape[1], args.steps)
            steps[name].append(step)
            hooks[name].append(in_hooks)
    base = statistics.median(steps["no press"])
    rows = []
    for name in configs:
        step, in_hooks = statistics.median(steps[name]), statistics.median(hooks[name])
        share = "" if name == "no press" else f"{in_hooks / step * 100:.1f}%"  # the hooks run inside the step
        rows.append(
            [
                name,
                f"{step * 1000:.1f}",
                f"{step / base:.2f}x",
                "" if name == "no press" else f"{in_hooks * 1000:.2f}",
                share,
            ]
        )
    print(
        f"{args.tokens}-token context, {args.steps} decode steps, budget {args.budget}, interval {args.interval}; "
        f"median step time of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print(tabulate(rows, headers=["press", "step ms", "vs no press", "press ms / step", "press share of step"]))


if __name__ == "__main__":
    main()
