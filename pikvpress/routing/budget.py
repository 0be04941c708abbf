"""Splitting a per-head keep budget across KV experts in proportion to the query mass routed to them."""

from __future__ import annotations

import math

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
        if budget.shape != sizes.shape[:-1] or budget.is_floating_point():
            raise ValueError(f"a per-row budget must be {tuple(sizes.shape[:-1])} ints >= 0")
    elif isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floor must be an int >= 0, got {floor!r}")
    # a few dozen numbers per layer: on the host, plain Python (few rows) or numpy is an order of magnitude
    # faster than torch ops here
    mass_np = mass.detach().cpu().numpy().astype(np.float64).clip(min=0)
    sizes_np = sizes.detach().cpu().numpy().astype(np.int64)
    if isinstance(budget, torch.Tensor):
        budgets = budget.detach().cpu().numpy().astype(np.int64)
        if (budgets < 0).any():
            raise ValueError(f"a per-row budget must be {tuple(sizes.shape[:-1])} ints >= 0")
    else:
        budgets = np.full(sizes_np.shape[:-1], budget, dtype=np.int64)
    if (sizes_np.sum(-1) < budgets).any():
        raise ValueError(f"the budget exceeds the tokens of some row ({int(sizes_np.sum(-1).min())})")
    rows = math.prod(sizes_np.shape[:-1])
    if rows <= _PYTHON_ROWS:
        flat = [
            _allocate_row(m, n, k, floor)
            for m, n, k in zip(
                mass_np.reshape(rows, -1).tolist(), sizes_np.reshape(rows, -1).tolist(), budgets.reshape(-1).tolist()
            )
        ]
        kept = np.array(flat, dtype=np.int64).reshape(sizes_np.shape)
    else:
        kept = _allocate(mass_np, sizes_np, budgets[..., None], floor)
    return torch.from_numpy(kept).to(sizes.device)


#: up to this many rows, :func:`allocate_budget` runs row by row in Python (fewer calls than numpy's)
_PYTHON_ROWS = 32


def _allocate_row(mass: list[float], sizes: list[int], budget: int, floor: int) -> list[int]:
    """One row of :func:`_allocate`, with the same steps and the same ties (the lower expert index first)."""
    e = len(sizes)
    kept = [0] * e
    total = 0
    for i in sorted(range(e), key=lambda i: -mass[i]):  # floors, in order of mass while the budget lasts
        want = min(sizes[i], floor)
        total += want
        if total <= budget:
            kept[i] = want
    for _ in range(e + 1):
        left = budget - sum(kept)
        if left <= 0:
            break
        room = [n - k for n, k in zip(sizes, kept)]
        weight = [m if r > 0 else 0.0 for m, r in zip(mass, room)]
        if _total(weight) <= 0:
            weight = [float(r) for r in room]
        scale = left / max(_total(weight), 1e-12)
        share = [w * scale for w in weight]
        whole = [math.floor(x) for x in share]
        kept = [k + min(w, r) for k, w, r in zip(kept, whole, room)]
        left = budget - sum(kept)
        if left <= 0:
            break
        rem = [x - w if n > k else -1.0 for x, w, n, k in zip(share, whole, sizes, kept)]
        for i in sorted(range(e), key=lambda i: -rem[i])[:left]:
            if sizes[i] > kept[i]:
                kept[i] += 1
    return kept


def _total(values: list[float]) -> float:
    """``sum(values)`` added in numpy's order (eight running sums combined pairwise from eight values on, up to
    128 values), so the Python and numpy paths round alike."""
    n = len(values)
    if n < 8 or n > 128:
        return float(np.sum(np.asarray(values, dtype=np.float64))) if n > 128 else sum(values, 0.0)
    r = list(values[:8])
    stop = n - n % 8
    for i in range(8, stop, 8):
        for j in range(8):
            r[j] += values[i + j]
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for value in values[stop:]:
        total += value
    return total


def _allocate(mass: np.ndarray, sizes: np.ndarray, budget: np.ndarray, floor: int) -> np.ndarray:
    """:func:`allocate_budget` on ``(..., E)`` float64 mass and int64 sizes, ``(..., 1)`` budgets."""
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
        weight = np.where(room > 0, mass, 0.0)
        no_mass = weight.sum(-1, keepdims=True) <= 0
        weight = np.where(no_mass, room.astype(np.float64), weight)
        share = weight * (left / np.maximum(weight.sum(-1, keepdims=True), 1e-12))
        kept = kept + np.minimum(np.floor(share).astype(np.int64), room)
        left = budget - kept.sum(-1, keepdims=True)
        # hand out what rounding left over, one token each, by largest remainder among experts with room
        has_room = (sizes - kept) > 0
        rem = np.where(has_room, share - np.floor(share), -1.0)
        rank = np.argsort(np.argsort(-rem, axis=-1, kind="stable"), axis=-1, kind="stable")
        kept = kept + ((rank < left) & has_room)
    return kept
