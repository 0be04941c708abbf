"""AdaptiveSchedulingPress: decode-time eviction under a token budget, from statistics gathered while decoding."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

from pikvpress.cache.ops import evict
from pikvpress.cache.support import check_cache
from pikvpress.cache.view import dense
from pikvpress.models.adapter import get_adapter, layer_adapter
from pikvpress.presses.arguments import check_choice, check_int, check_number
from pikvpress.presses.lifecycle import FinishesOnExit
from pikvpress.scheduling import (
    POLICIES,
    DecodeQueryTap,
    DecodeStatistics,
    KeptScoresSource,
    PerCache,
    layer_step_probs,
    priority_order,
    scores_to_prior,
    window_probs,
)

logger = logging.getLogger(__name__)


@dataclass
class AdaptiveSchedulingPress(FinishesOnExit, BasePress):
    """Evict cached tokens while decoding, down to a budget, by what the decode queries keep using.

    At every decode step and full-attention layer the press computes the step's attention over the
    cached keys (the model's own RoPE, scaling and sinks, whatever attention implementation runs) and
    updates per-token statistics (:class:`~pikvpress.scheduling.DecodeStatistics`): the accumulated
    attention mass, its moving average, the last step the token received more than ``threshold``, and
    its position. Every ``interval`` steps, or as soon as the cache holds ``budget + interval`` tokens,
    a layer above its budget is cut down to it: the cache tensors shrink and the statistics are
    compacted with them. The ``sink_tokens`` earliest and ``recent_window`` latest tokens are kept first;
    the rest by ``policy``:

    - ``"h2o"``: heavy hitters, by accumulated attention mass (the prior, below, counts as one step);
    - ``"lru"``: by the last step a token was used;
    - ``"streaming"``: the most recent tokens (sinks plus a window);
    - ``"adaptive"``: by the moving average of attention. For the tokens cached when decoding starts it
      starts at a prior: the scores of the prefill press that kept them (``prior_from``, e.g. the
      :class:`~pikvpress.ExpertRoutingPress` of a ``PrefillDecodingPress``), turned into probabilities by rank;
      else, when the press sees the prefill itself, the attention of the prefill's last ``prior_window``
      queries; else ``1 / T``.

    Decode steps are recorded in batches: each step's query (the one the model's attention used, handed over
    through a :class:`~pikvpress.scheduling.DecodeQueryTap` the press opens while its hooks are on) is kept,
    and the attention of all steps kept since the last record is computed in one masked matmul when the
    press evicts, or every ``interval`` steps; the statistics equal step-by-step updates.

    A layer packed by :class:`~pikvpress.QuantizationPress` stays packed: the press reads its keys
    dequantized and, on eviction, stores a new packed layer holding the kept tokens
    (:meth:`~pikvpress.cache.PackedKVLayer.gathered`).

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
    prior_window : int
        Prefill queries whose attention is the ``adaptive`` prior when no prefill press gives scores; 0: a
        uniform prior.
    prior_from : KeptScoresSource, optional
        The prefill press whose scores of the tokens it kept start the ``adaptive`` and ``h2o`` statistics (any
        press with ``kept_scores(cache, layer_idx)``, e.g. :class:`~pikvpress.ExpertRoutingPress`). It is asked
        about the cache being decoded only, at its first decode step.

    Examples
    --------
    >>> routing = ExpertRoutingPress(compression_ratio=0.5)
    >>> press = PrefillDecodingPress(routing, AdaptiveSchedulingPress(budget=256, prior_from=routing))
    >>> pipe(context, question=question, press=press)["answer"]

    Nothing of the press stays on the model when its context ends, and it keeps no cache alive: the decode
    steps waiting to be scored are recorded and let go, and the query tap closes.
    """

    #: the press evicts while decoding: harnesses must keep it active during generation (no shared prefill)
    compresses_while_decoding: ClassVar[bool] = True

    budget: int | None = None
    compression_ratio: float | None = None
    policy: str = "adaptive"
    interval: int = 16
    sink_tokens: int = 4
    recent_window: int = 32
    decay: float = 0.9
    threshold: float | None = None
    prior_window: int = 32
    prior_from: Any = None
    _stats: dict[int, DecodeStatistics] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[int, _PendingSteps] = field(default_factory=dict, init=False, repr=False)
    _priors: PerCache = field(default_factory=PerCache, init=False, repr=False)
    _adapters: dict[int, tuple] = field(default_factory=dict, init=False, repr=False)
    _tap: DecodeQueryTap = field(default_factory=DecodeQueryTap, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.compression_ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) and compression_ratio")
        if self.budget is not None:
            check_int("budget", self.budget, 1)
        if self.compression_ratio is not None:
            check_number("compression_ratio", self.compression_ratio, 0, 1)
        check_choice("policy", self.policy, POLICIES)
        check_int("interval", self.interval, 1)
        for name in ("sink_tokens", "recent_window", "prior_window"):
            check_int(name, getattr(self, name), 0)
        check_number("decay", self.decay, 0, 1)
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"threshold must be None or >= 0, got {self.threshold!r}")
        if self.prior_from is not None and not isinstance(self.prior_from, KeptScoresSource):
            raise ValueError(
                "prior_from must be None or a press with kept_scores(cache, layer_idx) (e.g. ExpertRoutingPress), "
                f"got {type(self.prior_from).__name__}"
            )

    def post_init_from_model(self, model: nn.Module) -> None:
        adapter = get_adapter(model)  # UnsupportedModelError naming the model's class and the supported families
        self.reset()
        self._tap.open(layer.attention for layer in adapter.layers if not layer.is_sliding)

    def finish(self) -> None:
        """End of the press's context: record the decode steps still waiting, let go of the cache, close the tap."""
        for idx in list(self._pending):
            self._flush(idx)
        self._pending = {}
        self._tap.close()

    def reset(self) -> None:
        """Forget every layer's statistics (a new sequence starts; kvpress's PrefillDecodingPress calls it when its
        context ends) and let go of the cache.

        The priors of the last prefill stay, weakly keyed by their cache: kvpress's pipeline prefills in one press
        context and decodes in another, with a reset between. A prior is used only on the cache it was computed for
        (that cache object, same length), once, and is freed with the cache."""
        self._stats, self._pending, self._adapters = {}, {}, {}
        self._tap.close()

    @property
    def stats(self) -> dict[int, DecodeStatistics]:
        """Each layer's :class:`~pikvpress.scheduling.DecodeStatistics`, with every decode step recorded."""
        for idx in list(self._pending):
            self._flush(idx)
        return self._stats

    def layer_budget(self, tokens_seen: int) -> int:
        """Tokens per head a layer keeps once ``tokens_seen`` tokens have gone through the model."""
        if self.budget is not None:
            return self.budget
        return max(1, math.ceil(tokens_seen * (1 - self.compression_ratio)))

    def _flush(self, idx: int) -> None:
        """Record the decode steps of layer ``idx`` waiting in ``_pending`` into its statistics."""
        pending = self._pending.pop(idx, None)
        stats = self._stats.get(idx)
        if pending is None or not pending.queries or stats is None:
            return
        layer = pending.layer
        b, h, length, _ = layer.keys.shape
        n, t = len(pending.queries), stats.length
        if length < t + n or stats.rows_heads != (b, h):
            return  # the cache changed under the press (another press cut it): these steps are lost
        queries = torch.cat(pending.queries, dim=2) * pending.scaling  # (B, Hq, n, D)
        probs = layer_step_probs(layer, queries, t, pending.sinks)
        positions = torch.cat(pending.positions, dim=-1).to(probs.device)  # (B or 1, n)
        stats.record_steps(positions.view(-1, 1, n).expand(b, h, n), probs)

    def _start(self, module: nn.Module, cache, idx: int, position: torch.Tensor) -> DecodeStatistics:
        """Statistics for the tokens cached when decoding starts; the moving average starts at the prior."""
        prior = None
        # the prefill press's scores of the tokens it kept in this cache, else this press's own window attention
        published = None if self.prior_from is None else self.prior_from.kept_scores(cache, idx)
        own = self._priors.pop(cache, idx)
        if published is not None and published.shape == position.shape:
            prior = scores_to_prior(published)
        elif own is not None and own.shape == position.shape:
            prior = own
        return DecodeStatistics.start(position, prior=prior, decay=self.decay, threshold=self.threshold)

    def _prefill(self, module, adapter, hidden_states, kwargs, idx: int) -> None:
        """At the prefill: forget the layer's statistics; keep the last queries' attention as the prior."""
        self._stats.pop(idx, None)
        self._pending.pop(idx, None)
        cache = kwargs["past_key_values"]
        self._priors.pop(cache, idx)
        if self.policy not in ("adaptive", "h2o") or not self.prior_window or adapter is None or adapter.is_sliding:
            return  # lru and streaming do not read a prior
        keys = cache.layers[idx].keys
        window = min(self.prior_window, hidden_states.shape[1])
        if keys.shape[2] != hidden_states.shape[1]:
            return  # another press already cut this layer: its tokens no longer match the prefill's
        probs = window_probs(module, hidden_states, dense(keys), window, kwargs["position_embeddings"])
        self._priors.put(cache, idx, probs.mean(dim=2))

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        q_len = hidden_states.shape[1]
        idx = int(module.layer_idx)
        adapter, sliding = self._adapters.get(idx) or self._adapters.setdefault(idx, _adapter_of(module))
        cache = kwargs["past_key_values"]
        check_cache(cache, type(self).__name__, layer_idx=None if idx == 0 else idx)
        layer = cache.layers[idx]
        keys = layer.keys
        # a one-token step on a cache holding more than it is a decode step (no device sync to find out)
        if (q_len > 1 or keys.shape[2] <= 1) and is_prefilling(kwargs["cache_position"], q_len):
            self._prefill(module, adapter, hidden_states, kwargs, idx)
            return output
        if sliding:
            return output  # a sliding-window layer is bounded by its window already
        b, h, t, _ = keys.shape
        stats = self._stats.get(idx)
        pending = self._pending.get(idx)
        n_pending = len(pending.queries) if pending is not None else 0
        if stats is None or stats.length + n_pending != t - q_len or stats.rows_heads != (b, h):
            # first decode step: the tokens already cached, in cache order
            self._pending.pop(idx, None)
            pending, n_pending = None, 0
            position = torch.arange(t - q_len, device=keys.device).expand(b, h, t - q_len)
            stats = self._stats[idx] = self._start(module, cache, idx, position)
        # positions of the new tokens: position_ids when the caller passes them (kvpress's pipeline passes
        # those, not cache_position, which then counts the pruned cache), else cache_position
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape[-1] != q_len:
            position_ids = kwargs["cache_position"].view(1, q_len)
        if q_len == 1 and adapter is not None:
            # a plain decode step: keep its query; the steps are scored together when the press needs them
            if pending is None:
                pending = self._pending[idx] = _PendingSteps(layer, adapter.scaling, adapter.sinks)
            pending.queries.append(self._decode_query(module, adapter, hidden_states, kwargs))
            pending.positions.append(position_ids)
            n_pending += 1
        else:
            self._flush(idx)
            stats.append(position_ids.to(keys.device).view(-1, 1, q_len).expand(b, h, q_len))
            queries = adapter.queries(hidden_states, kwargs["position_embeddings"]) * adapter.scaling
            probs = layer_step_probs(layer, queries, t - q_len, adapter.sinks)  # causal among the step's tokens
            stats.observe(probs.mean(dim=2))
        seen = stats.seen + n_pending
        budget = self.layer_budget(seen)
        if t > budget and (stats.since_eviction + n_pending >= self.interval or t >= budget + self.interval):
            self._flush(idx)
            budget = self.layer_budget(stats.seen)
            # the layer keeps the budget's best tokens by the policy (a sharded layer: each shard its share)
            order = priority_order(stats, self.policy, self.sink_tokens, self.recent_window)
            stats.keep(evict(cache, idx, order, budget))
        elif n_pending >= self.interval:
            self._flush(idx)
        return output

    def _decode_query(self, module, adapter, hidden_states, kwargs) -> torch.Tensor:
        """``(B, Hq, 1, D)`` post-RoPE query of this decode step: the one the model's attention just used (handed
        over by the tap), else projected and rotated again."""
        query = self._tap.take(module)
        if query is None or query.shape[2] != 1 or query.shape[0] != hidden_states.shape[0]:
            query = adapter.queries(hidden_states, kwargs["position_embeddings"])
        return query


@dataclass
class _PendingSteps:
    """Decode steps of one layer not yet recorded in its statistics: each step's query (scaled by ``scaling``
    when they are recorded) and position ids."""

    layer: object
    scaling: float
    sinks: torch.Tensor | None
    queries: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)


def _adapter_of(module: nn.Module) -> tuple:
    """``(adapter or None, is a sliding-window layer)`` of an attention module."""
    adapter = layer_adapter(module)
    return adapter, adapter is not None and adapter.is_sliding
