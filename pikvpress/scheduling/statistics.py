"""Per-token decode statistics of one cache layer: attention mass, its moving average, last use, position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeStatistics:
    """What decoding queries did with each cached token of one layer, per batch row and KV head.

    Every tensor is ``(B, H, T)`` and aligned with the layer's cache: entry ``[b, h, i]`` describes the
    token the cache holds at index ``i`` of row ``b``, head ``h``. :meth:`keep` compacts them with the
    same indices the cache is cut with, so they stay aligned after an eviction.

    Parameters
    ----------
    mass : torch.Tensor
        float32 attention mass received from decode queries, accumulated over steps (H2O's statistic).
    ema : torch.Tensor
        float32 exponential moving average of the attention received per step, started at the prior.
    last_used : torch.Tensor
        int64 last decode step at which the token received more than ``threshold``; -1 if never.
    position : torch.Tensor
        int64 position of the token in the sequence (recency and attention sinks are read from it).
    step : int
        Decode steps observed so far.
    decay : float
        Weight of the previous average in the moving average, in [0, 1).
    threshold : float or None
        Attention above which a token counts as used; None: above uniform (1 / tokens in the cache).
    """

    mass: torch.Tensor
    ema: torch.Tensor
    last_used: torch.Tensor
    position: torch.Tensor
    step: int = 0
    decay: float = 0.9
    threshold: float | None = None

    @classmethod
    def start(
        cls,
        position: torch.Tensor,
        prior: torch.Tensor | None = None,
        decay: float = 0.9,
        threshold: float | None = None,
    ) -> DecodeStatistics:
        """Statistics for the tokens already cached (``position`` ``(B, H, T)``), before any decode step.

        ``prior`` ``(B, H, T)`` (for example a prefill press's scores, on the scale of attention
        probabilities) starts the moving average; without it every token starts at ``1 / T``.
        """
        if position.ndim != 3:
            raise ValueError(f"position must be (batch, heads, tokens), got shape {tuple(position.shape)}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold must be None or >= 0, got {threshold!r}")
        t = position.shape[-1]
        if prior is None:
            ema = torch.full(position.shape, 1.0 / max(t, 1), dtype=torch.float32, device=position.device)
        else:
            if prior.shape != position.shape:
                raise ValueError(f"prior {tuple(prior.shape)} must match position {tuple(position.shape)}")
            ema = prior.detach().float().clone()
        return cls(
            mass=torch.zeros(position.shape, dtype=torch.float32, device=position.device),
            ema=ema,
            last_used=torch.full(position.shape, -1, dtype=torch.long, device=position.device),
            position=position.detach().long().clone(),
            decay=decay,
            threshold=threshold,
        )

    @property
    def length(self) -> int:
        return self.position.shape[-1]

    def append(self, position: torch.Tensor) -> None:
        """Add the tokens just written to the cache (``position`` ``(B, H, n)``), at the end.

        Their moving average starts at the row's mean, so a new token is neither favoured nor
        penalised before its first observation.
        """
        b, h, n = position.shape
        start = self.ema.mean(dim=-1, keepdim=True).expand(b, h, n) if self.length else self.ema.new_zeros(b, h, n)
        self.mass = torch.cat([self.mass, self.mass.new_zeros(b, h, n)], dim=-1)
        self.ema = torch.cat([self.ema, start], dim=-1)
        self.last_used = torch.cat([self.last_used, self.last_used.new_full((b, h, n), -1)], dim=-1)
        self.position = torch.cat([self.position, position.to(self.position)], dim=-1)

    def observe(self, probs: torch.Tensor) -> None:
        """Record one decode step: ``probs`` ``(B, H, T)``, the attention each cached token received
        (averaged over the step's queries of each KV head)."""
        if probs.shape != self.position.shape:
            raise ValueError(f"probs {tuple(probs.shape)} must match the statistics {tuple(self.position.shape)}")
        probs = probs.detach().float()
        self.mass += probs
        self.ema.mul_(self.decay).add_(probs, alpha=1 - self.decay)
        threshold = self.threshold if self.threshold is not None else 1.0 / max(self.length, 1)
        self.last_used = torch.where(probs > threshold, torch.full_like(self.last_used, self.step), self.last_used)
        self.step += 1

    def keep(self, indices: torch.Tensor) -> None:
        """Compact to the tokens at ``indices`` ``(B, H, K)`` (the indices the cache is cut with)."""
        self.mass = self.mass.gather(-1, indices)
        self.ema = self.ema.gather(-1, indices)
        self.last_used = self.last_used.gather(-1, indices)
        self.position = self.position.gather(-1, indices)
