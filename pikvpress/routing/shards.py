"""Shard placement and shard selection for the expert-sharded KV cache.

Placement (:func:`shard_assignment`) decides which of ``S`` shards each token of a layer goes to,
per batch row and KV head, under an exact balance: every row puts the same number of tokens in a
given shard (:func:`shard_counts`), so each shard stays a rectangular ``(B, H, L_s, D)`` block.
Rules:

- ``"contiguous"``: consecutive ranges of tokens;
- ``"round_robin"``: token ``i`` to shard ``i mod S``;
- ``"experts"``: each token states a preference over shards (the MoE expert group it routes to, or
  the affinity of its key to a key cluster) and :func:`balanced_assignment` honours the preferences
  under the per-shard capacities.

Selection (:func:`shard_scores`, :func:`select_shards`) ranks the shards for each query from the
shard summaries (per-channel min/max and centroid of the shard's keys): ``"bound"`` is Quest's upper
bound on ``q . k`` over the shard, ``"centroid"`` the query's affinity to the shard's mean key.
"""

from __future__ import annotations

import torch

from pikvpress.routing.key_clusters import spherical_kmeans

PLACEMENTS = ("experts", "contiguous", "round_robin")
#: a routing press sets ``module.pikvpress_routed_experts = (id(cache), experts, num_experts)`` after it prunes a
#: layer: ``(B, H, T)`` int64 expert of each token it kept, in cache order (-1 for none), out of ``num_experts``
ROUTED_EXPERTS = "pikvpress_routed_experts"
SHARD_SCORES = ("bound", "centroid")


def shard_counts(num_tokens: int, num_shards: int) -> list[int]:
    """Tokens each shard receives out of ``num_tokens``: ``T // S``, one more for the first ``T % S``."""
    base, extra = divmod(num_tokens, num_shards)
    return [base + (s < extra) for s in range(num_shards)]


def balanced_assignment(preference: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``(B, H, T)`` int64 shard of each token, putting exactly ``counts[s]`` tokens of every row in shard ``s``.

    Deferred acceptance (Gale-Shapley) on ``preference`` ``(B, H, T, S)`` (higher first): every token proposes to
    its best shard that has not turned it down; each shard holds the ``counts[s]`` proposers with the highest
    preference for it and turns the others down; repeat until every token is held. The result is stable: a token
    that prefers another shard to its own finds that shard full of tokens that prefer it at least as much. Every
    token ends up placed because the capacities sum to ``T``. Vectorised over batch, heads and tokens; each round
    is one sort per row.
    """
    b, h, t, s = preference.shape
    if len(counts) != s or sum(counts) != t:
        raise ValueError(f"counts must give {s} shard sizes summing to {t} tokens, got {counts}")
    device = preference.device
    ranked = torch.argsort(preference, dim=-1, descending=True, stable=True)  # (B, H, T, S)
    capacity = torch.tensor(counts, device=device)
    choice = torch.zeros(b, h, t, dtype=torch.long, device=device)  # how many shards turned each token down
    positions = torch.arange(t, device=device).expand(b, h, t)
    for _ in range(s * t + 1):
        target = ranked.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # (B, H, T) held by, or proposing to
        strength = preference.gather(-1, target.unsqueeze(-1)).squeeze(-1).float()
        # group the tokens by target shard, strongest first; a shard keeps the first counts[s] of its group
        by_strength = torch.argsort(strength, dim=-1, descending=True, stable=True)
        order = by_strength.gather(-1, torch.argsort(target.gather(-1, by_strength), dim=-1, stable=True))
        sorted_target = target.gather(-1, order)
        sizes = torch.zeros(b, h, s, dtype=torch.long, device=device).scatter_add_(-1, target, torch.ones_like(target))
        starts = torch.cumsum(sizes, dim=-1) - sizes
        rank = positions - starts.gather(-1, sorted_target)
        held_sorted = rank < capacity[sorted_target]
        held = torch.zeros_like(held_sorted).scatter_(-1, order, held_sorted)
        if bool(held.all()):
            return target
        choice = choice + (~held).long()
    raise RuntimeError("balanced_assignment did not converge")  # unreachable: capacities sum to T


def shard_assignment(
    keys: torch.Tensor,
    num_shards: int,
    placement: str,
    *,
    experts: torch.Tensor | None = None,
    num_experts: int | None = None,
    centroids: torch.Tensor | None = None,
    kmeans_iterations: int = 4,
) -> torch.Tensor:
    """``(B, H, T)`` int64 shard of each of the ``T`` tokens whose ``keys`` ``(B, H, T, D)`` are placed.

    Every row puts :func:`shard_counts` ``(T, S)`` tokens in the shards. ``placement="experts"`` prefers, in
    this order: the shard holding the token's routed expert (``experts`` ``(B, H, T)`` in ``0..num_experts-1``,
    -1 for none; expert ``e`` lives in shard ``e * S // num_experts``, the expert-parallel layout); the shard
    whose unit ``centroids`` ``(B, H, S, D)`` the key is closest to; without either, spherical k-means of the
    keys into ``S`` clusters.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    b, h, t, _ = keys.shape
    counts = shard_counts(t, num_shards)
    device = keys.device
    if placement == "round_robin":
        return (torch.arange(t, device=device) % num_shards).expand(b, h, t).contiguous()
    if placement == "contiguous" or num_shards == 1:
        bounds = torch.tensor(counts, device=device).cumsum(0)
        return torch.bucketize(torch.arange(t, device=device), bounds, right=True).expand(b, h, t).contiguous()
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    if centroids is None:
        if t >= num_shards:
            centroids = spherical_kmeans(unit, num_shards, kmeans_iterations, normalized=True).centroids
        else:
            centroids = unit.new_zeros(b, h, num_shards, unit.shape[-1])
    affinity = torch.matmul(unit, centroids.float().transpose(-1, -2))  # (B, H, T, S) in [-1, 1]
    preference = affinity
    if experts is not None:
        if num_experts is None or num_experts < 1:
            raise ValueError("num_experts must be given with experts")
        group = torch.where(experts >= 0, experts * num_shards // num_experts, torch.full_like(experts, -1))
        routed = torch.nn.functional.one_hot(group.clamp_min(0), num_shards).float() * (group >= 0).unsqueeze(-1)
        preference = routed * 4.0 + affinity  # the routed expert first, then the key's affinity
    return balanced_assignment(preference, counts)


def shard_scores(
    queries: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    centroid: torch.Tensor,
    counts: torch.Tensor,
    method: str = "bound",
) -> torch.Tensor:
    """``(B, Hkv, G, S)`` routing score of each shard for each query row.

    Parameters
    ----------
    queries : torch.Tensor
        ``(B, Hkv, G, D)`` scaled queries, the ``G`` query rows (query heads x tokens) of each KV head.
    key_min, key_max, centroid : torch.Tensor
        ``(B, Hkv, S, D)`` per-channel minimum, maximum and mean of each shard's keys.
    counts : torch.Tensor
        ``(B, Hkv, S)`` tokens in each shard; an empty shard scores ``-inf``.
    method : {"bound", "centroid"}
        ``"bound"``: Quest's upper bound ``sum_d max(q_d * min_d, q_d * max_d) >= q . k`` for every key of the
        shard; ``"centroid"``: ``q . mean key``.
    """
    if method not in SHARD_SCORES:
        raise ValueError(f"shard_score must be one of {SHARD_SCORES}, got {method!r}")
    q = queries.float()
    if method == "bound":
        scores = torch.matmul(q.clamp_min(0), key_max.float().transpose(-1, -2)) + torch.matmul(
            q.clamp_max(0), key_min.float().transpose(-1, -2)
        )
    else:
        scores = torch.matmul(q, centroid.float().transpose(-1, -2))
    return scores.masked_fill((counts == 0).unsqueeze(-2), float("-inf"))


def select_shards(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """bool mask ``scores.shape``: the ``top_k`` best shards (last axis) of each query row (never an empty one)."""
    s = scores.shape[-1]
    if top_k >= s:
        return torch.isfinite(scores)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(-1, scores.topk(top_k, dim=-1).indices, True)
    return chosen & torch.isfinite(scores)
