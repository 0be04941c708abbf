"""Routing a layer's context tokens and its observation window's queries to KV experts.

Each function returns an :class:`ExpertRouting`: the expert of every context token, how many routable tokens
each expert holds, and the query mass the window routes to each. The routable tokens are ``span``: those between
the sink tokens and the recent tokens, which are kept whole and belong to no expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pikvpress.routing.key_clusters import spherical_kmeans


@dataclass(frozen=True)
class ExpertRouting:
    """One layer's routing.

    Parameters
    ----------
    assignment : torch.Tensor
        ``(B, H, T)`` int64 expert of each context token (0 outside ``span``).
    sizes : torch.Tensor
        ``(B, H, E)`` int64 routable tokens in each expert.
    mass : torch.Tensor
        ``(B, H, E)`` float32 query mass routed to each expert.
    router : str
        The router that ran.
    """

    assignment: torch.Tensor
    sizes: torch.Tensor
    mass: torch.Tensor
    router: str

    @property
    def num_experts(self) -> int:
        return self.mass.shape[-1]


def top_k_mass(per_query: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(..., E)`` mass of queries routed to their ``top_k`` experts: each query ``(..., Q, E)`` keeps its ``top_k``
    largest routing weights, renormalised to sum 1, and the queries' weights are summed."""
    k = min(top_k, per_query.shape[-1])
    top = per_query.topk(k, dim=-1)
    routed = torch.zeros_like(per_query).scatter_(-1, top.indices, top.values)
    return (routed / routed.sum(-1, keepdim=True).clamp_min(1e-12)).sum(-2)


def route_by_gate(probs: torch.Tensor, heads: int, span: slice, window: int, top_k: int) -> ExpertRouting:
    """Tokens to their top-1 expert of the MoE gate's ``probs`` ``(B, T, E)`` (the same for every KV head); the
    last ``window`` tokens' gate probabilities are the queries' routing."""
    b, t, e = probs.shape
    probs = probs.float()
    assignment = probs.argmax(-1)[:, None, :].expand(b, heads, t).contiguous()
    routable = assignment[..., span]
    sizes = torch.zeros(b, heads, e, dtype=torch.long, device=probs.device)
    sizes.scatter_add_(2, routable, torch.ones_like(routable))
    mass = top_k_mass(probs[:, t - window :], top_k)[:, None, :].expand(b, heads, e).contiguous()
    return ExpertRouting(assignment, sizes, mass, "gate")


def key_experts(
    unit_keys: torch.Tensor, span: slice, num_experts: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV head, a spherical k-means of the routable unit keys ``(B, H, T, D)`` into at most ``num_experts``
    experts: ``(assignment (B, H, T), sizes (B, H, E), member (B, H, E, span) float 0/1)``."""
    b, h, t, _ = unit_keys.shape
    experts = max(1, min(num_experts, span.stop - span.start))
    clusters = spherical_kmeans(unit_keys[:, :, span], experts, iterations, normalized=True)
    assignment = torch.zeros(b, h, t, dtype=torch.long, device=unit_keys.device)
    assignment[:, :, span] = clusters.assignment
    member = clusters.assignment.unsqueeze(-2) == torch.arange(experts, device=unit_keys.device)[:, None]
    return assignment, clusters.sizes, member.float()


def attention_mass(attention: torch.Tensor, member: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(B, H, E)`` mass routed by the window queries' measured attention ``(B, H, Q, span)``: each query goes to
    the ``top_k`` experts holding most of its attention."""
    return top_k_mass(torch.matmul(attention, member.transpose(-1, -2)), top_k)


def centroid_mass(
    queries: torch.Tensor, keys: torch.Tensor, member: torch.Tensor, sizes: torch.Tensor, top_k: int
) -> torch.Tensor:
    """``(B, H, E)`` mass routed by the scaled window ``queries`` ``(B, H, Q, D)`` estimated from their logit to each
    expert's mean key (``keys`` ``(B, H, span, D)``): a softmax over experts, empty experts excluded. No pass over
    the context's tokens per query."""
    means = torch.matmul(member, keys.float()) / sizes.unsqueeze(-1).clamp_min(1)  # (B, H, E, D)
    logits = torch.matmul(queries.float(), means.transpose(-1, -2))  # (B, H, Q, E)
    logits = logits.masked_fill(sizes[:, :, None, :] == 0, float("-inf"))
    return top_k_mass(torch.softmax(logits, dim=-1), top_k)


def predicted_mass(token_scores: torch.Tensor, assignment: torch.Tensor, experts: int) -> torch.Tensor:
    """``(B, H, E)`` mass each expert holds by predicted (log-)attention ``token_scores`` ``(B, H, span)`` of its
    tokens (``assignment`` ``(B, H, span)``): a softmax over the routable tokens, summed per expert."""
    b, h, _ = token_scores.shape
    weight = torch.softmax(token_scores.float(), dim=-1)
    return torch.zeros(b, h, experts, device=token_scores.device).scatter_add_(2, assignment, weight)
