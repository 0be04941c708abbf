"""Replacements for the kvpress 0.5.5 functions that are wrong or crash on some model families.

Each replacement reads the layer through :mod:`pikvpress.models` adapters and falls back to the
original kvpress function for families pikvpress has no adapter for (Gemma3, ...), so nothing
that worked before changes behaviour there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

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

from pikvpress.attention import align_mask
from pikvpress.cache.layer_base import LAYER_TAG
from pikvpress.cache.ops import gather_kept
from pikvpress.models import get_adapter, is_supported, language_model, layer_adapter
from pikvpress.scheduling.attention import window_probs

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
    """``BasePress.__call__`` that leaves sliding-window layers alone, and the model as it found it.

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
    added: list[tuple[nn.Module, str]] = []  # attributes the presses read, removed when the context ends
    skipped = [layer.layer_idx for layer in adapter.layers if layer.is_sliding]
    if skipped:
        logger.info("%s leaves sliding-window layers %s uncompressed", type(self).__name__, skipped)
    try:
        for layer in adapter.layers:
            attention = layer.attention
            if not hasattr(attention, "rotary_emb"):
                attention.rotary_emb = rotary
                added.append((attention, "rotary_emb"))
            if layer.family.mla and not hasattr(attention, "head_dim"):
                attention.head_dim = layer.key_dim  # kvpress reads head_dim; MLA names it qk_head_dim
                added.append((attention, "head_dim"))
            if layer.is_sliding:
                continue
            hooks.append(attention.register_forward_hook(self.forward_hook, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, name in added:
            delattr(module, name)


# --- attention masks for layers of different lengths (PyramidKV, PerLayerCompression) -------------


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


def with_aligned_mask(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an attention function so its mask matches the layer's key length and AdaKV's pruned keys (a pikvpress
    layer's part goes through as it is: its attention reads the whole layer's mask)."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if getattr(key, LAYER_TAG, None) is not None:  # a pikvpress layer's part: its attention reads the whole mask
            return func(module, query, key, value, attention_mask, *args, **kwargs)
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
