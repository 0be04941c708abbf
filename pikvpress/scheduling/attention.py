"""Attention probabilities as the model computes them: of a prefill's last queries (:func:`window_probs`), and of
several buffered decode steps over the cache they saw, in one batched computation (:func:`step_probs`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pikvpress.cache.view import dense
from pikvpress.models import layer_adapter, slice_positions


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


#: logits elements computed at once; more steps are split into chunks of steps
_CHUNK_ELEMENTS = 1 << 25


def step_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    start: int,
    sinks: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H, n, start + n)`` float32 attention of ``n`` decode steps, averaged over each KV head's queries.

    Parameters
    ----------
    queries : torch.Tensor
        ``(B, Hq, n, D)`` post-RoPE queries of ``n`` consecutive one-token decode steps, already multiplied
        by the softmax scale; query head ``j`` reads KV head ``j // (Hq // H)``.
    keys : torch.Tensor
        ``(B, H, start + n, D)`` cached keys; step ``s`` appended key ``start + s`` and saw keys ``0 .. start + s``.
    start : int
        Tokens cached before the first of the steps.
    sinks : torch.Tensor, optional
        ``(Hq,)`` attention-sink logits (GPT-OSS), counted in the softmax denominator.
    keep : torch.Tensor, optional
        ``(B, H, start + n)`` bool: False for a position the KV head does not hold (a ragged layer's dropped
        tokens), which gets no attention.
    """
    b, h, t, _ = keys.shape
    hq, n = queries.shape[1], queries.shape[2]
    if t != start + n or hq % h:
        raise ValueError(f"{n} steps after {start} tokens need {start + n} keys and Hq a multiple of H, got {t} / {hq}")
    groups = hq // h
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * t))
    out = []
    for first in range(0, n, step):
        chunk = queries[:, :, first : first + step]
        m = chunk.shape[2]
        visible = start + first + torch.arange(m, device=keys.device)  # last key each step saw
        logits = _logits(chunk, keys, torch.arange(t, device=keys.device), visible, groups)
        if keep is not None:
            logits = logits.masked_fill_(~keep.to(keys.device)[:, :, None, None, :], float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, h, groups, 1, 1).expand(b, h, groups, m, 1)
            probs = F.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = F.softmax(logits, dim=-1)
        out.append(probs.mean(dim=2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def sharded_step_probs(
    layer: Any, queries: torch.Tensor, start: int, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`step_probs` over a :class:`~pikvpress.cache.ShardedKVLayer`, computed where its tokens are.

    Each shard this process holds computes its tokens' logits on its own device (a packed shard dequantizes
    its keys only); the tail's are computed on the query's device. The softmax denominator counts every
    token of every shard: over a process group, each rank's log-sum-exp of its shards is all-gathered (one
    collective of ``B x Hq x n`` float32 per chunk of steps, never keys). Tokens held by other ranks get
    probability 0 here (their rank computes them), so every rank ranks its own shards' tokens by the same
    probabilities a single process would compute.

    Parameters
    ----------
    layer : ShardedKVLayer
        The layer, holding at least ``start + n`` tokens (later ones are masked as the future).
    queries, start, sinks
        As in :func:`step_probs`.

    Returns
    -------
    torch.Tensor
        ``(B, H, n, start + n)`` float32 on the queries' device, indexed by sequence position.
    """
    b, hq, n, _ = queries.shape
    length = layer.get_seq_length()
    h = layer.tail_keys.shape[1]
    if length < start + n or hq % h:
        raise ValueError(
            f"{n} steps after {start} tokens need {start + n} tokens and Hq a multiple of H, got {length} / {hq}"
        )
    groups, device, dtype = hq // h, queries.device, layer.dtype
    tail_index = torch.arange(layer.sharded_length, length, device=device).expand(b, h, -1)
    parts = [(shard.dense_part("keys").to(dtype=dtype), shard.index) for _, shard in layer.local_shards if shard.length]
    parts.append((layer.tail_keys, tail_index))
    out = torch.zeros((b, h, n, length), dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * length))
    for first in range(0, n, step):
        chunk = queries[:, :, first : first + step]
        m = chunk.shape[2]
        visible = start + first + torch.arange(m, device=device)  # last token each step saw
        logits = [_logits(chunk, keys, index, visible, groups).to(device) for keys, index in parts]  # (B, H, G, m, L)
        shard_lse = torch.full((b, h, groups, m), float("-inf"), device=device)  # no local shard yet
        if len(logits) > 1:
            shard_lse = torch.stack([x.logsumexp(dim=-1) for x in logits[:-1]]).logsumexp(dim=0)
        if layer.group is not None and layer.group.world_size > 1:
            shard_lse = layer.group.logsumexp(shard_lse, "the scheduler's attention log-sum-exp")
        terms = [shard_lse, logits[-1].logsumexp(dim=-1)]
        if sinks is not None:
            terms.append(sinks.float().to(device).view(1, h, groups, 1).expand(b, h, groups, m))
        total = torch.stack(terms).logsumexp(dim=0).unsqueeze(-1)
        for x, (_, index) in zip(logits, parts):
            probs = (x - total).exp().mean(dim=2)  # (B, H, m, L)
            columns = index.to(device, torch.int64).unsqueeze(2).expand(b, h, m, -1)
            out[:, :, first : first + m].scatter_(-1, columns, probs)
    return out[..., : start + n]


def _logits(
    queries: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, visible: torch.Tensor, groups: int
) -> torch.Tensor:
    """``(B, H, G, m, L)`` float32 logits of ``m`` steps' queries over ``keys`` (on the keys' device), ``-inf`` on
    tokens whose sequence ``index`` (``(B, H, L)`` or ``(L,)``) lies after the step's last ``visible`` token."""
    b, h, length, _ = keys.shape
    m = queries.shape[2]
    rows = queries.to(keys.device, keys.dtype).reshape(b, h, groups * m, -1)
    logits = torch.matmul(rows, keys.transpose(-1, -2)).float().view(b, h, groups, m, length)
    index = index.to(keys.device, torch.int64).unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, L)
    future = index > visible.to(keys.device).view(m, 1)
    return logits.masked_fill_(future, float("-inf"))


def layer_step_probs(layer: Any, queries: torch.Tensor, start: int, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`step_probs` of ``n`` steps over the first ``start + n`` tokens of any cache layer: where a sharded layer
    keeps them (:func:`sharded_step_probs`), else over its keys (a packed layer's dequantized; a ragged layer's view,
    each head over the tokens it holds)."""
    if getattr(layer, "has_shards", False):
        return sharded_step_probs(layer, queries, start, sinks)
    end = start + queries.shape[2]
    keep = layer.dense_keep()[:, :, :end] if hasattr(layer, "dense_keep") else None
    return step_probs(queries, dense(layer.keys)[:, :, :end], start, sinks, keep)
