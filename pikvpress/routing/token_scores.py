"""Rankings of a layer's tokens inside an expert (the scorers ExpertRoutingPress computes itself)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def keydiff_scores(unit_keys: torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` KeyDiff's score from unit keys ``(B, H, T, D)``: minus the cosine to the heads' mean unit key."""
    anchor = unit_keys.mean(dim=2, keepdim=True)  # (B, H, 1, D)
    similarity = torch.matmul(unit_keys, anchor.transpose(-1, -2)).squeeze(-1)
    return -similarity / anchor.norm(dim=-1).clamp_min(1e-8)


def window_scores(attention: torch.Tensor, window: int, kernel_size: int) -> torch.Tensor:
    """``(B, H, T)`` mean attention the last ``window`` queries pay each token (SnapKV's signal), over the queries
    that can see it (window tokens are seen by fewer), average-pooled over ``kernel_size`` neighbours.

    ``attention`` is ``(B, H, groups * window, T)``, causal inside the window.
    """
    t = attention.shape[-1]
    rows = attention.shape[2]
    seen = torch.full((t,), float(window), device=attention.device)
    seen[t - window :] = torch.arange(window, 0, -1, device=attention.device, dtype=torch.float)
    scores = attention.sum(dim=2) / (seen * (rows // window))
    if kernel_size > 1:
        scores = F.avg_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return scores[..., :t]


def span_max(scores: torch.Tensor, span: int) -> torch.Tensor:
    """``(B, H, T)``: each token's maximum score within ``span`` (odd) tokens centred on it."""
    if span <= 1:
        return scores
    b, h, t = scores.shape
    return F.max_pool1d(scores.reshape(b * h, 1, t), span, stride=1, padding=span // 2).reshape(b, h, t)
