"""Splitting a per-head keep budget across KV experts in proportion to the query mass routed to them."""

from __future__ import annotations

import numpy as np
import torch


def allocate_budget(
    mass: torch.Tensor, sizes: torch.Tensor, budget: int | torch.Tensor, floor: int = 1
) -> torch.Tensor:
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
    budget : int or torch.Tensor
        Tokens to keep per row, ``0 <= budget <= sizes.sum(-1)``: one int for every row, or a ``(...)``
        int tensor with one budget per row.
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
    if isinstance(budget, torch.Tensor):
        if budget.shape != sizes.shape[:-1] or budget.is_floating_point() or bool((budget < 0).any()):
            raise ValueError(f"a per-row budget must be {tuple(sizes.shape[:-1])} ints >= 0")
    elif isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floor must be an int >= 0, got {floor!r}")
    if bool((sizes.sum(-1) < budget).any()):
        raise ValueError(f"the budget exceeds the tokens of some row ({int(sizes.sum(-1).min())})")
    per_row = budget.detach().long().cpu().numpy()[..., None] if isinstance(budget, torch.Tensor) else budget
    # a few dozen numbers per layer: numpy on the host is an order of magnitude faster than torch ops here
    kept = _allocate(
        mass.detach().float().clamp_min(0).cpu().numpy(), sizes.detach().long().cpu().numpy(), per_row, floor
    )
    return torch.from_numpy(kept).to(sizes.device)


def _allocate(mass: np.ndarray, sizes: np.ndarray, budget: int | np.ndarray, floor: int) -> np.ndarray:
    e = sizes.shape[-1]
    # floors, given in order of mass while the budget lasts
    want = np.minimum(sizes, floor)
    order = np.argsort(-mass, axis=-1, kind="stable")
    want_sorted = np.take_along_axis(want, order, -1)
    kept = np.zeros_like(sizes)
    np.put_along_axis(kept, order, np.where(np.cumsum(want_sorted, -1) <= budget, want_sorted, 0), -1)
    # the rest: proportional to mass within what each expert can still hold, repeated until spent
    for _ in range(e + 1):
        left = budget - kept.sum(-1, keepdims=True)  # (..., 1)
        if not (left > 0).any():
            break
        room = sizes - kept
        weight = np.where(room > 0, mass, np.float32(0))
        no_mass = weight.sum(-1, keepdims=True) <= 0
        weight = np.where(no_mass, room.astype(np.float32), weight)
        share = weight / np.maximum(weight.sum(-1, keepdims=True), np.float32(1e-12)) * left.astype(np.float32)
        kept = kept + np.minimum(np.floor(share).astype(np.int64), room)
        left = budget - kept.sum(-1, keepdims=True)
        # hand out what rounding left over, one token each, by largest remainder among experts with room
        has_room = (sizes - kept) > 0
        rem = np.where(has_room, share - np.floor(share), np.float32(-1.0))
        rank = np.argsort(np.argsort(-rem, axis=-1, kind="stable"), axis=-1, kind="stable")
        kept = kept + ((rank < left) & has_room)
    return kept
