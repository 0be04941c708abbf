"""What ExpertRoutingPress did at one layer of its last prefill, for reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RoutingStats:
    """What routing did at one layer of the last prefill (tensors on CPU).

    Parameters
    ----------
    router : str
        The router that ran (``"keys"`` where ``"gate"`` fell back on a layer without a MoE router).
    sizes : torch.Tensor
        ``(B, H, E)`` context tokens in each expert (protected sink/recent tokens excluded).
    mass : torch.Tensor
        ``(B, H, E)`` query mass routed to each expert (normalised to sum 1 per row).
    kept : torch.Tensor
        ``(B, H, E)`` tokens kept in each expert.
    protected : int
        Sink and recent tokens kept outside the experts, per head.
    """

    router: str
    sizes: torch.Tensor
    mass: torch.Tensor
    kept: torch.Tensor
    protected: int

    @property
    def load(self) -> torch.Tensor:
        """``(E,)`` share of the tokens in each expert, averaged over batch and heads."""
        sizes = self.sizes.float()
        return (sizes / sizes.sum(-1, keepdim=True).clamp_min(1)).mean(dim=(0, 1))

    def summary(self) -> dict[str, Any]:
        """One report row: router, experts, token loads, query mass and kept counts (means over batch and heads)."""
        load = self.load
        mass = self.mass.float().mean(dim=(0, 1))
        kept = self.kept.float().mean(dim=(0, 1))
        return {
            "router": self.router,
            "experts": int(self.sizes.shape[-1]),
            "max_load": float(load.max()),
            "max_mass": float(mass.max()),
            "kept_min": float(kept.min()),
            "kept_max": float(kept.max()),
            "kept_total": float(kept.sum()) + self.protected,
            "protected": self.protected,
        }
