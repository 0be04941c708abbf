"""Choosing the kept tokens of one layer: protected tokens, the heads' budgets, and the experts' quotas.

The press's formula: every (batch row, KV head) keeps its ``n_sink`` first and ``n_recent`` last tokens, and
``kept[e]`` tokens of each expert ``e``, the best by token score inside the expert.
"""

from __future__ import annotations

import torch


def protected_tokens(t: int, n_sink: int, n_recent: int, device: torch.device | str) -> torch.Tensor:
    """``(T,)`` bool: the first ``n_sink`` and the last ``n_recent`` of ``t`` tokens."""
    protected = torch.zeros(t, dtype=torch.bool, device=device)
    protected[:n_sink] = True
    if n_recent:
        protected[t - n_recent :] = True
    return protected


def head_budgets(
    token_scores: torch.Tensor, protected: torch.Tensor, n_kept: int, n_protected: int, floor: float
) -> torch.Tensor:
    """``(B, H)`` int64 tokens each KV head keeps when the layer's ``H * n_kept`` go to the best token scores across
    its heads (AdaKV's and KVzip's head-wise split), each head keeping its protected tokens and at least ``floor``
    of ``n_kept``."""
    b, h, t = token_scores.shape
    n_safe = min(max(n_protected, int(n_kept * floor)), n_kept)
    scores = token_scores.float().masked_fill(protected, float("inf"))
    if n_safe > n_protected:
        top = scores.topk(n_safe, dim=-1).indices
        scores = scores.scatter(-1, top, float("inf"))
    chosen = scores.reshape(b, h * t).topk(h * n_kept, dim=-1).indices // t  # the head of each kept token
    counts = torch.zeros(b, h, dtype=torch.long, device=token_scores.device)
    return counts.scatter_add_(1, chosen, torch.ones_like(chosen))


def choose_in_experts(
    token_scores: torch.Tensor,
    assignment: torch.Tensor,
    protected: torch.Tensor,
    sizes: torch.Tensor,
    kept: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen (B, H, T) bool, by_score (B, H, T))``: the ``kept[..., e]`` best-scored tokens of each expert ``e``
    and every protected token; ``by_score`` orders the tokens by descending score (ties: lower index first).

    ``assignment`` ``(B, H, T)`` is each token's expert, ``sizes`` ``(B, H, E)`` the routable tokens per expert.
    """
    b, h, t = token_scores.shape
    e = sizes.shape[-1]
    n_protected = int(protected.sum())
    bucket = torch.where(protected, torch.full_like(assignment, e), assignment)  # protected tokens: bucket e, whole
    quota = torch.cat([kept, torch.full((b, h, 1), n_protected, dtype=torch.long, device=kept.device)], dim=-1)
    bucket_sizes = torch.cat([sizes, torch.full_like(kept[..., :1], n_protected)], dim=-1)
    by_score = torch.argsort(token_scores, dim=-1, descending=True, stable=True)
    # tokens grouped by bucket, by descending score inside each: a token's rank in its bucket against the quota
    order = torch.gather(by_score, -1, torch.argsort(torch.gather(bucket, -1, by_score), dim=-1, stable=True))
    sorted_bucket = torch.gather(bucket, -1, order)
    starts = torch.cumsum(bucket_sizes, dim=-1) - bucket_sizes
    rank = torch.arange(t, device=token_scores.device).expand(b, h, t) - torch.gather(starts, -1, sorted_bucket)
    chosen_sorted = rank < torch.gather(quota, -1, sorted_bucket)
    return torch.zeros_like(chosen_sorted).scatter_(-1, order, chosen_sorted), by_score


def selection_scores(
    token_scores: torch.Tensor, protected: torch.Tensor, chosen: torch.Tensor, by_score: torch.Tensor, experts: int
) -> torch.Tensor:
    """``(B, H, T)`` scores whose top-k is the selection: chosen tokens above all others, each group by token score.

    With one expert the token scores themselves (protected tokens above every other), so that kvpress's
    ``AdaKVPress`` can compare them across heads.
    """
    b, h, t = token_scores.shape
    if experts == 1:
        return token_scores.masked_fill(protected, token_scores.amax().item() + 1.0)
    positions = torch.arange(t - 1, -1, -1, device=token_scores.device, dtype=torch.float).expand(b, h, t)
    ranked = torch.zeros(b, h, t, device=token_scores.device).scatter_(-1, by_score, positions) / max(t, 1)
    return chosen.float() * 2.0 + ranked


def kept_indices(chosen: torch.Tensor, head_kept: torch.Tensor, scores: torch.Tensor, experts: int) -> torch.Tensor:
    """``(B, H, n)`` indices of the tokens a layer keeps, ``n`` = the largest head's share: the chosen tokens in
    context order when every head chose ``n``; else the top ``n`` of ``scores`` (:func:`selection_scores`), so heads
    with a smaller share fill the length with their next-best tokens (nothing is masked)."""
    b, h, _ = chosen.shape
    n = int(head_kept.max())
    if experts > 1 and int(head_kept.min()) == n:
        return chosen.nonzero()[:, -1].view(b, h, n)
    return scores.topk(n, dim=-1).indices
