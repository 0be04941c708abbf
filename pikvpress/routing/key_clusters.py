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


def spherical_kmeans(
    keys: torch.Tensor, num_experts: int, iterations: int = 4, max_fit_tokens: int | None = 256
) -> KeyClusters:
    """Cluster ``keys`` ``(B, H, T, D)`` by cosine similarity into ``num_experts`` experts per head.

    Deterministic: the centroids are fitted on an evenly strided subsample of at most
    ``max_fit_tokens`` tokens (all tokens when ``None`` or when ``T`` is not larger): farthest-point
    initialisation (the first token's key, then repeatedly the key least similar to every centroid
    chosen so far), then ``iterations`` rounds of assign-to-nearest-centroid and re-normalised mean;
    finally every token is assigned to its nearest centroid. Vectorised over batch, heads and tokens
    (the only Python loops run over experts and iterations); centroid sums are one batched matmul
    of the assignment indicator with the keys.

    Raises
    ------
    ValueError
        If ``num_experts < 1``, ``iterations < 0``, ``max_fit_tokens < num_experts``, ``keys`` is not
        4-d, or there are fewer tokens than experts.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if max_fit_tokens is not None and (
        isinstance(max_fit_tokens, bool) or not isinstance(max_fit_tokens, int) or max_fit_tokens < num_experts
    ):
        raise ValueError(f"max_fit_tokens must be None or an int >= num_experts, got {max_fit_tokens!r}")
    if not isinstance(keys, torch.Tensor) or keys.ndim != 4:
        raise ValueError("keys must be a 4-d tensor (batch, kv_heads, tokens, dim)")
    b, h, t, d = keys.shape
    if t < num_experts:
        raise ValueError(f"cannot split {t} tokens into num_experts={num_experts} experts")
    x = torch.nn.functional.normalize(keys.float(), dim=-1)
    fit = x
    if max_fit_tokens is not None and t > max_fit_tokens:
        fit = x[:, :, torch.linspace(0, t - 1, max_fit_tokens, device=keys.device).round().long()]
    experts = torch.arange(num_experts, device=keys.device)[:, None]  # (E, 1)
    picks = [torch.zeros(b, h, dtype=torch.long, device=keys.device)]
    closest = torch.full(fit.shape[:3], float("-inf"), device=keys.device)  # best similarity to a chosen centroid
    for _ in range(1, num_experts):
        last = torch.gather(fit, 2, picks[-1][:, :, None, None].expand(-1, -1, 1, d))  # (B, H, 1, D)
        closest = torch.maximum(closest, torch.matmul(fit, last.transpose(-1, -2)).squeeze(-1))
        picks.append(closest.argmin(dim=-1))
    init = torch.stack(picks, dim=-1)  # (B, H, E)
    centroids = torch.gather(fit, 2, init[..., None].expand(-1, -1, -1, d))  # (B, H, E, D)
    for _ in range(iterations):
        nearest = torch.matmul(fit, centroids.transpose(-1, -2)).argmax(dim=-1)  # (B, H, Tf)
        sums = torch.matmul((nearest.unsqueeze(-2) == experts).to(fit.dtype), fit)  # (B, H, E, D)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    assignment = torch.matmul(x, centroids.transpose(-1, -2)).argmax(dim=-1)  # (B, H, T)
    sizes = torch.zeros(b, h, num_experts, dtype=torch.long, device=keys.device)
    sizes.scatter_add_(2, assignment, torch.ones_like(assignment))
    return KeyClusters(assignment, centroids, sizes)
