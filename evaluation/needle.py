"""Needle in a haystack: a number hidden at a depth of an essay haystack, asked for after the context."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase, pipeline

from evaluation.haystack import essays_text
from evaluation.presses import EAGER_PRESSES, build_press

logger = logging.getLogger(__name__)

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
KEYS = ("gentle-harbor", "silver-canyon", "quiet-meadow", "amber-falcon", "lucky-river")


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack prompt in kvpress's row format."""

    context: str
    question: str
    answer_prefix: str
    answer: str
    context_length: int
    depth: float


def make_sample(
    tokenizer: PreTrainedTokenizerBase, context_length: int, depth: float, seed: int = 0
) -> NeedleSample:
    """A haystack of ``context_length`` tokens (model tokenizer) with a needle at ``depth`` in [0, 1]."""
    rng = random.Random(f"{seed}-{context_length}-{depth}")
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(key=key, value=value)
    text = essays_text()
    chars = 8 * context_length  # English prose is ~4-5 characters a token: ample, without encoding it all
    while True:
        essay_ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(essay_ids) >= context_length or chars >= len(text):
            break
        chars *= 2
    needle_len = len(tokenizer.encode(" " + needle, add_special_tokens=False))
    haystack = essay_ids[: max(0, context_length - needle_len)]
    text = tokenizer.decode(haystack)
    # insert at the sentence boundary nearest the requested depth
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = 0 if depth == 0 or boundary < 0 else boundary + 1
    context = f"{text[:cut]} {needle}{text[cut:]}".strip()
    return NeedleSample(
        context=context,
        question=QUESTION.format(key=key),
        answer_prefix=ANSWER_PREFIX.format(key=key),
        answer=value,
        context_length=context_length,
        depth=depth,
    )


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's key and value tensors."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_needle(
    model,
    tokenizer: PreTrainedTokenizerBase,
    presses: list[str],
    compression_ratio: float = 0.5,
    context_lengths: tuple[int, ...] = (1024, 2048),
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    max_new_tokens: int = 12,
    seed: int = 0,
) -> pd.DataFrame:
    """Run every press on every (length, depth) sample; one row per run with score and KV bytes."""
    for name in presses:  # fail on a bad name before any work
        build_press(name, compression_ratio)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    samples = [make_sample(tokenizer, n, d, seed) for n in context_lengths for d in depths]
    rows = []
    progress = tqdm(total=len(presses) * len(samples), desc="needle", unit="run")
    for name in presses:
        if name in EAGER_PRESSES and model.config._attn_implementation != "eager":
            raise ValueError(f"press {name!r} needs attn_implementation='eager'")
        for sample in samples:
            cache = DynamicCache()
            press = build_press(name, compression_ratio)
            with torch.no_grad():
                answer = pipe(
                    sample.context,
                    question=sample.question,
                    answer_prefix=sample.answer_prefix,
                    press=press,
                    cache=cache,
                    max_new_tokens=max_new_tokens,
                )["answer"]
            rows.append(
                dict(
                    press=name,
                    compression_ratio=0.0 if name == "no_press" else compression_ratio,
                    context_length=sample.context_length,
                    depth=sample.depth,
                    score=float(sample.answer in answer),
                    kv_bytes=cache_nbytes(cache),
                    answer=answer.strip(),
                )
            )
            progress.update()
    progress.close()
    return pd.DataFrame(rows)


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows = presses; columns = accuracy per context length, overall, and KV bytes against no press."""
    by_length = results.pivot_table(index="press", columns="context_length", values="score", aggfunc="mean")
    by_length.columns = [f"acc@{c}" for c in by_length.columns]
    table = by_length.assign(accuracy=results.groupby("press")["score"].mean())
    kv = results.groupby("press")["kv_bytes"].mean()
    if "no_press" in kv.index:
        table["kv_vs_no_press"] = kv / kv["no_press"]
    table["kv_MiB"] = kv / 2**20
    order = [p for p in results["press"].unique()]
    return table.loc[order]
