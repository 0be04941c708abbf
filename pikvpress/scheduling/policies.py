"""Which cached tokens a decode-time eviction keeps, for each scheduling policy."""

from __future__ import annotations

import torch

from pikvpress.scheduling.statistics import DecodeStatistics

#: ``h2o``: heavy hitters by accumulated attention mass; ``lru``: by the last step a token was used;
#: ``streaming``: the most recent tokens; ``adaptive``: by the moving average of attention for the tokens a decode
#: step used, by their prior (the prefill press's scores) for the others. Every policy keeps the attention sinks
#: and the recent window first.
POLICIES = ("adaptive", "h2o", "lru", "streaming")


def policy_scores(stats: DecodeStatistics, policy: str) -> torch.Tensor:
    """``(B, H, T)`` float64 score of each cached token under ``policy`` (higher: kept first)."""
    position = stats.position.double()
    if policy == "h2o":
        return stats.mass.double()
    if policy == "adaptive":  # the moving average once a decode step used the token, its prior until then
        return torch.where(stats.last_used >= 0, stats.ema, stats.prior).double()
    if policy == "lru":  # the last use, and among tokens last used at the same step the more recent one
        return stats.last_used.double() + 0.5 * position / (position.amax(dim=-1, keepdim=True) + 1)
    if policy == "streaming":
        return position
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def priority_order(stats: DecodeStatistics, policy: str, sink_tokens: int = 4, recent_window: int = 32) -> torch.Tensor:
    """``(B, H, T)`` int64 cache indices, best first: the ``sink_tokens`` earliest positions, then the
    ``recent_window`` latest positions, then the other tokens by :func:`policy_scores` (ties: the lower cache
    index first)."""
    for name, value in (("sink_tokens", sink_tokens), ("recent_window", recent_window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    scores = policy_scores(stats, policy)
    t = stats.length
    tier = torch.zeros_like(stats.position)
    if recent_window:
        tier.scatter_(-1, stats.position.topk(min(recent_window, t), dim=-1).indices, 1)
    if sink_tokens:
        tier.scatter_(-1, stats.position.topk(min(sink_tokens, t), dim=-1, largest=False).indices, 2)
    by_score = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return by_score.gather(-1, torch.argsort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True))


def kept_indices(
    stats: DecodeStatistics, budget: int, policy: str, sink_tokens: int = 4, recent_window: int = 32
) -> torch.Tensor:
    """``(B, H, min(budget, T))`` int64 cache indices to keep, in cache order: the first ``budget`` of
    :func:`priority_order`."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    order = priority_order(stats, policy, sink_tokens, recent_window)
    return order[..., : min(budget, stats.length)].sort(dim=-1).values
