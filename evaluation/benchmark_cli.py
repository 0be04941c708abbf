"""Command-line set-up the CPU benchmarks share: the model to load and the threads to run on."""

from __future__ import annotations

import argparse
import logging

import torch

from pikvpress import load_model


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--model`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def load_benchmark_model(args: argparse.Namespace):
    """Warnings-only logging, ``--threads`` applied, then ``(model, tokenizer)`` for ``--model`` (default model)."""
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model) if args.model else load_model()
