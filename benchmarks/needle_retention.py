"""Which tokens do kvpress's scorer presses keep on the leaderboard's RULER prompts? Per press, the share of
(layer, KV head) pairs whose kept tokens include the whole needle value, the first token (the attention sink), the
prompt's opening (the system prompt and the task instruction, tokens 1-47) and the context's last 256 tokens.

Each press runs its own prefill of the prompt's context as the harness tokenizes it (chat template, question left
out: the leaderboard's presses compress before the question is seen); its ``score`` is wrapped to read the scores
and the kept set is the top ``n_kept`` per head, as ``ScorerPress.compress`` keeps them.

    python benchmarks/needle_retention.py --ratio 0.25 --tasks niah_single_1 --samples 6
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from kvpress import CompactorPress, KnormPress, SnapKVPress, TOVAPress
from kvpress.presses.scorer_press import compute_n_kept
from pikvpress_eval.config import load_config
from pikvpress_eval.datasets import load_rows
from pikvpress_eval.runner import Evaluator
from tabulate import tabulate
from transformers import DynamicCache

from pikvpress.models import load_model

logger = logging.getLogger(__name__)

PRESSES = {"snapkv": SnapKVPress, "knorm": KnormPress, "tova": TOVAPress, "compactor": CompactorPress}
COLUMNS = ("whole needle value", "first token", "tokens 1-47", "last 256 tokens")


def value_span(tokenizer, ids: list[int], value: str) -> list[int] | None:
    """The positions of ``value``'s tokens in ``ids`` (with or without a leading space), or None."""
    for text in (" " + value, value):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        for i in range(len(ids) - len(tokens) + 1):
            if ids[i : i + len(tokens)] == tokens:
                return list(range(i, i + len(tokens)))
    return None


def retention(model, press_cls, ratio: float, context_ids: torch.Tensor, needle: list[int]) -> np.ndarray:
    """Mean over (layer, KV head) of: the needle value kept whole, token 0 kept, share of tokens 1-47 kept, share
    of the last 256 tokens kept."""
    press = press_cls(compression_ratio=ratio)
    length = context_ids.shape[1]
    rows: list[tuple[float, float, float, float]] = []
    score = press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], ratio)
        for kept in scores.topk(n_kept, dim=-1).indices[0]:
            kept = set(kept.tolist())
            rows.append(
                (
                    float(all(p in kept for p in needle)),
                    float(0 in kept),
                    sum(p in kept for p in range(1, 48)) / 47,
                    sum(p in kept for p in range(length - 256, length)) / 256,
                )
            )
        return scores

    press.score = recording
    with torch.no_grad(), press(model):
        model(context_ids, past_key_values=DynamicCache())
    return np.mean(np.array(rows), axis=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="evaluation/configs/leaderboard.yaml")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--tasks", nargs="+", default=["niah_single_1"])
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = ",".join(args.tasks)
    config = load_config(args.config, [f"tasks=[{tasks}]", f"num_samples={args.samples}", "press_name=[no_press]"])
    model, tokenizer = load_model(config.model)
    rows = load_rows(config, tokenizer)
    evaluator = Evaluator(config, model, tokenizer)
    found = {name: [] for name in PRESSES}
    for _, row in rows.iterrows():
        context_ids, _ = evaluator._tokenize(row)
        needle = value_span(tokenizer, context_ids[0].tolist(), str(row["answer"][0]))
        if needle is None:
            logger.warning("%s: needle value %r not found as tokens; skipped", row["task"], row["answer"][0])
            continue
        for name, press_cls in PRESSES.items():
            found[name].append(retention(model, press_cls, args.ratio, context_ids, needle))
    table = [[name, len(v), *np.round(np.mean(v, axis=0), 3)] for name, v in found.items() if v]
    print(f"\nratio {args.ratio}, {', '.join(args.tasks)}, test split, share of (layer, KV head) pairs keeping:")
    print(tabulate(table, headers=["press", "prompts", *COLUMNS]))


if __name__ == "__main__":
    main()
