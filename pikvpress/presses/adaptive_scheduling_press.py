"""AdaptiveSchedulingPress: decode-time eviction under a token budget, from statistics gathered while decoding."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

from pikvpress.compat.patches import KEEP_DECODE_QUERY, gather_kept, window_probs
from pikvpress.models.adapter import layer_adapter
from pikvpress.scheduling import POLICIES, DecodeStatistics, kept_indices

logger = logging.getLogger(__name__)


@dataclass
class AdaptiveSchedulingPress(BasePress):
    """Evict cached tokens while decoding, down to a budget, by what the decode queries keep using.

    At every decode step and full-attention layer the press computes the step's attention over the
    cached keys (the model's own RoPE, scaling and sinks, whatever attention implementation runs) and
    updates per-token statistics (:class:`~pikvpress.scheduling.DecodeStatistics`): the accumulated
    attention mass, its moving average, the last step the token received more than ``threshold``, and
    its position. Every ``interval`` steps, or as soon as the cache holds ``budget + interval`` tokens,
    a layer above its budget is cut down to it: the cache tensors shrink and the statistics are
    compacted with them. The ``sink_tokens`` earliest and ``recent_window`` latest tokens are kept first;
    the rest by ``policy``:

    - ``"h2o"``: heavy hitters, by accumulated attention mass;
    - ``"lru"``: by the last step a token was used;
    - ``"streaming"``: the most recent tokens (sinks plus a window);
    - ``"adaptive"``: by the moving average of attention, started at ``1 / T`` (the prior) for the tokens
      already cached when decoding starts.

    The prefill is left to a prefill press (``PrefillDecodingPress(prefilling_press=...,
    decoding_press=AdaptiveSchedulingPress(...))``). Positions of the tokens cached before decoding are
    taken in cache order: a prefill press that keeps its tokens in context order (ExpertRoutingPress, or
    none) gives true recency; one that reorders them gives recency by cache order.

    Parameters
    ----------
    budget : int, optional
        Tokens per layer and KV head kept after an eviction.
    compression_ratio : float, optional
        Instead of ``budget``: the fraction of the tokens seen so far (context and generated) removed;
        the budget grows with the sequence. Exactly one of ``budget`` and ``compression_ratio``.
    policy : {"adaptive", "h2o", "lru", "streaming"}
        What decides among the tokens outside the sinks and the recent window.
    interval : int
        Decode steps between evictions; the cache never holds more than ``budget + interval`` tokens.
    sink_tokens : int
        Earliest tokens always kept.
    recent_window : int
        Latest tokens always kept.
    decay : float
        Weight of the past in the moving average, in [0, 1).
    threshold : float, optional
        Attention above which a token counts as used (``lru``); default: above uniform (1 / T).
    """

    budget: int | None = None
    compression_ratio: float | None = None
    policy: str = "adaptive"
    interval: int = 16
    sink_tokens: int = 4
    recent_window: int = 32
    decay: float = 0.9
    threshold: float | None = None
    stats: dict[int, DecodeStatistics] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.compression_ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) and compression_ratio")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise ValueError(f"budget must be an int >= 1, got {self.budget!r}")
        if self.compression_ratio is not None and (
            isinstance(self.compression_ratio, bool)
            or not isinstance(self.compression_ratio, (int, float))
            or not 0 <= self.compression_ratio < 1
        ):
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
        for name in ("sink_tokens", "recent_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"threshold must be None or >= 0, got {self.threshold!r}")

    def post_init_from_model(self, model: nn.Module) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every layer's statistics (a new sequence starts; kvpress's PrefillDecodingPress calls it)."""
        self.stats = {}

    def layer_budget(self, tokens_seen: int) -> int:
        """Tokens per head a layer keeps once ``tokens_seen`` tokens have gone through the model."""
        if self.budget is not None:
            return self.budget
        return max(1, math.ceil(tokens_seen * (1 - self.compression_ratio)))

    @staticmethod
    def _step_attention(module, adapter, hidden_states, keys, q_len, kwargs) -> torch.Tensor:
        """``(B, H, T)`` attention of this step's queries over the cached keys, averaged over the queries of
        each KV head. One query without attention sinks (a plain decode step) takes the short path."""
        b, h = keys.shape[:2]
        if q_len == 1 and adapter is not None and adapter.sinks is None:
            # the queries the model's attention just used (kept by the compat layer's attention wrapper),
            # else projected and rotated again
            queries = module.__dict__.pop("pikvpress_decode_query", None)
            if queries is None or queries.shape[2] != 1 or queries.shape[0] != b:
                setattr(module, KEEP_DECODE_QUERY, True)  # from the next step on
                queries = adapter.queries(hidden_states, kwargs["position_embeddings"])  # (B, Hq, 1, D)
            queries = queries.reshape(b, h, -1, queries.shape[-1]) * adapter.scaling  # (B, H, g, D)
            logits = torch.matmul(queries, keys.transpose(-1, -2)).float()
            return torch.softmax(logits, dim=-1).mean(dim=2)
        return window_probs(module, hidden_states, keys, q_len, kwargs["position_embeddings"]).mean(dim=2)

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        q_len = hidden_states.shape[1]
        cache_position = kwargs["cache_position"]
        idx = int(module.layer_idx)
        if is_prefilling(cache_position, q_len):
            self.stats.pop(idx, None)
            return output
        adapter = layer_adapter(module)
        if adapter is not None and adapter.is_sliding:
            return output  # a sliding-window layer is bounded by its window already
        layer = kwargs["past_key_values"].layers[idx]
        keys, values = layer.keys, layer.values
        b, h, t, _ = keys.shape
        stats = self.stats.get(idx)
        if stats is None or stats.length != t - q_len or stats.position.shape[:2] != (b, h):
            # first decode step: the tokens already cached, in cache order
            position = torch.arange(t - q_len, device=keys.device).expand(b, h, t - q_len)
            stats = DecodeStatistics.start(position, decay=self.decay, threshold=self.threshold)
            self.stats[idx] = stats
        # positions of the new tokens: position_ids when the caller passes them (kvpress's pipeline passes
        # those, not cache_position, which then counts the pruned cache), else cache_position
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] == q_len:
            new_positions = position_ids.to(keys.device).view(-1, 1, q_len).expand(b, h, q_len)
        else:
            new_positions = cache_position.to(keys.device).view(1, 1, q_len).expand(b, h, q_len)
        stats.append(new_positions)  # continues after the tokens seen, however the caller counts
        stats.observe(self._step_attention(module, adapter, hidden_states, keys, q_len, kwargs))
        budget = self.layer_budget(stats.seen)
        if t > budget and (stats.since_eviction >= self.interval or t >= budget + self.interval):
            kept = kept_indices(stats, budget, self.policy, self.sink_tokens, self.recent_window)
            layer.keys, layer.values = gather_kept(keys, values, kept)
            stats.keep(kept)
        return output
