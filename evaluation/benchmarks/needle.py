"""Needle in a haystack: a number hidden at a depth of an essay haystack, asked for after the context."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import pandas as pd
from transformers import PreTrainedTokenizerBase

from ..haystack import essays_text

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_NEW_TOKENS = 12
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


def make_sample(tokenizer: PreTrainedTokenizerBase, context_length: int, depth: float, seed: int = 0) -> NeedleSample:
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


def needle_rows(
    tokenizer: PreTrainedTokenizerBase,
    context_lengths: list[int],
    depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS,
    seed: int = 0,
) -> pd.DataFrame:
    """The grid of context lengths x depths as kvpress rows (answer = [the hidden number])."""
    rows = []
    for length in context_lengths:
        for depth in depths:
            sample = asdict(make_sample(tokenizer, length, depth, seed))
            sample["answer"] = [sample["answer"]]
            rows.append(dict(sample, max_new_tokens=MAX_NEW_TOKENS, task="needle"))
    return pd.DataFrame(rows)


def score_needle(df: pd.DataFrame) -> dict:
    """Share of runs whose answer contains the number (x100), overall and per (length, depth) cell."""
    hits = [100.0 * float(ref[0] in str(pred)) for ref, pred in zip(df["answer"], df["predicted_answer"])]
    scored = df.assign(hit=hits)
    grid = scored.groupby(["context_length", "depth"])["hit"].mean()
    return {
        "score": float(scored["hit"].mean()),
        "needle": float(scored["hit"].mean()),
        "grid": {f"{length}|{depth}": float(value) for (length, depth), value in grid.items()},
    }
