"""The RULER task generators: one sample of a task, with a haystack of ``n`` units, its cost and its text."""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from .haystacks import (
    _cwe_pool,
    _distinct,
    _essay,
    _essay_haystack,
    _noise_cost,
    _noise_lines,
    _random_value,
    _variable_names,
)
from .qa_data import QaData
from .splits import in_split
from .templates import (
    _NOISE_SENTENCES,
    CWE_ANSWER_PREFIX,
    CWE_TEMPLATE,
    FWE_ANSWER_PREFIX,
    FWE_TEMPLATE,
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    QA_ANSWER_PREFIX,
    QA_DOCUMENT,
    QA_TEMPLATE,
    TOKENS_TO_GENERATE,
    VT_ANSWER_PREFIX,
    VT_TEMPLATE,
)
from .tokens import _TokenizerCache


@dataclass(frozen=True)
class _NiahConfig:
    haystack: str  # "noise", "essay" or "needle"
    type_k: str  # "words" or "uuids"
    type_v: str  # "numbers" or "uuids"
    num_k: int
    num_v: int
    num_q: int


_NIAH: dict[str, _NiahConfig] = {
    "niah_single_1": _NiahConfig("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": _NiahConfig("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": _NiahConfig("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": _NiahConfig("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": _NiahConfig("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": _NiahConfig("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": _NiahConfig("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": _NiahConfig("essay", "words", "numbers", 1, 1, 4),
}

_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
_VT_NUM_HOPS = 4  # one chain of 4 hops: 5 variables
_CWE_NUM_COMMON = 10
_CWE_SMALL = 4096  # below this length: counts 6 / 1, example 20 words with counts 3 / 1
_FWE_ALPHA = 2.0
_FWE_ZETA = math.pi**2 / 6  # zeta(2.0); equals scipy.special.zeta(2.0) exactly
_FWE_WORD_LENGTH = 6
_QA_DOC_SEPARATOR = "\n\n"


class _Sample:
    """One sample under construction. Subclasses define the units of its haystack."""

    task: str
    answer: list[str]
    answer_prefix: str
    min_units: int = 1

    def __init__(self, task: str, key: str, split: str | None = None) -> None:
        self.task = task
        self.key = key
        self.split = split  # the dev/test split every drawn value belongs to (None: unsplit)
        self.rng = random.Random(key)

    def capacity(self) -> int | None:
        """The largest number of units, or None if unbounded."""
        return None

    def cost(self, n: int) -> int:  # pragma: no cover - abstract
        """Estimated haystack tokens of ``n`` units (monotone in ``n``)."""
        raise NotImplementedError

    def prompt(self, n: int) -> str:  # pragma: no cover - abstract
        """RULER's prompt (few-shot example included) with ``n`` units of haystack."""
        raise NotImplementedError

    def render(self, n: int) -> str:
        """The full text: prompt with ``n`` units, then the answer prefix."""
        return self.prompt(n) + self.answer_prefix

    def rng_for(self, n: int) -> random.Random:
        """The random generator of the haystack-dependent choices (positions, shuffles)."""
        return random.Random(f"{self.key}|{n}")

    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Change the haystack of ``n`` units to add up to ``slack`` tokens (within ``stop``); False if not."""
        return False

    def unstretch(self) -> None:
        """Undo :meth:`stretch`."""


class _NiahSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, split: str | None = None) -> None:
        super().__init__(task, key, split)
        cfg = _NIAH[task]
        self.cfg = cfg
        self.cache = cache
        rng = self.rng
        num_k = max(cfg.num_k, cfg.num_q)
        keys = _distinct(rng, cfg.type_k, num_k, split=split)
        values = [_distinct(rng, cfg.type_v, cfg.num_v, split=split) for _ in keys]
        needles = [
            NIAH_NEEDLE.format(type_needle_v=cfg.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs
        ]
        rng.shuffle(needles)
        queries_idx = rng.sample(range(num_k), cfg.num_q)
        queries = [keys[i] for i in queries_idx]
        self.keys, self.values, self.needles = keys, values, needles
        self.queries = queries
        self.answer = [v for i in queries_idx for v in values[i]]
        self.depths = rng.sample(_DEPTHS, len(needles)) if cfg.haystack == "essay" else []
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, cfg.type_v
        if cfg.num_q * cfg.num_v == 1:
            template, prefix = (
                s.replace("Some", "A").replace("are all", "is").replace("are", "is") for s in (template, prefix)
            )
            type_v = type_v[:-1]
        self.template = template.replace("{type_needle_v}", type_v).replace("{query}", query)
        self.answer_prefix = prefix.format(type_needle_v=type_v, query=query)
        if cfg.haystack == "noise":
            self.line_cost, self.partial_costs = cache.noise("\n", "")
            self.min_units = len(_NOISE_SENTENCES) * (len(needles) - 1) + 1
        elif cfg.haystack == "needle":
            self.lines: list[str] = []
            self.line_costs: list[int] = []
            self.line_cum = [0]
            self.min_units = len(needles)
            self.stretched: list[str] | None = None
        else:
            self.min_units = 1

    # -- units
    def capacity(self) -> int | None:
        return len(_essay(self.split).words) if self.cfg.haystack == "essay" else None

    def _extend_lines(self, n: int) -> None:
        """Draw distractor lines until there are ``n``."""
        while len(self.lines) < n:
            batch = max(64, n - len(self.lines))
            new = [
                NIAH_NEEDLE.format(
                    type_needle_v=self.cfg.type_v,
                    key=_distinct(self.rng, self.cfg.type_k, 1, self.keys, self.split)[0],
                    value=_random_value(self.rng, self.cfg.type_v, self.split),
                )
                for _ in range(batch)
            ]
            costs = self.cache.tokens.counts(["\n" + line for line in new])
            self.lines.extend(new)
            self.line_costs.extend(costs)
            for c in costs:
                self.line_cum.append(self.line_cum[-1] + c)

    def cost(self, n: int) -> int:
        kind = self.cfg.haystack
        if kind == "essay":
            return int(self.cache.essay_cum(self.split)[n])
        if kind == "noise":
            return _noise_cost(n, self.line_cost, self.partial_costs)
        self._extend_lines(n)
        return self.line_cum[n]

    # -- rendering
    def haystack(self, n: int) -> str:
        kind = self.cfg.haystack
        if kind == "essay":
            return _essay_haystack(n, self.depths, self.needles, self.split)
        if kind == "noise":
            lines = _noise_lines(n, "")
        else:
            self._extend_lines(n)
            lines = list(self.stretched if self.stretched is not None else self.lines[:n])
        positions = sorted(self.rng_for(len(lines)).sample(range(len(lines)), len(self.needles)), reverse=True)
        for position, needle in zip(positions, self.needles):
            lines.insert(position, needle)
        return "\n".join(lines)

    def prompt(self, n: int) -> str:
        return self.template.replace("{context}", self.haystack(n))

    # -- filling the last gap of a distractor-line haystack
    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Exchange/add distractor lines so that they add up to ``cost(n) + slack`` (within ``stop``)."""
        if self.cfg.haystack != "needle":
            return False
        target = self.line_cum[n] + slack
        best: tuple[int, list[int]] | None = None
        for m in (n, n + 1):
            pool_size = m + min(3 * m + 64, 512)
            self._extend_lines(pool_size)
            costs = self.line_costs
            chosen = list(range(m))
            total = sum(costs[i] for i in chosen)
            for candidate in range(m, pool_size):
                if total <= target and target - total <= stop:
                    break
                # the exchange that brings the total closest to the target, preferring totals that fit
                swaps = [(total - costs[i] + costs[candidate], pos) for pos, i in enumerate(chosen)]
                new_total, pos = min(swaps, key=lambda s: (s[0] > target, abs(target - s[0])))
                if (new_total > target, abs(target - new_total)) < (total > target, abs(target - total)):
                    chosen[pos] = candidate
                    total = new_total
            if total <= target and (best is None or total > best[0]):
                best = (total, sorted(chosen))
        if best is None or best[0] <= self.line_cum[n]:
            return False
        self.stretched = [self.lines[i] for i in best[1]]
        return True

    def unstretch(self) -> None:
        if self.cfg.haystack == "needle":
            self.stretched = None


class _VtSample(_Sample):
    def __init__(
        self, task: str, key: str, cache: _TokenizerCache, example_sentences: int, split: str | None = None
    ) -> None:
        super().__init__(task, key, split)
        self.cache = cache
        rng = self.rng
        self.vars, self.chain, self.value = self._chain(rng, 5, split)
        self.answer = list(self.vars)
        self.answer_prefix = VT_ANSWER_PREFIX.format(num_v=_VT_NUM_HOPS + 1, query=self.value)
        self.line_cost, self.partial_costs = cache.noise(" ", "\n")
        self.min_units = len(_NOISE_SENTENCES) * (len(self.chain) - 1) + 1
        self.example = _VtExample(f"{key}|example", cache, split).render(example_sentences) + "\n\n"

    @staticmethod
    def _chain(rng: random.Random, name_length: int, split: str | None = None) -> tuple[list[str], list[str], str]:
        names = _variable_names(rng, _VT_NUM_HOPS + 1, name_length, split)
        value = str(rng.randint(10000, 99998))
        while not in_split(value, split):
            value = str(rng.randint(10000, 99998))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(_VT_NUM_HOPS)]
        return names, chain, value

    @staticmethod
    def _prompt(chain: list[str], value: str, sentences: int, rng: random.Random) -> str:
        lines = _noise_lines(sentences, "\n")
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (position, element) in enumerate(zip(positions, chain)):
            lines.insert(position + j, element)
        context = " ".join(lines).replace(". \n", ".\n")
        return VT_TEMPLATE.format(context=context, query=value)

    def cost(self, n: int) -> int:
        return _noise_cost(n, self.line_cost, self.partial_costs)

    def prompt(self, n: int) -> str:
        return self.example + self._prompt(self.chain, self.value, n, self.rng_for(n))


class _VtExample(_Sample):
    """The vt few-shot example: 3-letter names, a 5-digit value, its answer after the prefix."""

    def __init__(self, key: str, cache: _TokenizerCache, split: str | None = None) -> None:
        super().__init__("vt", key, split)
        self.vars, self.chain, self.value = _VtSample._chain(self.rng, 3, split)
        self.answer = list(self.vars)
        self.answer_prefix = VT_ANSWER_PREFIX.format(num_v=_VT_NUM_HOPS + 1, query=self.value) + " ".join(self.vars)
        self.line_cost, self.partial_costs = cache.noise(" ", "\n")
        self.min_units = len(_NOISE_SENTENCES) * (len(self.chain) - 1) + 1

    def cost(self, n: int) -> int:
        return _noise_cost(n, self.line_cost, self.partial_costs)

    def prompt(self, n: int) -> str:
        return _VtSample._prompt(self.chain, self.value, n, self.rng_for(n))


class _CweSample(_Sample):
    def __init__(
        self, task: str, key: str, cache: _TokenizerCache, max_seq_length: int, split: str | None = None
    ) -> None:
        super().__init__(task, key, split)
        self.cache = cache
        pool = _cwe_pool(split)
        small = max_seq_length < _CWE_SMALL
        self.freq_common, self.freq_uncommon = (6, 1) if small else (30, 3)
        ex_words, ex_common, ex_uncommon = (20, 3, 1) if small else (40, 10, 3)
        order = list(range(len(pool)))
        self.rng.shuffle(order)
        self.example_ids, self.order = order[-ex_words:], order[:-ex_words]
        ex_context, ex_answer = self._list(
            [pool[i] for i in self.example_ids], ex_common, ex_uncommon, random.Random(f"{key}|example")
        )
        self.example = (
            CWE_TEMPLATE.format(context=ex_context)
            + CWE_ANSWER_PREFIX
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
            + "\n"
        )
        self.answer = [pool[i] for i in self.order[:_CWE_NUM_COMMON]]
        self.answer_prefix = CWE_ANSWER_PREFIX
        costs = cache.cwe_costs(split)[self.order]
        self.common_cost = int(costs[:_CWE_NUM_COMMON].sum())
        self.uncommon_cum = np.concatenate([[0], np.cumsum(costs[_CWE_NUM_COMMON:])])
        self.min_units = 0

    @staticmethod
    def _list(words: list[str], freq_common: int, freq_uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
        common, uncommon = words[:_CWE_NUM_COMMON], words[_CWE_NUM_COMMON:]
        entries = common * freq_common + uncommon * freq_uncommon
        rng.shuffle(entries)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common

    def capacity(self) -> int:
        return len(self.order) - _CWE_NUM_COMMON

    def cost(self, n: int) -> int:
        entries = _CWE_NUM_COMMON * self.freq_common + n * self.freq_uncommon
        return (
            self.cache.index_cum(entries)
            + self.freq_common * self.common_cost
            + self.freq_uncommon * int(self.uncommon_cum[n])
        )

    def prompt(self, n: int) -> str:
        pool = _cwe_pool(self.split)
        words = [pool[i] for i in self.order[: _CWE_NUM_COMMON + n]]
        context, _ = self._list(words, self.freq_common, self.freq_uncommon, self.rng_for(n))
        return self.example + CWE_TEMPLATE.format(context=context)


class _FweSample(_Sample):
    def __init__(
        self, task: str, key: str, cache: _TokenizerCache, max_seq_length: int, split: str | None = None
    ) -> None:
        super().__init__(task, key, split)
        vocab_size = max(5, (max_seq_length - TOKENS_TO_GENERATE["fwe"]) // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            word = "".join(self.rng.choices(string.ascii_lowercase, k=_FWE_WORD_LENGTH))
            if in_split(word, split):
                vocab.add(word)
        words = sorted(vocab)
        self.rng.shuffle(words)
        words[0] = "..."  # the top-ranked word is noise
        self.vocab = words
        self.answer = words[1:4]
        self.answer_prefix = FWE_ANSWER_PREFIX
        ranks = np.arange(1, len(words) + 1)
        self.weights = ranks ** (-_FWE_ALPHA)  # count of rank k: floor(N * k^-alpha / zeta(alpha))
        self.costs = np.asarray(cache.tokens.counts([" " + w for w in words]), dtype=np.int64)
        gaps = [(self.weights[k] - self.weights[k + 1]) / _FWE_ZETA for k in (1, 2, 3)]
        self.min_units = math.ceil(1 / min(gaps))  # ranks 2-5 have strictly decreasing counts from here on
        self.cache = cache
        self.stretched: list[str] | None = None

    def counts(self, n: int) -> np.ndarray:
        return (n * self.weights / _FWE_ZETA).astype(np.int64)

    def cost(self, n: int) -> int:
        return int(self.counts(n) @ self.costs)

    def prompt(self, n: int) -> str:
        vocab = self.stretched if self.stretched is not None else self.vocab
        words = [w for w, c in zip(vocab, self.counts(n)) for _ in range(int(c))]
        self.rng_for(n).shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words))

    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Redraw words of rank 5 and below (other random coded words) to fill ``slack`` tokens.

        A rank-k word appears ``count_k`` times, so a word with one token more adds ``count_k``
        tokens; the answer (ranks 2-4) and the noise word (rank 1) are kept.
        """
        counts = self.counts(n)
        ranks = [k for k in range(4, len(self.vocab)) if counts[k] > 0]
        if not ranks:
            return False
        rng = random.Random(f"{self.key}|stretch|{n}")
        vocab, costs = list(self.vocab), self.costs.copy()
        total = self.cost(n)
        target = total + slack
        taken = set(vocab)
        for _ in range(8):
            pool = []
            while len(pool) < 64:
                word = "".join(rng.choices(string.ascii_lowercase, k=_FWE_WORD_LENGTH))
                if word not in taken and in_split(word, self.split):
                    taken.add(word)
                    pool.append(word)
            for word, cost in zip(pool, self.cache.tokens.counts([" " + w for w in pool])):
                if total <= target and target - total <= stop:
                    break
                moves = [(total + int(counts[k]) * (cost - int(costs[k])), k) for k in ranks]
                new_total, k = min(moves, key=lambda m: (m[0] > target, abs(target - m[0])))
                if (new_total > target, abs(target - new_total)) < (total > target, abs(target - total)):
                    vocab[k], costs[k], total = word, cost, new_total
        if total <= self.cost(n) or total > target:
            return False
        self.stretched = vocab
        return True

    def unstretch(self) -> None:
        self.stretched = None


class _QaSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, data: QaData, question: dict[str, Any]) -> None:
        super().__init__(task, key)
        self.cache = cache
        self.data = data
        self.query = question["query"]
        self.answer = list(question["outputs"])
        self.answer_prefix = QA_ANSWER_PREFIX
        gold = list(question["context"])
        more = [d for d in question["more_context"] if d not in gold]
        self.rng.shuffle(more)
        self.candidates = gold + more
        self._used = set(self.candidates)
        self.min_units = len(gold)
        self.doc_cum = [0]

    def capacity(self) -> int:
        return len(self.data.documents)

    def _extend(self, n: int) -> None:
        total = len(self.data.documents)
        while len(self.candidates) < min(n, total):
            if len(self._used) > total // 2:  # draw the rest as a shuffle of what is left
                rest = [d for d in range(total) if d not in self._used]
                self.rng.shuffle(rest)
                self.candidates.extend(rest)
                self._used.update(rest)
                break
            doc = self.rng.randrange(total)
            if doc not in self._used:
                self._used.add(doc)
                self.candidates.append(doc)
        if len(self.doc_cum) <= n:
            new = self.candidates[len(self.doc_cum) - 1 : n]
            texts = [_QA_DOC_SEPARATOR + QA_DOCUMENT.format(i=1, document=self.data.documents[d]) for d in new]
            for c in self.cache.tokens.counts(texts):
                self.doc_cum.append(self.doc_cum[-1] + c)

    def cost(self, n: int) -> int:
        self._extend(n)
        return self.doc_cum[n]

    def prompt(self, n: int) -> str:
        self._extend(n)
        docs = [self.data.documents[d] for d in self.candidates[:n]]
        self.rng_for(n).shuffle(docs)
        context = _QA_DOC_SEPARATOR.join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return QA_TEMPLATE.format(context=context, query=self.query)
