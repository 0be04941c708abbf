"""Key-space "KV experts": a deterministic spherical k-means of one layer's keys, per KV head."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyClusters:
    """Tokens of each (batch, KV head) partitioned into experts by the direction of their keys.

    Parameters
    ----------
    assignment : torch.Tensor
        ``(B, H, T)`` int64, the expert of each token.
    centroids : torch.Tensor
        ``(B, H, E, D)`` float32 unit vectors (a centroid of an empty expert keeps its last value).
    sizes : torch.Tensor
        ``(B, H, E)`` int64 tokens per expert.
    """

    assignment: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.centroids.shape[2]


def spherical_kmeans(keys: torch.Tensor, num_experts: int, iterations: int = 4) -> KeyClusters:
    """Cluster ``keys`` ``(B, H, T, D)`` by cosine similarity into ``num_experts`` experts per head.

    Deterministic: farthest-point initialisation (the first token's key, then repeatedly the key
    least similar to every centroid chosen so far; ``T`` must be >= ``num_experts``), then
    ``iterations`` rounds of assign-to-nearest-centroid and re-normalised mean, vectorised over
    batch, heads and tokens (the only Python loops run over experts and iterations).

    Raises
    ------
    ValueError
        If ``num_experts < 1``, ``iterations < 0``, ``keys`` is not 4-d, or there are fewer tokens
        than experts.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if not isinstance(keys, torch.Tensor) or keys.ndim != 4:
        raise ValueError("keys must be a 4-d tensor (batch, kv_heads, tokens, dim)")
    b, h, t, d = keys.shape
    if t < num_experts:
        raise ValueError(f"cannot split {t} tokens into num_experts={num_experts} experts")
    x = torch.nn.functional.normalize(keys.float(), dim=-1)
    picks = [torch.zeros(b, h, dtype=torch.long, device=keys.device)]
    closest = torch.full((b, h, t), float("-inf"), device=keys.device)  # best similarity to a chosen centroid
    for _ in range(1, num_experts):
        last = torch.gather(x, 2, picks[-1][:, :, None, None].expand(-1, -1, 1, d))  # (B, H, 1, D)
        closest = torch.maximum(closest, torch.matmul(x, last.transpose(-1, -2)).squeeze(-1))
        picks.append(closest.argmin(dim=-1))
    init = torch.stack(picks, dim=-1)  # (B, H, E)
    centroids = torch.gather(x, 2, init[..., None].expand(-1, -1, -1, d))  # (B, H, E, D)
    assignment = torch.zeros(b, h, t, dtype=torch.long, device=keys.device)
    for step in range(iterations + 1):
        sim = torch.matmul(x, centroids.transpose(-1, -2))  # (B, H, T, E)
        assignment = sim.argmax(dim=-1)
        if step == iterations:
            break
        sums = torch.zeros_like(centroids).scatter_add_(2, assignment.unsqueeze(-1).expand(-1, -1, -1, d), x)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    sizes = torch.zeros(b, h, num_experts, dtype=torch.long, device=keys.device)
    sizes.scatter_add_(2, assignment, torch.ones_like(assignment))
    return KeyClusters(assignment, centroids, sizes)
