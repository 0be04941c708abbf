"""Replacements for the kvpress 0.5.5 functions that are wrong or crash on some model families.

Each replacement reads the layer through :mod:`pikvpress.models` adapters and falls back to the
original kvpress function for families pikvpress has no adapter for (Gemma3, ...), so nothing
that worked before changes behaviour there.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Generator

import torch
from kvpress.presses.base_press import BasePress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import compute_n_kept
from kvpress.utils import get_prerope_key_states as _kvpress_key_states
from kvpress.utils import get_prerope_query_states as _kvpress_query_states
from torch import nn
from torch.nn import functional as F

from pikvpress.models import get_adapter, is_supported, language_model, layer_adapter, slice_positions

logger = logging.getLogger(__name__)

ORIGINALS: dict[str, Callable[..., Any]] = {
    "get_prerope_query_states": _kvpress_query_states,
    "get_prerope_key_states": _kvpress_key_states,
    "compute_window_attention": SnapKVPress.__dict__["compute_window_attention"].__func__,
    "apply_avg_rope": ExpectedAttentionPress.apply_avg_rope,
    "scorer_compress": ScorerPress.compress,
    "pyramidkv_compress": PyramidKVPress.compress,
    "press_call": BasePress.__call__,
}


# --- pre-RoPE projections: q/k norms (Qwen3-MoE, OLMoE), MLA (DeepSeek) -------------------------


def get_prerope_query_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """kvpress's pre-RoPE query projection, with the family's q_norm / clipping / MLA applied."""
    adapter = layer_adapter(module)
    if adapter is None:
        return ORIGINALS["get_prerope_query_states"](module, hidden_states)
    return adapter.queries(hidden_states)


def get_prerope_key_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """kvpress's pre-RoPE key projection, with the family's k_norm / clipping / MLA applied."""
    adapter = layer_adapter(module)
    if adapter is None:
        return ORIGINALS["get_prerope_key_states"](module, hidden_states)
    return adapter.keys(hidden_states)


# --- window attention (SnapKV, TOVA, PyramidKV, ...): the model's RoPE, scaling and sinks ---------


def window_queries(
    adapter: Any, hidden_states: torch.Tensor, num_kv_heads: int, window: int, position_embeddings: Any
) -> torch.Tensor:
    """``(B, H_kv, groups * window, D)`` post-RoPE queries of the last ``window`` tokens, grouped by KV head
    (query head ``j`` belongs to KV head ``j // groups``), from the layer's adapter."""
    queries = adapter.queries(hidden_states[:, -window:], slice_positions(position_embeddings, slice(-window, None)))
    return queries.reshape(queries.shape[0], num_kv_heads, -1, queries.shape[-1])


def window_probs(
    module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, window: int, position_embeddings: Any
) -> torch.Tensor:
    """``(B, H_kv, groups * window, T)`` float32 attention probabilities of the last ``window`` queries.

    Computed as the model computes its attention weights: its own rotary function (half-dim cos/sin on
    GPT-OSS, partial and complex RoPE on DeepSeek), its own softmax scale, and its attention sinks in the
    softmax denominator; causal inside the window. Rows are grouped by KV head (query head ``j`` belongs
    to KV head ``j // groups``). ``module`` must be of a family pikvpress has an adapter for.
    """
    adapter = layer_adapter(module)
    b, h, t, _ = keys.shape
    queries = window_queries(adapter, hidden_states, h, window, position_embeddings) * adapter.scaling
    groups = queries.shape[2] // window
    logits = torch.matmul(queries, keys.transpose(2, 3)).float()  # (B, H, g*w, T)
    # causal inside the window: only the last `window` key columns can lie in a query's future
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., t - window :].masked_fill_(future.repeat(groups, 1), float("-inf"))
    sinks = adapter.sinks
    if sinks is not None:
        sink_logits = sinks.float().view(1, h, groups, 1, 1).expand(b, h, groups, window, 1).reshape(b, h, -1, 1)
        return F.softmax(torch.cat([logits, sink_logits], dim=-1), dim=-1)[..., :-1]
    return F.softmax(logits, dim=-1)


def window_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    window_size: int,
    position_embeddings: Any,
) -> torch.Tensor:
    """Attention of the last ``window_size`` queries over the first ``k_len - window_size`` keys.

    Same contract as ``SnapKVPress.compute_window_attention`` (``(B, num_heads, window, k_len - window)``),
    computed as the model computes its attention weights (:func:`window_probs`).
    """
    if layer_adapter(module) is None:
        return ORIGINALS["compute_window_attention"](module, hidden_states, keys, window_size, position_embeddings)
    b, _, k_len, _ = keys.shape
    probs = window_probs(module, hidden_states, keys, window_size, position_embeddings)
    return probs.reshape(b, -1, window_size, k_len).to(hidden_states.dtype)[..., :-window_size]


# --- ExpectedAttention's averaged rotation, for any RoPE layout -----------------------------------


def apply_avg_rope(self, module: nn.Module, mu: torch.Tensor, cov: torch.Tensor, q_len: int):
    """Average the model's own RoPE rotation over the next ``n_future_positions`` and apply it."""
    adapter = layer_adapter(module)
    if adapter is None:
        return ORIGINALS["apply_avg_rope"](self, module, mu, cov, q_len)
    positions = torch.arange(q_len, q_len + self.n_future_positions, device=mu.device)
    rotation = adapter.rope_matrices(positions).mean(dim=0).to(mu.dtype)
    mu = torch.matmul(mu, rotation.T)
    if cov is not None:
        cov = torch.matmul(rotation, torch.matmul(cov, rotation.T))
    return mu, cov


# --- pruning with different key and value head dims (MLA) -----------------------------------------


def gather_kept(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
    """Keep ``indices`` ``(batch, kv_heads, n_kept)`` of keys and values, each with its own head dim."""
    b, h, t, key_dim = keys.shape
    value_dim = values.shape[-1]
    n = indices.shape[-1]
    # rows of the flattened (B*H*T, D) tensors: one index_select copies whole rows (much faster than gather);
    # the head dims are given, not inferred: n = 0 (a layer keeping nothing) or t = 0 leaves no -1 to infer
    rows = (indices + torch.arange(b * h, device=indices.device).view(b, h, 1) * t).reshape(-1)
    keys = keys.reshape(b * h * t, key_dim).index_select(0, rows).view(b, h, n, key_dim)
    values = values.reshape(b * h * t, value_dim).index_select(0, rows).view(b, h, n, value_dim)
    return keys, values


def scorer_compress(self, module, hidden_states, keys, values, attentions, kwargs):
    """``ScorerPress.compress`` that gathers keys and values with their own head dims."""
    if self.compression_ratio == 0:
        return keys, values
    scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
    n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
    return gather_kept(keys, values, scores.topk(n_kept, dim=-1).indices)


def pyramidkv_compress(self, module, hidden_states, keys, values, attentions, kwargs):
    """``PyramidKVPress.compress`` that gathers keys and values with their own head dims."""
    if self.compression_ratio == 0:
        return keys, values
    scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
    n_kept = self.get_layer_budget(module, keys.shape[2])
    return gather_kept(keys, values, scores.topk(n_kept, dim=-1).indices)


# --- hooks: skip sliding-window layers, attach what presses read ----------------------------------


@contextmanager
def press_call(self, model: nn.Module) -> Generator:
    """``BasePress.__call__`` that leaves sliding-window layers alone.

    A sliding-window layer's cache already holds at most ``window - 1`` tokens and its length is
    tracked by the cache layer itself; pruning it desynchronises that length from the mask.
    """
    if not is_supported(model):
        with ORIGINALS["press_call"](self, model):
            yield
        return

    adapter = get_adapter(model)
    self.post_init_from_model(model)
    rotary = language_model(model).rotary_emb
    hooks = []
    skipped = [layer.layer_idx for layer in adapter.layers if layer.is_sliding]
    if skipped:
        logger.info("%s leaves sliding-window layers %s uncompressed", type(self).__name__, skipped)
    try:
        for layer in adapter.layers:
            attention = layer.attention
            attention.rotary_emb = rotary
            if layer.family.mla and not hasattr(attention, "head_dim"):
                attention.head_dim = layer.key_dim  # kvpress reads head_dim; MLA names it qk_head_dim
            if layer.is_sliding:
                continue
            hooks.append(attention.register_forward_hook(self.forward_hook, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()


# --- attention masks for layers of different lengths (PyramidKV, PerLayerCompression) -------------


def align_mask(attention_mask: torch.Tensor | None, key_len: int) -> torch.Tensor | None:
    """Right-align a 4D mask built for another layer's cache length to ``key_len`` keys.

    transformers builds one mask per attention type from the first layer's cache length. When a press
    leaves layers with different lengths, the newest tokens (the right-hand columns) still line up;
    older columns are dropped, or padded as visible.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return attention_mask
    mask_len = attention_mask.shape[-1]
    if mask_len == key_len:
        return attention_mask
    if mask_len > key_len:
        return attention_mask[..., -key_len:]
    fill = True if attention_mask.dtype == torch.bool else 0.0
    return F.pad(attention_mask, (key_len - mask_len, 0), value=fill)


def mask_pruned_keys(
    attention_mask: torch.Tensor | None, masked_key_indices: tuple, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """Fold AdaKV's head-wise pruned keys ``(batch, kv_head, seq)`` into the attention mask, exactly.

    kvpress instead overwrites pruned keys with a "fake key" found by searching for a hyperplane that
    all queries of a group lie behind; no such hyperplane exists once a multi-token question's queries
    span the space, and the search raises.
    """
    bsz, num_heads, q_len, _ = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    batch_idx, head_idx, seq_idx = masked_key_indices
    keep = torch.ones(bsz, num_kv_heads, k_len, dtype=torch.bool, device=key.device)
    keep[batch_idx, head_idx, seq_idx] = False
    keep = keep.repeat_interleave(num_heads // num_kv_heads, dim=1)[:, :, None, :]  # (b, heads, 1, k)
    if attention_mask is None:
        return keep.expand(bsz, num_heads, q_len, k_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep
    return attention_mask.masked_fill(~keep, torch.finfo(attention_mask.dtype).min)


#: attention modules with this attribute set keep their last decode step's queries (at most
#: ``DECODE_QUERY_TOKENS`` of them) in ``module.pikvpress_decode_query``, so a decode-time press reads the
#: queries the model computed instead of projecting and rotating them again
KEEP_DECODE_QUERY = "pikvpress_keep_decode_query"
DECODE_QUERY_TOKENS = 64


def with_aligned_mask(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an attention function so its mask matches the layer's key length and AdaKV's pruned keys (and,
    on modules marked with ``KEEP_DECODE_QUERY``, keeps the decode step's queries)."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if getattr(module, KEEP_DECODE_QUERY, False) and query.shape[2] <= DECODE_QUERY_TOKENS:
            module.pikvpress_decode_query = query  # the step's post-RoPE queries, for AdaptiveSchedulingPress
        attention_mask = align_mask(attention_mask, key.shape[-2])
        masked = getattr(module, "masked_key_indices", None)
        if masked is None or query.shape[2] == key.shape[2]:
            return func(module, query, key, value, attention_mask, *args, **kwargs)
        attention_mask = mask_pruned_keys(attention_mask, masked, query, key)
        module.masked_key_indices = None  # the mask does it; skip kvpress's fake-key search
        try:
            return func(module, query, key, value, attention_mask, *args, **kwargs)
        finally:
            module.masked_key_indices = masked

    attention.__wrapped__ = func  # type: ignore[attr-defined]
    attention._pikvpress_aligned = True  # type: ignore[attr-defined]
    return attention
