"""ExpertRoutingPress: partition each layer's KV into experts and spend the keep budget where the queries route."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import ExpectedAttentionPress, KeyDiffPress, KnormPress, SnapKVPress, TOVAPress
from kvpress.presses.base_press import is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn
from torch.nn import functional as F

from pikvpress.compat.patches import gather_kept, window_probs, window_queries
from pikvpress.models.adapter import LayerAdapter, get_adapter, layer_adapter
from pikvpress.routing import allocate_budget, gate_routing, spherical_kmeans
from pikvpress.routing.learned import LearnedRouter, load_router, shipped_router_path
from pikvpress.routing.shards import ROUTED_EXPERTS
from pikvpress.scheduling.prior import PREFILL_SCORES

logger = logging.getLogger(__name__)

ROUTERS = ("auto", "gate", "keys", "learned")
#: kvpress scorers usable by name (``scorer="keydiff"``), e.g. from the harness's YAML
KVPRESS_SCORERS: dict[str, type[ScorerPress]] = {
    "expected_attention": ExpectedAttentionPress,
    "keydiff": KeyDiffPress,
    "knorm": KnormPress,
    "snapkv": SnapKVPress,
    "tova": TOVAPress,
}
SCORERS = ("attention", "learned", *KVPRESS_SCORERS)
LAYER_BUDGETS = ("auto", "uniform", "learned")
HEAD_BUDGETS = ("uniform", "adaptive")


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


@dataclass(frozen=True)
class _Selection:
    """One layer's choice: ``(B, H, T)`` token scores, protected mask ``(T,)``, tokens by descending score,
    chosen mask, ``(B, H)`` tokens each head keeps, the number of experts and ``(B, H, T)`` each token's expert."""

    token_scores: torch.Tensor
    protected: torch.Tensor
    by_score: torch.Tensor
    chosen: torch.Tensor
    head_kept: torch.Tensor
    experts: int
    assignment: torch.Tensor


@dataclass
class ExpertRoutingPress(ScorerPress):
    """Route each layer's KV to experts; give each expert a keep budget from the query mass routed to it.

    For every full-attention layer and KV head, the context tokens are partitioned into "KV experts"
    by ``router``; the observation window (the last ``window_size`` context tokens, which is the
    question when the question is compressed with the context) is routed to its ``top_k`` experts.
    The per-head keep budget (``compute_n_kept(T, compression_ratio)``, minus the protected sink
    and recent tokens) is split across experts in proportion to the routed query mass, with a floor
    of ``expert_floor`` tokens for every populated expert and a cap at each expert's size
    (:func:`~pikvpress.routing.allocate_budget`). Inside an expert, tokens are ranked by ``scorer``.

    Routers:

    - ``"gate"``: the model's own MoE gate of that layer (top-1 expert of each token; the window
      routed by its gate probabilities). Layers without a MoE router (dense models, dense layers of
      MoE models) fall back to ``"keys"``. Reads the decoder layer's input, so the press hooks the
      decoder layers too.
    - ``"keys"``: per KV head, a deterministic spherical k-means of the layer's keys into
      ``num_experts`` centroids; each window query routes to the ``top_k`` experts holding most of
      its attention: measured when the scorer computes the window's attention (``scorer="attention"``),
      otherwise estimated from its mean logit to each expert's keys (softmax over experts of
      ``q . mean key``), which needs no pass over the context per query.
    - ``"learned"``: key experts as above, with the query mass predicted by the trained router
      (:class:`~pikvpress.routing.LearnedRouter`: the attention each token will receive when the model
      re-reads its context, KVzip's signal) instead of measured from the window; with
      ``num_experts=1`` it is a plain learned scorer.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the context removed, in [0, 1).
    router : {"gate", "keys", "learned"}
        How tokens and queries are routed to experts.
    num_experts : int
        KV experts per head for the ``"keys"`` / ``"learned"`` routers (the ``"gate"`` router uses the
        model's experts). Clamped to the number of routable tokens.
    top_k : int
        Experts each window query routes to (at most ``num_experts``).
    window_size : int
        Observation window; clamped (with a warning) when the context is not longer than it.
    scorer : str or ScorerPress, optional
        Ranking inside an expert: ``"attention"`` (the window queries' attention, SnapKV's signal),
        ``"learned"`` (the learned predictor), a kvpress scorer by name (``"keydiff"``, ``"knorm"``,
        ``"expected_attention"``, ``"snapkv"``, ``"tova"``) or any kvpress ``ScorerPress`` instance.
        Default: ``"learned"`` for the learned router, ``"keydiff"`` otherwise.
    expert_floor : int
        Tokens every populated expert keeps (while the budget allows).
    n_sink : int
        First context tokens always kept (attention sinks).
    n_recent : int
        Last context tokens always kept: the question when it is compressed with the context (query-aware
        use), which the learned router, trained on contexts alone, otherwise ranks low. 32 covers RULER's
        questions in the default model's chat template.
    kernel_size : int
        Width of the average pooling applied to attention scores (neighbours of a hit are kept
        together, as in SnapKV); 1 disables it.
    span : int
        Learned scores only: each token scores the maximum prediction within ``span`` tokens centred
        on it, so the neighbours of a predicted hit (the other tokens of a number or a word) are kept
        with it. 1 disables it; an odd number.
    kmeans_iterations : int
        Rounds of spherical k-means.
    router_weights : str, optional
        Learned router weights (a file written by ``scripts/train_router.py``, or a directory of them);
        default: the weights shipped for the model.
    layer_budget : {"auto", "uniform", "learned"}
        ``"uniform"``: every layer keeps ``compute_n_kept(T, compression_ratio)`` tokens per head.
        ``"learned"``: the same total, split across layers the way KVzip's global budget splits it
        on the router's training data (stored with the learned router weights). ``"auto"``: learned
        when the press uses a learned router whose weights carry that table, else uniform.
    head_budget : {"uniform", "adaptive"}
        ``"uniform"``: every KV head of a layer keeps the same number of tokens, and the cache shrinks by
        exactly that. ``"adaptive"``: the layer's budget (heads x tokens per head) goes to the highest
        token scores across its heads (AdaKV's and KVzip's head-wise split; each head keeps at least
        ``head_floor`` of the per-head budget and its protected tokens), then the experts split each
        head's share. A layer's cache is as long as its largest head's share (a cache holds the same
        length for every head), and heads with a smaller share fill that length with their next-best
        tokens: nothing is masked, and the bytes kept are those of the largest share, more than the
        ratio says (read them from the cache).
    head_floor : float
        ``head_budget="adaptive"`` only: fraction of the per-head budget every head keeps, in [0, 1].

    Examples
    --------
    >>> press = ExpertRoutingPress(compression_ratio=0.5, router="learned")
    >>> with press(model):
    ...     model(context_ids, past_key_values=cache)
    >>> press.stats[3].kept            # tokens kept per expert at layer 3
    """

    compression_ratio: float = 0.0
    router: str = "auto"
    num_experts: int = 8
    top_k: int = 2
    window_size: int = 64
    scorer: Any = None
    expert_floor: int = 1
    n_sink: int = 4
    n_recent: int = 32
    kernel_size: int = 5
    span: int = 1
    kmeans_iterations: int = 4
    router_weights: str | None = None
    layer_budget: str = "auto"
    head_budget: str = "uniform"
    head_floor: float = 0.2
    stats: dict[int, RoutingStats] = field(default_factory=dict, init=False, repr=False)

    #: the context manager only adds clean-up around kvpress's hooks, so a captured prefill can be replayed
    replays_with_hooks = True

    def __post_init__(self) -> None:
        if not isinstance(self.compression_ratio, (int, float)) or not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        for name in ("num_experts", "top_k", "window_size", "kernel_size", "span"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("expert_floor", "n_sink", "n_recent", "kmeans_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.span % 2 == 0:
            raise ValueError(f"span must be odd, got {self.span}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if not (
            self.scorer is None
            or (self.scorer in SCORERS if isinstance(self.scorer, str) else isinstance(self.scorer, ScorerPress))
        ):
            raise ValueError(f"scorer must be one of {SCORERS} or a kvpress ScorerPress, got {self.scorer!r}")
        if self.head_budget not in HEAD_BUDGETS:
            raise ValueError(f"head_budget must be one of {HEAD_BUDGETS}, got {self.head_budget!r}")
        if (
            isinstance(self.head_floor, bool)
            or not isinstance(self.head_floor, (int, float))
            or not (0 <= self.head_floor <= 1)
        ):
            raise ValueError(f"head_floor must be in [0, 1], got {self.head_floor!r}")
        if self.layer_budget not in LAYER_BUDGETS:
            raise ValueError(f"layer_budget must be one of {LAYER_BUDGETS}, got {self.layer_budget!r}")
        self._resolve(None if self.router == "auto" else self.router)
        if self.router != "auto":
            self._check_layer_budget()
        self._budgets: dict[int, dict[int, int]] = {}
        self._learned: LearnedRouter | None = None
        self._learned_model: nn.Module | None = None
        self._adapters: dict[int, LayerAdapter] = {}
        self._layer_inputs: dict[int, torch.Tensor] = {}
        self._attention_outputs: dict[int, torch.Tensor] = {}
        self._warned: set[str] = set()
        self._input_hooks: list = []
        self._last_moe_layer = -1

    def stats_frame(self):
        """The last prefill's routing statistics as a pandas DataFrame, one row per pressed layer."""
        import pandas as pd

        return pd.DataFrame([{"layer": idx, **stats.summary()} for idx, stats in sorted(self.stats.items())])

    def _resolve(self, router: str | None) -> None:
        """Fix the router and scorer that run (``router="auto"`` is resolved once the model is known)."""
        self._router = router
        scorer = self.scorer if self.scorer is not None else ("learned" if router == "learned" else "keydiff")
        self._scorer = scorer
        if isinstance(scorer, ScorerPress):
            self._base_scorer = scorer
        else:
            self._base_scorer = KVPRESS_SCORERS[scorer]() if scorer in KVPRESS_SCORERS else None

    def _check_layer_budget(self) -> None:
        if self.layer_budget == "learned" and not self.uses_learned_router:
            raise ValueError("layer_budget='learned' needs the learned router (router='learned' or scorer='learned')")

    # ----------------------------------------------------------------------------------------------
    @property
    def uses_learned_router(self) -> bool:
        return self._router == "learned" or self._scorer == "learned"

    @property
    def reads_decoder_inputs(self) -> bool:
        """Whether the press hooks decoder layers (the gate router needs the MoE gate's input; ``"auto"``
        may resolve to it)."""
        return self.router in ("gate", "auto") and self._router in ("gate", None)

    def post_init_from_model(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        if self.router == "auto":
            has_weights = self.router_weights is not None or shipped_router_path(model) is not None
            self._resolve("learned" if has_weights else "gate")
        self._check_layer_budget()
        self._adapters = {layer.layer_idx: layer for layer in adapter.layers}
        if self.uses_learned_router and (self._learned is None or self._learned_model is not model):
            self._learned = load_router(model, self.router_weights)
            self._learned_model = model
        if self._base_scorer is not None:
            self._base_scorer.post_init_from_model(model)
        self._pressed_layers = [layer.layer_idx for layer in adapter.layers if not layer.is_sliding]
        self._budgets = {}
        self.stats = {}
        if self.reads_decoder_inputs:
            self._install_input_hooks(adapter)

    def _install_input_hooks(self, adapter) -> None:
        """Record each MoE layer's input (the residual stream) until this prefill's last MoE layer is pressed.

        Installed here rather than in ``__call__`` so that wrappers (ComposedPress, AdaKVPress...) that
        call ``post_init_from_model`` but not this press's context manager still feed the gate.
        """
        self._remove_input_hooks()
        moe = [layer for layer in adapter.layers if layer.router is not None and not layer.is_sliding]
        for layer in moe:
            self._input_hooks.append(
                layer.decoder_layer.register_forward_pre_hook(self._record_layer_input, with_kwargs=True)
            )
        self._last_moe_layer = moe[-1].layer_idx if moe else -1

    def _remove_input_hooks(self) -> None:
        for hook in self._input_hooks:
            hook.remove()
        self._input_hooks.clear()
        self._layer_inputs.clear()
        self._attention_outputs.clear()

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        try:
            with super().__call__(model):
                yield
        finally:
            self._remove_input_hooks()

    def _record_layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._layer_inputs[int(module.self_attn.layer_idx)] = hidden

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        idx = int(module.layer_idx)
        if self.reads_decoder_inputs:
            self._attention_outputs[idx] = output[0]
        try:
            return super().forward_hook(module, input, kwargs, output)
        finally:
            self._attention_outputs.pop(idx, None)
            self._layer_inputs.pop(idx, None)
            if idx == self._last_moe_layer and is_prefilling(
                kwargs["cache_position"], kwargs["hidden_states"].shape[1]
            ):
                self._remove_input_hooks()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ----------------------------------------------------------------------------------------------
    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        return self._scores(self._select(module, hidden_states, keys, values, attentions, kwargs))

    @staticmethod
    def _scores(selection: _Selection) -> torch.Tensor:
        """``(B, H, T)`` scores: the chosen tokens above the others, each group ordered by token score."""
        b, h, t = selection.token_scores.shape
        device = selection.token_scores.device
        if selection.experts == 1:  # one expert: the token scores themselves (so AdaKVPress can compare heads)
            top = selection.token_scores.amax().item() + 1.0
            return selection.token_scores.masked_fill(selection.protected, top)
        # chosen tokens above every other token; the token score orders each group
        positions = torch.arange(t - 1, -1, -1, device=device, dtype=torch.float).expand(b, h, t)
        ranked = torch.zeros(b, h, t, device=device).scatter_(-1, selection.by_score, positions) / max(t, 1)
        return selection.chosen.float() * 2.0 + ranked

    def _select(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> _Selection:
        """Route, split the budget and choose the kept tokens of one layer (records ``stats``)."""
        b, h, t, _ = keys.shape
        idx = int(module.layer_idx)
        adapter = self._adapters.get(idx) or layer_adapter(module)
        n_kept = self.layer_kept(idx, t)
        needs_window = self._scorer == "attention"  # the window's attention over the context, as SnapKV
        window = self._window(t) if needs_window or self._router != "learned" else 0

        # protected tokens: sinks first, then the most recent ones; the routable tokens lie between them
        n_sink = min(self.n_sink, n_kept)
        n_recent = min(self.n_recent, n_kept - n_sink, t - n_sink)
        protected = torch.zeros(t, dtype=torch.bool, device=keys.device)
        protected[:n_sink] = True
        if n_recent:
            protected[t - n_recent :] = True
        n_protected = n_sink + n_recent
        span = slice(n_sink, t - n_recent)

        # unit keys, shared by the k-means and KeyDiff (the gate router computes them when it falls back)
        unit = F.normalize(keys.float(), dim=-1) if self._scorer == "keydiff" or self._router != "gate" else None

        # token scores (ranking inside an expert) and the window's attention when needed
        attention = None
        if needs_window:
            # (B, H, groups * w, T): the window queries over every context token, causal
            attention = window_probs(module, hidden_states, keys, window, kwargs["position_embeddings"])
        token_scores = self._token_scores(
            module, hidden_states, keys, values, attentions, kwargs, attention, window, unit
        )

        # tokens each head keeps: n_kept, or the heads' share of the layer's budget by score
        head_kept = self._split_heads(token_scores, protected, n_kept, n_protected)

        # experts, their sizes and the query mass routed to them
        assignment, sizes, mass, router_used = self._route(
            adapter, idx, hidden_states, keys, unit, attention, token_scores, span, window, kwargs
        )
        e = mass.shape[-1]
        kept = allocate_budget(mass, sizes, head_kept - n_protected, floor=self.expert_floor)

        # rank tokens inside their expert (protected tokens form bucket e, kept whole)
        bucket = torch.where(protected, torch.full_like(assignment, e), assignment)
        quota = torch.cat([kept, torch.full((b, h, 1), n_protected, dtype=torch.long, device=keys.device)], dim=-1)
        by_score = torch.argsort(token_scores, dim=-1, descending=True, stable=True)
        order = torch.gather(by_score, -1, torch.argsort(torch.gather(bucket, -1, by_score), dim=-1, stable=True))
        sorted_bucket = torch.gather(bucket, -1, order)
        bucket_sizes = torch.cat([sizes, torch.full_like(kept[..., :1], n_protected)], dim=-1)
        starts = torch.cumsum(bucket_sizes, dim=-1) - bucket_sizes
        rank = torch.arange(t, device=keys.device).expand(b, h, t) - torch.gather(starts, -1, sorted_bucket)
        chosen_sorted = rank < torch.gather(quota, -1, sorted_bucket)
        chosen = torch.zeros_like(chosen_sorted).scatter_(-1, order, chosen_sorted)

        self.stats[idx] = RoutingStats(
            router_used,
            sizes.cpu(),
            (mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)).cpu(),
            kept.cpu(),
            n_protected,
        )
        return _Selection(token_scores, protected, by_score, chosen, head_kept, e, assignment)

    # ----------------------------------------------------------------------------------------------
    @property
    def uses_layer_budget(self) -> bool:
        if self.layer_budget == "uniform" or self._learned is None:
            return False
        return self.layer_budget == "learned" or self._learned.has_layer_budget

    def layer_kept(self, layer_idx: int, t: int) -> int:
        """Tokens per head layer ``layer_idx`` keeps out of ``t`` (uniform, or the learned per-layer split).

        The learned split keeps the total over the pressed layers equal to the uniform total, gives each
        layer at least its ``n_sink`` sink tokens (at least one token), and at most ``t``.
        """
        uniform = compute_n_kept(t, self.compression_ratio)
        if not self.uses_layer_budget or layer_idx not in getattr(self, "_pressed_layers", ()):
            return uniform
        if t not in self._budgets:
            layers = self._pressed_layers
            weights = self._learned.layer_weights(self.compression_ratio)[layers]
            sizes = torch.full((len(layers),), t, dtype=torch.long)
            floor = min(uniform, max(1, self.n_sink))
            kept = allocate_budget(weights, sizes, uniform * len(layers), floor=floor)
            self._budgets[t] = dict(zip(layers, kept.tolist()))
        return self._budgets[t][layer_idx]

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        selection = self._select(module, hidden_states, keys, values, attentions, kwargs)
        b, h, _ = selection.chosen.shape
        n_cut = int(selection.head_kept.max())
        if selection.experts > 1 and int(selection.head_kept.min()) == n_cut:
            # every head chose exactly n_cut tokens: keep them, in context order
            indices = selection.chosen.nonzero()[:, -1].view(b, h, n_cut)
        else:
            # the chosen tokens score above the others; the layer keeps the largest head's share, and heads
            # with a smaller share fill the same length with their next-best tokens (nothing is masked)
            indices = self._scores(selection).topk(n_cut, dim=-1).indices
        # the kept tokens' scores, for a decode-time press that starts from them (AdaptiveSchedulingPress)
        cache_id = id(kwargs.get("past_key_values"))
        kept_scores = selection.token_scores.gather(-1, indices)
        setattr(module, PREFILL_SCORES, (cache_id, kept_scores))
        # the kept tokens' experts (-1: sink and recent tokens), for a sharded cache that places tokens by expert
        experts = selection.assignment.masked_fill(selection.protected, -1).gather(-1, indices)
        setattr(module, ROUTED_EXPERTS, (cache_id, experts, selection.experts))
        return gather_kept(keys, values, indices)

    def _split_heads(self, token_scores: torch.Tensor, protected: torch.Tensor, n_kept: int, n_protected: int):
        """``(B, H)`` int64 tokens each head keeps: ``n_kept`` everywhere, or (``head_budget="adaptive"``) the
        heads' shares of the layer's ``H * n_kept`` by a top-k of the token scores across heads."""
        b, h, t = token_scores.shape
        uniform = torch.full((b, h), n_kept, dtype=torch.long, device=token_scores.device)
        if self.head_budget == "uniform" or h == 1 or n_kept in (0, t):
            return uniform
        # every head keeps its protected tokens and the best head_floor of its budget
        n_safe = min(max(n_protected, int(n_kept * self.head_floor)), n_kept)
        scores = token_scores.float().masked_fill(protected, float("inf"))
        if n_safe > n_protected:
            top = scores.topk(n_safe, dim=-1).indices
            scores = scores.scatter(-1, top, float("inf"))
        chosen = scores.reshape(b, h * t).topk(h * n_kept, dim=-1).indices // t  # head of each kept token
        return torch.zeros_like(uniform).scatter_add_(1, chosen, torch.ones_like(chosen))

    def _window(self, t: int) -> int:
        window = self.window_size
        if window >= t:
            window = max(1, t - 1)
            self._warn_once(
                "window",
                "ExpertRoutingPress: window_size=%d is not shorter than the %d-token context; using %d",
                self.window_size,
                t,
                window,
            )
        return window

    def _token_scores(
        self, module, hidden_states, keys, values, attentions, kwargs, attention, window, unit=None
    ) -> torch.Tensor:
        """``(B, H, T)`` ranking of the tokens inside an expert."""
        if self._scorer == "keydiff" and unit is not None:
            # KeyDiffPress's score (minus the cosine to the mean unit key) from the unit keys already at hand
            anchor = unit.mean(dim=2, keepdim=True)  # (B, H, 1, D)
            similarity = torch.matmul(unit, anchor.transpose(-1, -2)).squeeze(-1)
            return -similarity / anchor.norm(dim=-1).clamp_min(1e-8)
        if self._base_scorer is not None:
            return self._base_scorer.score(module, hidden_states, keys, values, attentions, kwargs).float()
        if self._scorer == "learned":
            assert self._learned is not None
            scores = self._learned.predict(int(module.layer_idx), hidden_states).float()
            if self.span > 1:
                b, h, t = scores.shape
                pooled = F.max_pool1d(scores.reshape(b * h, 1, t), self.span, stride=1, padding=self.span // 2)
                scores = pooled.reshape(b, h, t)
            return scores
        # mean attention over the window queries that can see each token (window tokens are seen by fewer)
        t = keys.shape[2]
        rows = attention.shape[2]
        seen = torch.full((t,), float(window), device=keys.device)
        seen[t - window :] = torch.arange(window, 0, -1, device=keys.device, dtype=torch.float)
        scores = attention.sum(dim=2) / (seen * (rows // window))
        if self.kernel_size > 1:
            scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        return scores[..., :t]

    def _route(self, adapter, idx, hidden_states, keys, unit, attention, token_scores, span, window, kwargs):
        """``(assignment (B, H, T), sizes (B, H, E), mass (B, H, E), router used)``; ``sizes`` count the
        routable tokens (``span``, between the sinks and the recent tokens) of each expert."""
        b, h, t, _ = keys.shape
        if self._router == "gate":
            routing = self._gate(adapter, idx, hidden_states)
            if routing is not None:
                probs = routing.probs.float()  # (B, T, E)
                assignment = probs.argmax(-1)[:, None, :].expand(b, h, t).contiguous()
                sizes = torch.zeros(b, h, probs.shape[-1], dtype=torch.long, device=keys.device)
                sizes.scatter_add_(2, assignment[..., span], torch.ones_like(assignment[..., span]))
                query = probs[:, t - window :]  # (B, w, E)
                k = min(self.top_k, probs.shape[-1])
                top = query.topk(k, dim=-1)
                routed = torch.zeros_like(query).scatter_(-1, top.indices, top.values)
                routed = routed / routed.sum(-1, keepdim=True).clamp_min(1e-12)
                mass = routed.sum(1)[:, None, :].expand(b, h, -1).contiguous()
                return assignment, sizes, mass, "gate"
        if unit is None:
            unit = F.normalize(keys.float(), dim=-1)
        n_routable = span.stop - span.start
        experts = max(1, min(self.num_experts, n_routable))
        clusters = spherical_kmeans(unit[:, :, span], experts, self.kmeans_iterations, normalized=True)
        sizes = clusters.sizes
        assignment = torch.zeros(b, h, t, dtype=torch.long, device=keys.device)
        assignment[:, :, span] = clusters.assignment
        if self._router == "learned":  # predicted attention mass of each expert's tokens
            weight = torch.softmax(token_scores[..., span].float(), dim=-1)
            mass = torch.zeros(b, h, experts, device=keys.device).scatter_add_(2, clusters.assignment, weight)
            return assignment, sizes, mass, "learned"
        # keys: each window query routes to the top_k experts holding most of its attention
        member = (clusters.assignment.unsqueeze(-2) == torch.arange(experts, device=keys.device)[:, None]).float()
        if attention is not None:  # measured: the window's attention summed over each expert's tokens
            per_query = torch.matmul(attention[..., span], member.transpose(-1, -2))  # (B, H, w*g, E)
        else:  # estimated: softmax over experts of q . (the expert's mean key), q's mean logit to the expert
            per_query = self._centroid_affinity(adapter, hidden_states, keys[:, :, span], member, sizes, window, kwargs)
        k = min(self.top_k, experts)
        top = per_query.topk(k, dim=-1)
        routed = torch.zeros_like(per_query).scatter_(-1, top.indices, top.values)
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(1e-12)
        return assignment, sizes, routed.sum(2), "keys" if self._router == "keys" else "keys (no MoE gate)"

    @staticmethod
    def _centroid_affinity(adapter, hidden_states, keys, member, sizes, window, kwargs) -> torch.Tensor:
        """``(B, H, groups * w, E)`` routing probabilities of the window queries from their mean logit to the
        keys of each expert (``member`` ``(B, H, E, T)`` marks them; empty experts get none); no pass over
        the context's tokens per query."""
        queries = window_queries(adapter, hidden_states, keys.shape[1], window, kwargs["position_embeddings"])
        queries = queries.float() * adapter.scaling  # (B, H, g*w, D)
        means = torch.matmul(member, keys.float()) / sizes.unsqueeze(-1).clamp_min(1)  # (B, H, E, D)
        logits = torch.matmul(queries, means.transpose(-1, -2))  # (B, H, g*w, E)
        logits = logits.masked_fill(sizes[:, :, None, :] == 0, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def _gate(self, adapter: LayerAdapter, idx: int, hidden_states: torch.Tensor):
        layer_input = self._layer_inputs.get(idx)
        attention_output = self._attention_outputs.get(idx)
        if adapter.router is None:
            return None
        if (
            layer_input is None
            or attention_output is None
            or layer_input.shape[:2] != hidden_states.shape[:2]
            or attention_output.shape[:2] != hidden_states.shape[:2]
        ):
            self._warn_once(
                "gate-input",
                "ExpertRoutingPress(router='gate'): the MoE gate's input was not seen for layer %d "
                "(press used outside a full prefill); routing by keys",
                idx,
            )
            return None
        return gate_routing(adapter, layer_input, attention_output)
