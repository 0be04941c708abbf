"""``python -m evaluation``: the pikvpress evaluation harness.

For now one command: a quick needle-in-a-haystack comparison of kvpress presses on the default
model (SmolLM2-135M-Instruct, offline), printed as a table.
"""

from __future__ import annotations

import argparse
import logging
import time

DEFAULT_PRESSES = ("no_press", "knorm", "snapkv", "expected_attention", "streaming_llm", "tova")


def build_parser() -> argparse.ArgumentParser:
    from pikvpress.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    quick = sub.add_parser("quick", help="needle-in-a-haystack comparison of presses at one ratio (default)")
    quick.add_argument("--model", default=DEFAULT_MODEL, help="default alias, HF id or local path")
    quick.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES))
    quick.add_argument("--compression-ratio", type=float, default=0.5)
    quick.add_argument("--context-lengths", type=int, nargs="+", default=[512, 1024])
    quick.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    quick.add_argument("--device", default="cpu")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--output", help="also write the per-run results to this CSV file")
    return parser


def quick(args: argparse.Namespace) -> None:
    import torch

    from evaluation.needle import run_needle, summary_table
    from evaluation.presses import build_press
    from pikvpress.models import load_model

    for name in args.presses:
        build_press(name, args.compression_ratio)  # bad names and ratios fail before the model loads
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    results = run_needle(
        model, tokenizer, args.presses, args.compression_ratio, tuple(args.context_lengths), tuple(args.depths),
        seed=args.seed,
    )
    if args.output:
        results.to_csv(args.output, index=False)
    table = summary_table(results)
    print(f"\nNeedle in a haystack, {args.model}, compression ratio {args.compression_ratio}, "
          f"{len(args.context_lengths)} lengths x {len(args.depths)} depths")
    print(table.to_markdown(floatfmt=".3f"))
    print(f"\n({time.perf_counter() - start:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["quick", *(argv or [])])
    quick(args)


if __name__ == "__main__":
    main()
