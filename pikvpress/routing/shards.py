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

Padding (:func:`token_validity`) takes no part in either: a row's real tokens are placed as if its
padding were not there (the padding fills the rest of each shard), and summaries describe real keys
only, so a row decodes the same whatever its pad tokens are and whatever it is batched with.
"""

from __future__ import annotations

import torch

from pikvpress.routing.key_clusters import spherical_kmeans

PLACEMENTS = ("experts", "contiguous", "round_robin")
SHARD_SCORES = ("bound", "centroid")


def shard_counts(num_tokens: int, num_shards: int) -> list[int]:
    """Tokens each shard receives out of ``num_tokens``: ``T // S``, one more for the first ``T % S``."""
    base, extra = divmod(num_tokens, num_shards)
    return [base + (s < extra) for s in range(num_shards)]


def token_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``(B, length)`` bool: which of a prefilled layer's first ``length`` tokens are real (False: padding).

    ``attention_mask`` is the mask the layer's attention ran with: 4-d ``(B, 1|H, Q, K)``, bool (True: attend)
    or additive (``finfo.min``: masked), or a 2-d ``(B, K)`` padding mask (0: padding). The last query row of a
    4-d mask attends to every real token of the context and to no padding. Token ``i`` of the layer is column
    ``i``, the column a decoding step's mask gives it (transformers lays the 2-d padding mask over a cache from
    its first column), so after a press pruned the layer, the tokens counted as padding are the ones decoding
    masks. Returns None when there is no mask or every token is real.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 4:
        last = attention_mask[:, :, -1, :]
        keep = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
        keep = keep.all(dim=1)
    elif attention_mask.ndim == 2:
        keep = attention_mask != 0
    else:
        raise ValueError(f"attention_mask must be 2-d or 4-d, got shape {tuple(attention_mask.shape)}")
    keep = keep[:, :length]
    if keep.shape[1] < length:  # columns the mask does not cover are real tokens
        keep = torch.nn.functional.pad(keep, (0, length - keep.shape[1]), value=True)
    return None if bool(keep.all()) else keep


def balanced_assignment(preference: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` int64 shard of each token, putting exactly ``counts[s]`` tokens of every row in shard ``s``
    (``counts`` a list, or a ``(B, H, S)`` tensor of each row's own capacities).

    Deferred acceptance (Gale-Shapley) on ``preference`` ``(B, H, T, S)`` (higher first): every token proposes to
    its best shard that has not turned it down; each shard holds the ``counts[s]`` proposers with the highest
    preference for it and turns the others down; repeat until every token is held. The result is stable: a token
    that prefers another shard to its own finds that shard full of tokens that prefer it at least as much. Every
    token ends up placed because the capacities sum to ``T``. Vectorised over batch, heads and tokens; each round
    is one sort per row.
    """
    b, h, t, s = preference.shape
    device = preference.device
    capacity = torch.as_tensor(counts, device=device).expand(b, h, -1)
    if capacity.shape[-1] != s or bool((capacity.sum(-1) != t).any()):
        raise ValueError(f"counts must give {s} shard sizes summing to {t} tokens, got {counts}")
    ranked = torch.argsort(preference, dim=-1, descending=True, stable=True)  # (B, H, T, S)
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
        held_sorted = rank < capacity.gather(-1, sorted_target)
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
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H, T)`` int64 shard of each of the ``T`` tokens whose ``keys`` ``(B, H, T, D)`` are placed.

    Every row puts :func:`shard_counts` ``(T, S)`` tokens in the shards. ``placement="experts"`` prefers, in
    this order: the shard holding the token's routed expert (``experts`` ``(B, H, T)`` in ``0..num_experts-1``,
    -1 for none; expert ``e`` lives in shard ``e * S // num_experts``, the expert-parallel layout); the shard
    whose unit ``centroids`` ``(B, H, S, D)`` the key is closest to; without either, spherical k-means of the
    keys into ``S`` clusters.

    ``valid`` ``(B, 1|H, T)`` bool (False: padding) places each row's real tokens as if its padding were not
    there: the row's ``V`` real tokens fill :func:`shard_counts` ``(V, S)`` by the rule (the k-means fitted on
    the real keys alone), and its padding fills the rest of every shard, in sequence order. Neither the pad
    tokens' keys nor the other rows move a row's real tokens.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    b, h, t, _ = keys.shape
    counts = shard_counts(t, num_shards)
    device = keys.device
    if valid is not None:
        valid = valid.to(device, torch.bool).expand(b, h, t)
        if bool(valid.all()):
            valid = None
    if valid is not None:
        return _place_real_tokens(
            keys, num_shards, placement, experts, num_experts, centroids, kmeans_iterations, valid
        )
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
    return balanced_assignment(_preference(unit, centroids, experts, num_experts, num_shards), counts)


def _preference(
    unit: torch.Tensor, centroids: torch.Tensor, experts: torch.Tensor | None, num_experts: int | None, num_shards: int
) -> torch.Tensor:
    """``(B, H, T, S)`` preference of each unit key for each shard: its routed expert's shard first, then the
    affinity to the shard's unit centroid."""
    affinity = torch.matmul(unit, centroids.float().transpose(-1, -2))  # (B, H, T, S) in [-1, 1]
    if experts is None:
        return affinity
    if num_experts is None or num_experts < 1:
        raise ValueError("num_experts must be given with experts")
    group = torch.where(experts >= 0, experts * num_shards // num_experts, torch.full_like(experts, -1))
    routed = torch.nn.functional.one_hot(group.clamp_min(0), num_shards).float() * (group >= 0).unsqueeze(-1)
    return routed * 4.0 + affinity  # the routed expert first, then the key's affinity


def _place_real_tokens(
    keys: torch.Tensor,
    num_shards: int,
    placement: str,
    experts: torch.Tensor | None,
    num_experts: int | None,
    centroids: torch.Tensor | None,
    kmeans_iterations: int,
    valid: torch.Tensor,
) -> torch.Tensor:
    """:func:`shard_assignment` of a batch with padding (``valid`` ``(B, H, T)`` bool, not all True)."""
    t = keys.shape[2]
    device = keys.device
    n_real = valid.sum(-1, keepdim=True)  # (B, H, 1)
    ids = torch.arange(num_shards, device=device)
    real_counts = n_real // num_shards + (ids < n_real % num_shards)  # (B, H, S): shard_counts(V, S) of each row
    rank = valid.long().cumsum(-1) - 1  # a real token's rank among its row's real tokens
    if placement == "round_robin":
        shard = rank % num_shards
    elif placement == "contiguous" or num_shards == 1:
        shard = (rank.unsqueeze(-1) >= real_counts.cumsum(-1).unsqueeze(-2)).sum(-1)
    else:
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        if centroids is None:
            centroids = _real_centroids(unit, valid, num_shards, kmeans_iterations)
        preference = _preference(unit, centroids, experts, num_experts, num_shards)
        # the padding proposes to one more shard, which holds exactly the row's padding; real tokens rank it last,
        # so the real tokens meet among themselves alone, as without the padding
        pad = (~valid).unsqueeze(-1)
        spare = torch.where(pad, float("inf"), float("-inf"))
        preference = torch.cat([preference.masked_fill(pad, float("-inf")), spare], dim=-1)
        shard = balanced_assignment(preference, torch.cat([real_counts, t - n_real], dim=-1))
    room = torch.tensor(shard_counts(t, num_shards), device=device) - real_counts  # >= 0: what padding fills
    pad_rank = (~valid).long().cumsum(-1) - 1
    pad_shard = (pad_rank.unsqueeze(-1) >= room.cumsum(-1).unsqueeze(-2)).sum(-1)
    return torch.where(valid, shard, pad_shard)


def _real_centroids(
    unit: torch.Tensor, valid: torch.Tensor, num_shards: int, iterations: int, max_fit_tokens: int = 256
) -> torch.Tensor:
    """``(B, H, S, D)`` unit centroids of :func:`~pikvpress.routing.spherical_kmeans` run on each row's real tokens
    alone (``valid`` ``(B, H, T)``, ``unit`` keys ``(B, H, T, D)``): the same strided fit subsample, farthest-point
    seeding and rounds, with the padding masked out; zeros for a row with fewer real tokens than shards."""
    b, h, _, d = unit.shape
    device = unit.device
    n_real = valid.sum(-1)  # (B, H)
    compact = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)  # real tokens first, in order
    n_fit = n_real.clamp_max(max_fit_tokens)
    f = max(int(n_fit.max()), 1)
    fit_at = torch.zeros(b, h, f, dtype=torch.long, device=device)  # position in ``compact`` of each fit token
    for v in n_real.unique().tolist():
        if v > max_fit_tokens:
            at = torch.linspace(0, v - 1, max_fit_tokens, device=device).round().long()
        else:
            at = torch.arange(f, device=device).clamp_max(max(v - 1, 0))
        fit_at[n_real == v] = at
    fit_mask = torch.arange(f, device=device) < n_fit.unsqueeze(-1)  # (B, H, F)
    fit = unit.gather(2, compact.gather(-1, fit_at).unsqueeze(-1).expand(b, h, f, d)) * fit_mask.unsqueeze(-1)
    fit_t = fit.transpose(-1, -2)
    picks = [fit[:, :, :1]]
    closest = None
    for _ in range(1, num_shards):
        similarity = torch.matmul(picks[-1], fit_t)
        closest = similarity if closest is None else torch.maximum(closest, similarity)
        farthest = closest.masked_fill(~fit_mask.unsqueeze(-2), float("inf")).argmin(dim=-1, keepdim=True)
        picks.append(torch.gather(fit, 2, farthest.expand(-1, -1, -1, d)))
    centroids = torch.cat(picks, dim=2)
    experts = torch.arange(num_shards, device=device)[:, None]
    for _ in range(iterations):
        nearest = torch.matmul(centroids, fit_t).max(dim=-2).indices
        member = (nearest.unsqueeze(-2) == experts) & fit_mask.unsqueeze(-2)
        sums = torch.matmul(member.to(fit.dtype), fit)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    return centroids.masked_fill((n_real < num_shards)[..., None, None], 0.0)


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
        ``(B, Hkv, S)`` tokens in each shard; an empty shard scores ``-inf``, and so does a shard holding only
        padding of a row (its ``key_min`` is ``+inf`` and its ``key_max`` ``-inf`` there).
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
    # a shard with no real token of the row (only its padding: min +inf > max -inf) is empty for it
    empty = (counts == 0) | (key_min > key_max).any(dim=-1)
    return scores.masked_fill(empty.unsqueeze(-2), float("-inf"))


def select_shards(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """bool mask ``scores.shape``: the ``top_k`` best shards (last axis) of each query row (never an empty one)."""
    s = scores.shape[-1]
    if top_k >= s:
        return torch.isfinite(scores)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(-1, scores.topk(top_k, dim=-1).indices, True)
    return chosen & torch.isfinite(scores)
