"""The prior of the adaptive policy: how a prefill press's scores start the decode-time moving average,
and how those scores are handed from the prefill press to the scheduler."""

from __future__ import annotations

import weakref
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class KeptScoresSource(Protocol):
    """A prefill press that tells, for a cache it compressed, its scores of the tokens it kept.

    :class:`~pikvpress.ExpertRoutingPress` is one; give it to ``AdaptiveSchedulingPress(prior_from=...)``.
    """

    def kept_scores(self, cache: Any, layer_idx: int) -> torch.Tensor | None:
        """``(B, H, T)`` scores of the ``T`` tokens layer ``layer_idx`` of ``cache`` holds, in cache order."""


class PerCache:
    """Per-layer values about a cache, that live exactly as long as the cache (weakly keyed by it).

    A press hands its results about a cache to another press through one of these, never through the model's
    modules or ``id(cache)``: an entry cannot reach another cache (a new cache is a new key, even at a reused
    address), it never keeps the cache alive, and it is freed with the cache.
    """

    def __init__(self) -> None:
        self._data: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()

    def put(self, cache: Any, layer_idx: int, value: Any) -> None:
        self._data.setdefault(cache, {})[layer_idx] = value

    def get(self, cache: Any, layer_idx: int) -> Any:
        return self._data.get(cache, {}).get(layer_idx) if cache is not None else None

    def pop(self, cache: Any, layer_idx: int) -> Any:
        if cache is None:
            return None
        layers = self._data.get(cache)
        return None if layers is None else layers.pop(layer_idx, None)

    def clear(self) -> None:
        self._data = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return sum(len(layers) for layers in self._data.values())


def scores_to_prior(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` float32 prior on the scale of attention probabilities from scores of any scale.

    Rank-based: the token ranked ``r``-th lowest (from 1) gets ``r / (T (T + 1) / 2)``; each row sums to 1, the
    best token gets ``2 / (T + 1)``, about twice a uniform share. Ties take the lower cache index first.
    """
    t = scores.shape[-1]
    order = torch.argsort(scores.float(), dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(1, t + 1, device=scores.device).expand_as(order))
    return ranks.float() / (t * (t + 1) / 2)
