"""Per-token decode statistics of one cache layer: attention mass, its moving average, last use, position."""

from __future__ import annotations

import torch

_FIELDS = ("mass", "ema", "last_used", "position", "prior")


class DecodeStatistics:
    """What decoding queries did with each cached token of one layer, per batch row and KV head.

    Every statistic is a ``(B, H, T)`` tensor aligned with the layer's cache: entry ``[b, h, i]`` describes
    the token the cache holds at index ``i`` of row ``b``, head ``h``. :meth:`keep` compacts them with the
    same indices the cache is cut with, so they stay aligned after an eviction. They live in buffers with
    spare room, so a decode step writes its new tokens in place instead of copying every statistic.

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
    prior : torch.Tensor, optional
        float32 what was known of the token before any decode step used it (the moving average's start);
        default: ``ema``.
    step : int
        Decode steps observed so far.
    seen : int, optional
        Tokens that have gone through the layer, evicted ones included (default: the tokens given).
    decay : float
        Weight of the previous average in the moving average, in [0, 1).
    threshold : float or None
        Attention above which a token counts as used; None: above uniform (1 / tokens in the cache).
    """

    def __init__(
        self,
        mass: torch.Tensor,
        ema: torch.Tensor,
        last_used: torch.Tensor,
        position: torch.Tensor,
        prior: torch.Tensor | None = None,
        step: int = 0,
        seen: int | None = None,
        decay: float = 0.9,
        threshold: float | None = None,
    ) -> None:
        self._length = position.shape[-1]
        prior = ema.clone() if prior is None else prior
        self._data = {"mass": mass, "ema": ema, "last_used": last_used, "position": position, "prior": prior}
        self.step = step
        self.seen = self._length if seen is None else seen
        self.kept_at = step  # the step of the last eviction (or of the start)
        self.decay = decay
        self.threshold = threshold

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
        probabilities) starts the moving average and counts as one step of accumulated mass (H2O counts
        the prefill's attention too); without it every token starts at ``1 / T`` and no mass.
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
            mass=ema.clone() if prior is not None else torch.zeros_like(ema),  # the prior counts as one step
            ema=ema,
            last_used=torch.full(position.shape, -1, dtype=torch.long, device=position.device),
            position=position.detach().long().clone(),
            decay=decay,
            threshold=threshold,
        )

    # --- the statistics, as (B, H, T) views of their buffers ---------------------------------------
    def _get(self, name: str) -> torch.Tensor:
        return self._data[name][..., : self._length]

    def _set(self, name: str, value: torch.Tensor) -> None:
        if value.shape != self._get(name).shape:
            raise ValueError(f"{name} must have shape {tuple(self._get(name).shape)}, got {tuple(value.shape)}")
        self._data[name] = value.to(self._data[name].dtype).clone()

    mass = property(lambda self: self._get("mass"), lambda self, v: self._set("mass", v))
    ema = property(lambda self: self._get("ema"), lambda self, v: self._set("ema", v))
    last_used = property(lambda self: self._get("last_used"), lambda self, v: self._set("last_used", v))
    position = property(lambda self: self._get("position"), lambda self, v: self._set("position", v))
    prior = property(lambda self: self._get("prior"), lambda self, v: self._set("prior", v))

    @property
    def length(self) -> int:
        return self._length

    @property
    def rows_heads(self) -> tuple[int, int]:
        """``(B, H)``: batch rows and KV heads the statistics cover."""
        return tuple(self._data["position"].shape[:2])

    @property
    def since_eviction(self) -> int:
        """Steps observed since the last :meth:`keep` (or since the start)."""
        return self.step - self.kept_at

    # --- updates ------------------------------------------------------------------------------------
    def append(self, position: torch.Tensor) -> None:
        """Add the tokens just written to the cache (``position`` ``(B, H, n)``), at the end.

        Positions that start below the tokens seen so far (a caller counting a pruned cache's length, or a
        left-padded batch row) are shifted, row by row, to continue after them, so positions keep increasing; ``seen`` grows by ``n`` at least, and
        to the last position + 1. Their moving average starts at ``1 / T`` (T counting them), a uniform
        share: a new token is neither favoured nor penalised before its first observation.
        """
        # per batch row: a left-padded row counts its positions from its first real token
        first = position.amin(dim=(1, 2), keepdim=True)
        position = position + (self.seen - first).clamp_min(0)
        self.seen = max(self.seen + position.shape[-1], int(position.max()) + 1)
        n = position.shape[-1]
        end = self._length + n
        for name in _FIELDS:
            buffer = self._data[name]
            if buffer.shape[-1] < end:  # grow geometrically, so appends copy O(1) per token on average
                grown = buffer.new_empty(*buffer.shape[:-1], max(2 * end, 64))
                grown[..., : self._length] = buffer[..., : self._length]
                self._data[name] = grown
        new = slice(self._length, end)
        self._data["mass"][..., new] = 0
        self._data["ema"][..., new] = 1.0 / end
        self._data["prior"][..., new] = 1.0 / end
        self._data["last_used"][..., new] = -1
        self._data["position"][..., new] = position
        self._length = end

    def observe(self, probs: torch.Tensor) -> None:
        """Record one decode step: ``probs`` ``(B, H, T)``, the attention each cached token received
        (averaged over the step's queries of each KV head)."""
        if probs.shape != self.position.shape:
            raise ValueError(f"probs {tuple(probs.shape)} must match the statistics {tuple(self.position.shape)}")
        probs = probs.detach().float()
        self.mass.add_(probs)
        self.ema.mul_(self.decay).add_(probs, alpha=1 - self.decay)
        threshold = self.threshold if self.threshold is not None else 1.0 / max(self.length, 1)
        self.last_used.masked_fill_(probs > threshold, self.step)
        self.step += 1

    def record_steps(self, position: torch.Tensor, probs: torch.Tensor) -> None:
        """Record ``S`` decode steps at once, each of which appended one token and then attended.

        ``position`` ``(B, H, S)``: the token each step appended; ``probs`` ``(B, H, S, T + S)``: the attention
        of step ``s`` over the cache it saw (zero beyond its ``T + s + 1`` tokens). The result equals ``S``
        calls of :meth:`append` and :meth:`observe` in turn (to float rounding), in a handful of tensor ops.
        """
        b, h, s = position.shape
        t = self._length
        if probs.shape != (b, h, s, t + s):
            raise ValueError(f"probs {tuple(probs.shape)} must be {(b, h, s, t + s)} for {s} steps on {t} tokens")
        device = probs.device
        self.append(position)
        # where append starts a token's moving average, one step at a time: 1 / (cache length at its step)
        self.ema[..., t:] = 1.0 / torch.arange(t + 1, t + s + 1, device=device, dtype=torch.float32)
        self.prior[..., t:] = self.ema[..., t:]
        probs = probs.detach().float()
        # step j weighs (1 - decay) * decay^(S-1-j); a token appended at step j decays from then on only
        steps = torch.arange(s, device=device, dtype=torch.float32)
        weights = torch.stack([torch.ones_like(steps), (1 - self.decay) * self.decay ** (s - 1 - steps)])
        sums = torch.matmul(weights, probs)  # (B, H, 2, T): the mass and the moving average's new part
        exponent = torch.full((t + s,), float(s), device=device)
        exponent[t:] = s - steps
        self.mass.add_(sums[:, :, 0])
        self.ema.mul_(self.decay**exponent).add_(sums[:, :, 1])
        if self.threshold is None:  # above a uniform share of the cache each step saw
            threshold = 1.0 / torch.arange(t + 1, t + s + 1, device=device, dtype=torch.float64)
        else:
            threshold = torch.full((s,), float(self.threshold), device=device, dtype=torch.float64)
        used = probs > threshold.float().view(s, 1)  # (B, H, S, T)
        last = (used * (steps + 1).view(s, 1)).amax(dim=2)  # 1 + the last step a token was used; 0: none
        self.last_used.copy_(torch.where(last > 0, self.step - 1 + last.long(), self.last_used))
        self.step += s

    def keep(self, indices: torch.Tensor) -> None:
        """Compact to the tokens at ``indices`` ``(B, H, K)`` (the indices the cache is cut with)."""
        for name in _FIELDS:
            self._data[name] = self._get(name).gather(-1, indices)
        self._length = indices.shape[-1]
        self.kept_at = self.step
