"""The prior of the adaptive policy: how a prefill press's scores start the decode-time moving average."""

from __future__ import annotations

import torch

#: a prefill press that keeps tokens sets ``module.pikvpress_prefill_scores = (id(cache), scores)``, its
#: ``(B, H, T)`` scores of the tokens it left in that cache layer, in cache order; AdaptiveSchedulingPress
#: takes them at its first decode step as the prior of the ``adaptive`` policy
PREFILL_SCORES = "pikvpress_prefill_scores"


def scores_to_prior(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` float32 prior on the scale of attention probabilities from scores of any scale.

    Rank-based: the token ranked ``r``-th lowest (from 1) gets ``r / (T (T + 1) / 2)``; each row sums to 1, the
    best token gets ``2 / (T + 1)``, about twice a uniform share. Ties take the lower cache index first.
    """
    t = scores.shape[-1]
    order = torch.argsort(scores.float(), dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(1, t + 1, device=scores.device).expand_as(order))
    return ranks.float() / (t * (t + 1) / 2)
