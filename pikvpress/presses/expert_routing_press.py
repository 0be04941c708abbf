"""ExpertRoutingPress: partition each layer's KV into experts and spend the keep budget where the queries route."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import ExpectedAttentionPress, KeyDiffPress, KnormPress, SnapKVPress, TOVAPress
from kvpress.presses.base_press import is_prefilling
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn
from torch.nn import functional as F

from pikvpress.cache.ops import gather_kept
from pikvpress.cache.support import check_cache
from pikvpress.models.adapter import LayerAdapter, get_adapter, layer_adapter
from pikvpress.presses.arguments import check_choice, check_int, check_number
from pikvpress.presses.lifecycle import FinishesOnExit
from pikvpress.routing import allocate_budget
from pikvpress.routing.experts import (
    ExpertRouting,
    attention_mass,
    centroid_mass,
    key_experts,
    predicted_mass,
    route_by_gate,
)
from pikvpress.routing.gate import GateInputs
from pikvpress.routing.learned import LearnedRouter, load_router, shipped_router_path
from pikvpress.routing.selection import (
    choose_in_experts,
    head_budgets,
    kept_indices,
    protected_tokens,
    selection_scores,
)
from pikvpress.routing.stats import RoutingStats
from pikvpress.routing.token_scores import keydiff_scores, span_max, window_scores
from pikvpress.scheduling.attention import window_probs, window_queries
from pikvpress.scheduling.prior import PerCache

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
HEAD_BUDGETS = ("uniform", "adaptive", "adaptive_masked")


@dataclass(frozen=True)
class RoutedTokens:
    """What the press kept at one layer of one cache, for the presses composed with it.

    Parameters
    ----------
    scores : torch.Tensor
        ``(B, H, n)`` float32 token scores of the kept tokens, in cache order (the scheduler's prior).
    experts : torch.Tensor
        ``(B, H, n)`` int64 expert of each kept token; -1 for the sink and recent tokens.
    num_experts : int
        Experts the layer was routed to.
    """

    scores: torch.Tensor
    experts: torch.Tensor
    num_experts: int


@dataclass(frozen=True)
class _Selection:
    """One layer's choice: ``(B, H, T)`` token scores, the protected mask ``(T,)``, the chosen mask, ``(B, H)`` tokens
    each head keeps, the routing, and the scores whose top-k is the choice."""

    token_scores: torch.Tensor
    protected: torch.Tensor
    chosen: torch.Tensor
    head_kept: torch.Tensor
    routing: ExpertRouting
    scores: torch.Tensor


@dataclass
class ExpertRoutingPress(FinishesOnExit, ScorerPress):
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
    head_budget : {"uniform", "adaptive", "adaptive_masked"}
        ``"uniform"``: every KV head of a layer keeps the same number of tokens, and the cache shrinks by
        exactly that. ``"adaptive"``: the layer's budget (heads x tokens per head) goes to the highest
        token scores across its heads (AdaKV's and KVzip's head-wise split; each head keeps at least
        ``head_floor`` of the per-head budget and its protected tokens), then the experts split each
        head's share. A layer's cache is as long as its largest head's share (a cache holds the same
        length for every head), and heads with a smaller share fill that length with their next-best
        tokens: nothing is masked, and the bytes kept are those of the largest share, more than the
        ratio says (read them from the cache). ``"adaptive_masked"``: the same shares, each head keeping exactly its
        own: the cache keeps every token and the others are masked, head by head, as kvpress's ``AdaKVPress`` does
        (``module.masked_key_indices``, no memory freed); ``RaggedPress(ExpertRoutingPress(...,
        head_budget="adaptive_masked"))`` holds each head's share and nothing else. Not for ``PiKVPress``.
    head_floor : float
        ``head_budget="adaptive"`` / ``"adaptive_masked"`` only: fraction of the per-head budget every head keeps, in
        [0, 1].

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
        check_number("compression_ratio", self.compression_ratio, 0, 1)
        check_choice("router", self.router, ROUTERS)
        for name in ("num_experts", "top_k", "window_size", "kernel_size", "span"):
            check_int(name, getattr(self, name), 1)
        for name in ("expert_floor", "n_sink", "n_recent", "kmeans_iterations"):
            check_int(name, getattr(self, name), 0)
        if self.span % 2 == 0:
            raise ValueError(f"span must be odd, got {self.span}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if not (
            self.scorer is None
            or (self.scorer in SCORERS if isinstance(self.scorer, str) else isinstance(self.scorer, ScorerPress))
        ):
            raise ValueError(f"scorer must be one of {SCORERS} or a kvpress ScorerPress, got {self.scorer!r}")
        check_choice("head_budget", self.head_budget, HEAD_BUDGETS)
        check_number("head_floor", self.head_floor, 0, 1, high_open=False)
        check_choice("layer_budget", self.layer_budget, LAYER_BUDGETS)
        self._resolve(None if self.router == "auto" else self.router)
        if self.router != "auto":
            self._check_layer_budget()
        self._budgets: dict[int, dict[int, int]] = {}
        self._learned: LearnedRouter | None = None
        self._learned_model: nn.Module | None = None
        self._adapters: dict[int, LayerAdapter] = {}
        self._gate_inputs = GateInputs()
        self._warned: set[str] = set()
        self._routed = PerCache()

    # --- what the press tells the presses composed with it ----------------------------------------
    def kept_scores(self, cache: Any, layer_idx: int) -> torch.Tensor | None:
        """``(B, H, n)`` scores of the tokens this press kept in layer ``layer_idx`` of ``cache`` (None if it did not
        compress that layer of that cache). A scheduler composed with this press starts from them:
        ``AdaptiveSchedulingPress(prior_from=press)``."""
        routed = self._routed.get(cache, layer_idx)
        return None if routed is None else routed.scores

    def routed_tokens(self, cache: Any, layer_idx: int) -> RoutedTokens | None:
        """What this press kept in layer ``layer_idx`` of ``cache``: scores and experts of the kept tokens.

        The hand-off lives as long as ``cache`` (weakly keyed by it): it never keeps the cache alive and never
        reaches another cache, so it survives kvpress's pipeline, which prefills and decodes in two press contexts.
        """
        return self._routed.get(cache, layer_idx)

    def stats_frame(self):
        """The last prefill's routing statistics as a pandas DataFrame, one row per pressed layer."""
        import pandas as pd

        return pd.DataFrame([{"layer": idx, **stats.summary()} for idx, stats in sorted(self.stats.items())])

    # --- set-up -----------------------------------------------------------------------------------
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
            # installed here rather than in __call__ so that wrappers (ComposedPress, AdaKVPress...) that call
            # post_init_from_model but not this press's context manager still feed the gate
            self._gate_inputs.install(adapter.layers)

    def finish(self) -> None:
        """End of the press's context: the gate's input hooks and the tensors they recorded go."""
        self._gate_inputs.remove()

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        idx = int(module.layer_idx)
        prefilling = is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1])
        if prefilling:
            check_cache(kwargs["past_key_values"], type(self).__name__)
        if self.reads_decoder_inputs:
            self._gate_inputs.attention_output(idx, output[0])
        try:
            return super().forward_hook(module, input, kwargs, output)
        finally:
            self._gate_inputs.forget(idx)
            if idx == self._gate_inputs.last_layer and prefilling:
                self._gate_inputs.remove()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # --- the press's formula ----------------------------------------------------------------------
    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        return self._select(module, hidden_states, keys, values, attentions, kwargs).scores

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = int(module.layer_idx)
        if self.compression_ratio == 0 or self.layer_kept(idx, keys.shape[2]) >= keys.shape[2]:
            return keys, values  # nothing to remove (a context as short as the budget): keep what there is
        selection = self._select(module, hidden_states, keys, values, attentions, kwargs)
        if self.head_budget == "adaptive_masked":  # kvpress's head-wise protocol: every token stays, the rest masked
            module.masked_key_indices = (~selection.chosen).nonzero(as_tuple=True)
            return keys, values
        indices = kept_indices(selection.chosen, selection.head_kept, selection.scores, selection.routing.num_experts)
        # what was kept, for the presses composed with this one (a scheduler's prior, a sharded cache's placement)
        experts = selection.routing.assignment.masked_fill(selection.protected, -1).gather(-1, indices)
        scores = selection.token_scores.gather(-1, indices).float()
        kept = RoutedTokens(scores, experts, selection.routing.num_experts)
        self._routed.put(kwargs.get("past_key_values"), idx, kept)
        return gather_kept(keys, values, indices)

    def _select(self, module, hidden_states, keys, values, attentions, kwargs) -> _Selection:
        """Route, split the budget and choose the kept tokens of one layer (records ``stats``)."""
        t = keys.shape[2]
        idx = int(module.layer_idx)
        adapter = self._adapters.get(idx) or layer_adapter(module)
        n_kept = self.layer_kept(idx, t)
        needs_window = self._scorer == "attention"  # the window's attention over the context, as SnapKV
        window = self._window(t) if needs_window or self._router != "learned" else 0

        # protected tokens: sinks first, then the most recent ones; the routable tokens lie between them
        n_sink = min(self.n_sink, n_kept)
        n_recent = min(self.n_recent, n_kept - n_sink, t - n_sink)
        protected = protected_tokens(t, n_sink, n_recent, keys.device)
        span = slice(n_sink, t - n_recent)

        # unit keys, shared by the k-means and KeyDiff (the gate router computes them when it falls back)
        unit = F.normalize(keys.float(), dim=-1) if self._scorer == "keydiff" or self._router != "gate" else None
        # (B, H, groups * w, T): the window queries over every context token, causal
        attention = (
            window_probs(module, hidden_states, keys, window, kwargs["position_embeddings"]) if needs_window else None
        )
        token_scores = self._token_scores(
            module, hidden_states, keys, values, attentions, kwargs, attention, window, unit
        )

        # tokens each head keeps, the experts, the query mass routed to them, and each expert's share of the budget
        head_kept = self._head_budgets(token_scores, protected, n_kept, n_sink + n_recent)
        routing = self._route(adapter, hidden_states, keys, unit, attention, token_scores, span, window, kwargs)
        kept = allocate_budget(routing.mass, routing.sizes, head_kept - n_sink - n_recent, floor=self.expert_floor)
        chosen, by_score = choose_in_experts(token_scores, routing.assignment, protected, routing.sizes, kept)

        mass = routing.mass / routing.mass.sum(-1, keepdim=True).clamp_min(1e-12)
        self.stats[idx] = RoutingStats(routing.router, routing.sizes.cpu(), mass.cpu(), kept.cpu(), n_sink + n_recent)
        scores = selection_scores(token_scores, protected, chosen, by_score, routing.num_experts)
        return _Selection(token_scores, protected, chosen, head_kept, routing, scores)

    # --- budgets ----------------------------------------------------------------------------------
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

    def _head_budgets(self, token_scores, protected, n_kept: int, n_protected: int) -> torch.Tensor:
        """``(B, H)`` int64 tokens each head keeps: ``n_kept`` everywhere, or (``head_budget="adaptive"``) the heads'
        shares of the layer's ``H * n_kept`` by the token scores across heads."""
        b, h, t = token_scores.shape
        if self.head_budget == "uniform" or h == 1 or n_kept in (0, t):
            return torch.full((b, h), n_kept, dtype=torch.long, device=token_scores.device)
        return head_budgets(token_scores, protected, n_kept, n_protected, self.head_floor)

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

    # --- ranking inside an expert, and routing ----------------------------------------------------
    def _token_scores(self, module, hidden_states, keys, values, attentions, kwargs, attention, window, unit=None):
        """``(B, H, T)`` ranking of the tokens inside an expert."""
        if self._scorer == "keydiff" and unit is not None:
            return keydiff_scores(unit)  # KeyDiffPress's score, from the unit keys already at hand
        if self._base_scorer is not None:
            return self._base_scorer.score(module, hidden_states, keys, values, attentions, kwargs).float()
        if self._scorer == "learned":
            assert self._learned is not None
            return span_max(self._learned.predict(int(module.layer_idx), hidden_states).float(), self.span)
        return window_scores(attention, window, self.kernel_size)

    def _route(self, adapter, hidden_states, keys, unit, attention, token_scores, span, window, kwargs):
        """The layer's :class:`~pikvpress.routing.experts.ExpertRouting` by the press's router."""
        h = keys.shape[1]
        if self._router == "gate":
            gate = self._gate_inputs.routing(adapter, hidden_states)
            if gate is not None:
                return route_by_gate(gate.probs, h, span, window, self.top_k)
            if adapter.router is not None:
                self._warn_once(
                    "gate-input",
                    "ExpertRoutingPress(router='gate'): the MoE gate's input was not seen for layer %d "
                    "(press used outside a full prefill); routing by keys",
                    adapter.layer_idx,
                )
        if unit is None:
            unit = F.normalize(keys.float(), dim=-1)
        assignment, sizes, member = key_experts(unit, span, self.num_experts, self.kmeans_iterations)
        experts = sizes.shape[-1]
        if self._router == "learned":  # the predicted attention mass of each expert's tokens
            mass = predicted_mass(token_scores[..., span], assignment[..., span], experts)
            return ExpertRouting(assignment, sizes, mass, "learned")
        if attention is not None:  # measured: the window's attention summed over each expert's tokens
            mass = attention_mass(attention[..., span], member, self.top_k)
        else:  # estimated from the window queries' logit to each expert's mean key
            queries = window_queries(adapter, hidden_states, h, window, kwargs["position_embeddings"]) * adapter.scaling
            mass = centroid_mass(queries, keys[:, :, span], member, sizes, self.top_k)
        return ExpertRouting(assignment, sizes, mass, "keys" if self._router == "keys" else "keys (no MoE gate)")
