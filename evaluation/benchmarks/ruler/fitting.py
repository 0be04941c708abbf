"""Fitting a sample to the target length: the largest haystack whose prompt fits, then filling the last gap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .tasks import _Sample
from .templates import TOKENS_TO_GENERATE
from .tokens import _Tokens

#: Try to close gaps larger than this share of the target (needle-line haystacks only).
_STRETCH_SHARE = 0.01


class _PromptTooLong(ValueError):
    """The shortest prompt of a sample does not fit the target length."""


def _largest(cost: Callable[[int], int], limit: int, lo: int, hi: int | None) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``cost(n) <= limit`` (``lo - 1`` if none).

    ``cost`` is monotone. The search gallops up from ``lo`` before bisecting, so it never asks for
    much more than twice the answer (costs of lazily drawn lines and documents are computed on demand).
    """
    if cost(lo) > limit:
        return lo - 1
    good, step = lo, max(1, lo)
    while True:
        probe = good + step if hi is None else min(good + step, hi)
        if probe <= good:
            return good  # hi reached
        if cost(probe) > limit:
            bad = probe
            break
        good, step = probe, 2 * step
    while bad - good > 1:
        mid = (good + bad) // 2
        if cost(mid) <= limit:
            good = mid
        else:
            bad = mid
    return good


@dataclass
class _Fitted:
    units: int
    text: str
    tokens: int


def _fit(sample: _Sample, budget: int, tokens: _Tokens, max_seq_length: int) -> _Fitted:
    """The largest haystack for which ``tokens(prompt + answer_prefix) <= budget``."""
    lo, cap = sample.min_units, sample.capacity()
    if cap is not None and cap < lo:
        raise ValueError(f"{sample.task}: not enough haystack material")
    text = sample.render(lo)
    t = tokens.count(text)
    if t > budget:
        raise _PromptTooLong(
            f"{sample.task}: max_seq_length={max_seq_length} is too small: the shortest prompt has {t} tokens "
            f"and {TOKENS_TO_GENERATE[sample.task]} more are generated"
        )
    good = _Fitted(lo, text, t)
    bad: int | None = None  # the smallest number of units known not to fit
    offset = t - sample.cost(lo)  # tokens outside the haystack, and the estimate's error
    for _ in range(16):
        if cap is not None and good.units >= cap:
            break
        upper = cap if bad is None else (bad - 1 if cap is None else min(cap, bad - 1))
        if upper is not None and upper <= good.units:
            break
        n = _largest(sample.cost, budget - offset, good.units, upper)
        if n <= good.units:
            break
        text = sample.render(n)
        t = tokens.count(text)
        if t <= budget:
            good = _Fitted(n, text, t)
        else:
            bad = n
        offset = t - sample.cost(n)
    return good


def _fit_and_fill(sample: _Sample, budget: int, tokens: _Tokens, max_seq_length: int) -> _Fitted:
    fitted = _fit(sample, budget, tokens, max_seq_length)
    gap = budget - fitted.tokens
    stop = max(1, int(_STRETCH_SHARE * max_seq_length) // 2)
    if gap > _STRETCH_SHARE * max_seq_length:
        slack = gap
        for _ in range(4):
            if not sample.stretch(fitted.units, slack, stop):
                break
            text = sample.render(fitted.units)
            t = tokens.count(text)
            if t <= budget:
                if t > fitted.tokens:
                    fitted = _Fitted(fitted.units, text, t)
                break
            slack -= t - budget
        sample.unstretch()
    return fitted
