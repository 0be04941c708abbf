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
    keys: torch.Tensor,
    num_experts: int,
    iterations: int = 4,
    max_fit_tokens: int | None = 256,
    normalized: bool = False,
) -> KeyClusters:
    """Cluster ``keys`` ``(B, H, T, D)`` by cosine similarity into ``num_experts`` experts per head.

    Deterministic: the centroids are fitted on an evenly strided subsample of at most
    ``max_fit_tokens`` tokens (all tokens when ``None`` or when ``T`` is not larger): farthest-point
    initialisation (the first token's key, then repeatedly the key least similar to every centroid
    chosen so far), then ``iterations`` rounds of assign-to-nearest-centroid and re-normalised mean;
    finally every token is assigned to its nearest centroid. Vectorised over batch, heads and tokens
    (the only Python loops run over experts and iterations); centroid sums are one batched matmul of
    the assignment indicator with the keys. ``normalized=True`` says the keys are unit vectors
    already (skips normalising them again).

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
    x = keys.float() if normalized else torch.nn.functional.normalize(keys.float(), dim=-1)
    fit = x
    if max_fit_tokens is not None and t > max_fit_tokens:
        fit = x.index_select(2, torch.linspace(0, t - 1, max_fit_tokens, device=keys.device).round().long())
    fit_t = fit.transpose(-1, -2)  # (B, H, D, Tf)
    # farthest-point seeding: the first token's key, then repeatedly the key least similar to every centroid
    # chosen so far
    picks = [fit[:, :, :1]]
    closest = None  # (B, H, 1, Tf) best similarity to a chosen centroid
    for _ in range(1, num_experts):
        similarity = torch.matmul(picks[-1], fit_t)
        closest = similarity if closest is None else torch.maximum(closest, similarity)
        farthest = closest.argmin(dim=-1, keepdim=True)  # (B, H, 1, 1)
        picks.append(torch.gather(fit, 2, farthest.expand(-1, -1, -1, d)))
    centroids = torch.cat(picks, dim=2)  # (B, H, E, D)
    experts = torch.arange(num_experts, device=keys.device)[:, None]  # (E, 1)
    for _ in range(iterations):
        # (B, H, E, Tf) similarities reduced with max over experts (argmax over a middle axis is slow on CPU)
        nearest = torch.matmul(centroids, fit_t).max(dim=-2).indices  # (B, H, Tf)
        sums = torch.matmul((nearest.unsqueeze(-2) == experts).to(fit.dtype), fit)  # (B, H, E, D)
        norms = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    assignment = torch.matmul(centroids, x.transpose(-1, -2)).max(dim=-2).indices  # (B, H, T)
    sizes = torch.zeros(b, h, num_experts, dtype=torch.long, device=keys.device)
    sizes.scatter_add_(2, assignment, torch.ones_like(assignment))
    return KeyClusters(assignment, centroids, sizes)
