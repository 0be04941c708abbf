"""Token counting, cached per tokenizer: fast counts and the token costs of the fixed haystack material."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .haystacks import _cwe_pool, _essay
from .templates import _NOISE_SENTENCES, NOISE

logger = logging.getLogger(__package__)  # the package's name, as when RULER was one module


class _Tokens:
    """Counts tokens the way ``tokenizer.encode(text, add_special_tokens=False)`` does, fast."""

    def __init__(self, tokenizer: Any) -> None:
        try:  # no strong reference: the per-tokenizer cache must not keep its tokenizer alive
            self._ref: Callable[[], Any] = weakref.ref(tokenizer)
        except TypeError:
            self._ref = lambda: tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if hasattr(backend, "encode_batch") else None
        if self.backend is not None:
            probe = "RULER probe: The grass is green.\n VAR ABCDE = 12345 1. word 2. word"
            if len(self.backend.encode(probe, add_special_tokens=False).ids) != len(self._slow(probe)):
                self.backend = None  # the Python wrapper does something the backend does not

    @property
    def tokenizer(self) -> Any:
        return self._ref()

    def _slow(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count(self, text: str) -> int:
        if self.backend is not None:
            return len(self.backend.encode(text, add_special_tokens=False).ids)
        return len(self._slow(text))

    def counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        if self.backend is not None:
            return [len(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def starts(self, text: str) -> np.ndarray | None:
        """Start character of each token, or None without offsets."""
        if self.backend is not None:
            offsets = self.backend.encode(text, add_special_tokens=False).offsets
        else:
            try:
                offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            except (NotImplementedError, TypeError, ValueError, KeyError):
                return None
        return np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))

    def marginal(self, before: str, after: str) -> int:
        """Tokens that ``after`` adds when appended to ``before``."""
        return self.count(before + after) - self.count(before)


class _TokenizerCache:
    """Per-tokenizer token counts of the fixed material (essay, word pools, index numbers)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokens = _Tokens(tokenizer)
        self._essay_cum: dict[str | None, np.ndarray] = {}
        self._cwe_costs: dict[str | None, np.ndarray] = {}
        self._index_cum = np.zeros(1, dtype=np.int64)
        self._noise: dict[str, tuple[int, list[int]]] = {}
        self.vt_example_sentences: int | None = None

    def essay_cum(self, split: str | None = None) -> np.ndarray:
        """``cum[n]``: tokens of the (split's) essay's first ``n`` words."""
        if split not in self._essay_cum:
            essay = _essay(split)
            start = time.perf_counter()
            starts = self.tokens.starts(essay.text)
            if starts is not None:
                ends = np.searchsorted(starts, essay.word_ends, side="left")
            else:  # no offsets: count the words one by one (with their leading space)
                words = [essay.words[0]] + [" " + w for w in essay.words[1:]]
                ends = np.cumsum(self.tokens.counts(words))
            self._essay_cum[split] = np.concatenate([[0], ends]).astype(np.int64)
            logger.debug("Essay token counts in %.2f s", time.perf_counter() - start)
        return self._essay_cum[split]

    def cwe_costs(self, split: str | None = None) -> np.ndarray:
        """Tokens of ``" " + word`` for every word of the (split's) cwe pool."""
        if split not in self._cwe_costs:
            words = _cwe_pool(split)
            self._cwe_costs[split] = np.asarray(self.tokens.counts([" " + w for w in words]), dtype=np.int64)
        return self._cwe_costs[split]

    def index_cum(self, n: int) -> int:
        """Tokens of ``" 1. 2. ... n."``: the numbering of a cwe list of ``n`` entries."""
        if n >= len(self._index_cum):
            size = max(n + 1, 2 * len(self._index_cum), 1024)
            first = len(self._index_cum)
            costs = self.tokens.counts([f" {i}." for i in range(first, size)])
            self._index_cum = np.concatenate([self._index_cum, self._index_cum[-1] + np.cumsum(costs)])
        return int(self._index_cum[n])

    def noise(self, joiner: str, line_end: str) -> tuple[int, list[int]]:
        """Marginal tokens of a noise line and of the first 0-4 sentences of one."""
        key = joiner + "|" + line_end
        if key not in self._noise:
            line = NOISE + line_end
            partial = [0] + [
                self.tokens.marginal(line, joiner + " ".join(_NOISE_SENTENCES[:p]) + line_end) for p in range(1, 5)
            ]
            self._noise[key] = (self.tokens.marginal(line, joiner + line), partial)
        return self._noise[key]


_CACHES: weakref.WeakKeyDictionary[Any, _TokenizerCache] = weakref.WeakKeyDictionary()


def _cache_for(tokenizer: Any) -> _TokenizerCache:
    try:
        cache = _CACHES.get(tokenizer)
        if cache is None:
            cache = _CACHES[tokenizer] = _TokenizerCache(tokenizer)
        return cache
    except TypeError:  # not weak-referenceable or not hashable
        return _TokenizerCache(tokenizer)
