"""Splitting a per-head keep budget across KV experts in proportion to the query mass routed to them."""

from __future__ import annotations

import torch


def allocate_budget(mass: torch.Tensor, sizes: torch.Tensor, budget: int, floor: int = 1) -> torch.Tensor:
    """Tokens to keep in each expert, summing exactly to ``budget`` for every (batch, head).

    Each populated expert first gets ``min(floor, size)`` tokens (so no populated expert is emptied
    while the budget allows it), the rest of the budget is split in proportion to ``mass`` (largest
    remainders first), and no expert gets more than its size; budget an expert cannot hold moves to
    the others, again by mass (experts without mass by size).

    Parameters
    ----------
    mass : torch.Tensor
        ``(..., E)`` non-negative query mass routed to each expert.
    sizes : torch.Tensor
        ``(..., E)`` int tokens in each expert.
    budget : int
        Tokens to keep per row, ``0 <= budget <= sizes.sum(-1)`` for every row.
    floor : int
        Minimum tokens for each populated expert (when the budget covers every expert's floor;
        otherwise the floors go to the experts with the most mass).

    Returns
    -------
    torch.Tensor
        ``(..., E)`` int64 kept per expert.
    """
    if mass.shape != sizes.shape:
        raise ValueError(f"mass {tuple(mass.shape)} and sizes {tuple(sizes.shape)} must have the same shape")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floor must be an int >= 0, got {floor!r}")
    sizes = sizes.long()
    if bool((sizes.sum(-1) < budget).any()):
        raise ValueError(f"budget {budget} exceeds the tokens of some row ({int(sizes.sum(-1).min())})")
    mass = mass.float().clamp_min(0)
    e = sizes.shape[-1]
    # floors, given in order of mass while the budget lasts
    want = torch.minimum(sizes, torch.full_like(sizes, floor))
    order = torch.argsort(mass, dim=-1, descending=True, stable=True)
    want_sorted = torch.gather(want, -1, order)
    fits = torch.cumsum(want_sorted, -1) <= budget
    kept = torch.zeros_like(sizes).scatter_(-1, order, torch.where(fits, want_sorted, 0))
    # the rest: proportional to mass within what each expert can still hold, repeated until spent
    for _ in range(e + 1):
        left = budget - kept.sum(-1, keepdim=True)  # (..., 1)
        room = sizes - kept
        if not bool((left > 0).any()):
            break
        weight = torch.where(room > 0, mass, torch.zeros_like(mass))
        no_mass = weight.sum(-1, keepdim=True) <= 0
        weight = torch.where(no_mass, room.float(), weight)
        share = weight / weight.sum(-1, keepdim=True).clamp_min(1e-12) * left.float()
        add = torch.minimum(share.floor().long(), room)
        kept = kept + add
        left = budget - kept.sum(-1, keepdim=True)
        # hand out what rounding left over, one token each, by largest remainder among experts with room
        rem = torch.where((sizes - kept) > 0, share - share.floor(), torch.full_like(share, -1.0))
        rank = torch.argsort(torch.argsort(rem, dim=-1, descending=True, stable=True), dim=-1)
        extra = (rank < left) & ((sizes - kept) > 0)
        kept = kept + extra.long()
    return kept
