"""A decode step over several rows' own packed, ragged or sharded layers, computed as one batch.

A :class:`~pikvpress.cache.RowBatchedLayer` keeps each row's own :class:`~pikvpress.cache.PackedKVLayer` or
:class:`~pikvpress.cache.ShardedKVLayer` (a row's quantization groups and shards are its own, and stay so). Reading
them row by row costs a few dozen small tensor operations per row, shard and layer, which on a CPU cost more than the
arithmetic. At a decode step (one new token in every row) :func:`stacked_rows_attention` reads them as one batch
instead: for each part of the layers (each shard's packed tokens and its unpacked rest, the packed tokens and the
residual of a packed layer, the full-precision tail), the rows' tensors are zero-padded along the tokens to the
longest row and stacked, each row's padding is masked, and the same partial-attention kernels as one row's read run
once over the stack; the partials merge as in one row's read. The stack is a transient copy for the step: each row's
layer is left as it was, and records the bytes it alone would have read (``bytes_read``).

A padded token's logit is ``-inf``: it adds exactly zero to its row's softmax, so each row's output is the one it
gets alone up to the rounding of the batched products.
"""

from __future__ import annotations

from typing import Any

import torch

from pikvpress.cache.packed_layer import PackedKVLayer
from pikvpress.cache.ragged_layer import RaggedKVLayer
from pikvpress.cache.sharded_layer import ShardedKVLayer
from pikvpress.kernels.attention import (
    attention_partial,
    merge_partials,
    merge_partials_or_empty,
    packed_attention_partial,
    packed_attention_with_residual,
)
from pikvpress.kernels.quantize import QuantizedTensor, _use_triton
from pikvpress.kernels.ragged import ragged_attention_partial
from pikvpress.kernels.ragged_reference import ragged_lengths, ragged_offsets
from pikvpress.routing.shards import select_shards, shard_scores

__all__ = ["stack_groups", "stacked_rows_attention"]


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batch-1 tensors ``(1, H, T_i, ...)`` stacked into ``(B, H, max T_i, ...)``, zero-padded along the tokens."""
    longest = max(t.shape[2] for t in tensors)
    if all(t.shape[2] == longest for t in tensors):
        return torch.cat(tensors, dim=0)
    out = tensors[0].new_zeros((len(tensors), tensors[0].shape[1], longest, *tensors[0].shape[3:]))
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[2]] = t[0]
    return out


def _within(lengths: list[int], device: torch.device) -> torch.Tensor:
    """``(B, max length)`` bool: position ``j`` of row ``i`` is one of its ``lengths[i]`` real tokens."""
    return torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _stacked_qt(parts: list[QuantizedTensor | None], like: QuantizedTensor) -> QuantizedTensor:
    """Rows' packed tensors (None: no packed token) as one, zero-padded along the tokens (the stats too: a per-channel
    key group of 32 tokens is one stats row, so the padding is whole groups of zeros)."""
    empty = [like.packed[:, :, :0], like.scale[:, :, :0], like.zero[:, :, :0]]
    rows = [empty if q is None else [q.packed, q.scale, q.zero] for q in parts]
    packed, scale, zero = (_padded([r[k] for r in rows]) for k in range(3))
    tokens = max(0 if q is None else q.shape[2] for q in parts)
    return QuantizedTensor(
        packed, scale, zero, like.bits, like.group_size, like.layout, (len(parts), like.shape[1], tokens, like.shape[3])
    )


def _packing(layer: Any) -> tuple:
    """What must agree for two rows' packed parts to stack: bits, groups, stats dtype and layout."""
    return tuple(getattr(layer, k) for k in ("bits", "group_size", "key_group_size", "stats_dtype", "layout"))


def _stack_key(layer: Any, device: torch.device) -> tuple | None:
    """What two rows' layers must share to be read as one stack (None: this row is read alone)."""
    if isinstance(layer, PackedKVLayer):
        return ("packed", _packing(layer)) if layer.device == device else None
    if isinstance(layer, RaggedKVLayer):
        return ("ragged", layer.kv_heads) if layer.device == device else None
    if not isinstance(layer, ShardedKVLayer) or not layer.has_shards or layer.group is not None:
        return None
    if layer.valid is not None or any(s is not None and s.length and s.device != device for s in layer.shards):
        return None  # padding inside the row's own layer, or a shard elsewhere: the row's own read
    packing = None if layer.packing is None else tuple(sorted((k, repr(v)) for k, v in layer.packing.items()))
    return ("sharded", layer.num_shards, layer.top_k_shards, layer.shard_score, packing)


def stack_groups(rows: list[Any], device: torch.device) -> list[list[int]]:
    """The indices of ``rows`` (each row's own layer, or None for a row left out) that can be read as one stack, in
    groups of two or more rows of the same kind and packing (a batch may hold PiKV caches of several shard settings
    and int4-quantized ones); a row in no group is read alone."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(rows):
        key = None if layer is None else _stack_key(layer, device)
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def stacked_rows_attention(
    query: torch.Tensor, rows: list[Any], tails: list[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """One decode step's attention of ``query`` ``(B, Hq, 1, D)`` over the rows' own layers ``rows`` (one group of
    :func:`stack_groups`) and each row's full-precision recent tokens ``tails`` (what the row's layer
    returned from this step's update, ``(1, Hkv, R_i, D|Dv)``); returns ``(B, 1, Hq, Dv)`` in ``query``'s dtype."""
    tail_lengths = [k.shape[2] for k, _ in tails]
    tail_keys, tail_values = _padded([k for k, _ in tails]), _padded([v for _, v in tails])
    if isinstance(rows[0], PackedKVLayer):
        out = _packed_rows(query, rows, tail_keys, tail_values, tail_lengths, scale)
    elif isinstance(rows[0], RaggedKVLayer):
        out = _ragged_rows(query, rows, tail_keys, tail_values, tail_lengths, scale)
    else:
        out = _sharded_rows(query, rows, tail_keys, tail_values, tails, scale)
    return out.transpose(1, 2).to(query.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# packed layers: the packed tokens, then the residual (the step's token last)
# --------------------------------------------------------------------------------------------------


def _packed_rows(
    query: torch.Tensor,
    rows: list[PackedKVLayer],
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    residual_lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """``(B, Hq, 1, Dv)`` float32: :func:`~pikvpress.attention.packed_layer_attention` of each row, stacked."""
    b, hq, lq, d = query.shape
    hkv = residual_keys.shape[1]
    device = query.device
    lengths = [r.packed_length for r in rows]
    like = next((r for r in rows if r.packed_length), None)
    kq = vq = None
    if like is not None:
        kq = _stacked_qt([r.packed_keys if r.packed_length else None for r in rows], like.packed_keys)
        vq = _stacked_qt([r.packed_values if r.packed_length else None for r in rows], like.packed_values)
    p = max(lengths)
    packed_keep = _within(lengths, device) if p else torch.zeros(b, 0, dtype=torch.bool, device=device)
    keep = torch.cat([packed_keep, _within(residual_lengths, device)], dim=1)[:, None, None, :]
    if not _use_triton(query):
        return packed_attention_with_residual(query, kq, vq, residual_keys, residual_values, scale, keep)
    outs, lses = [], []
    if p:
        kv_mask = packed_keep[:, None, :].expand(b, hkv, p).contiguous()
        out_p, lse_p = packed_attention_partial(query.reshape(b, hq * lq, d), kq, vq, scale, kv_mask)
        outs.append(out_p.view(b, hq, lq, -1))
        lses.append(lse_p.view(b, hq, lq))
    out_r, lse_r = attention_partial(query, residual_keys, residual_values, scale, keep[..., p:])
    outs.append(out_r)
    lses.append(lse_r)
    out, _ = merge_partials(torch.stack(outs, dim=3), torch.stack(lses, dim=3), dim=3)
    return out


# --------------------------------------------------------------------------------------------------
# ragged layers: every row's heads, one flat store (no padding), then the tails
# --------------------------------------------------------------------------------------------------


def _ragged_rows(
    query: torch.Tensor,
    rows: list[RaggedKVLayer],
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """``(B, Hq, 1, Dv)`` float32: :func:`~pikvpress.ragged_attention.ragged_layer_attention` of each row, stacked.
    The rows' bodies are already flat, head after head: concatenated, with their offsets chained, they are one ragged
    batch of ``B * Hkv`` heads."""
    keys = torch.cat([r.flat("keys") for r in rows])
    values = torch.cat([r.flat("values") for r in rows])
    offsets = ragged_offsets(torch.cat([ragged_lengths(r.offsets) for r in rows]))
    out_b, lse_b = ragged_attention_partial(query, keys, values, offsets, scale)
    keep = _within(tail_lengths, query.device)[:, None, None, :]
    out_t, lse_t = attention_partial(query, tail_keys, tail_values, scale, keep)
    out, _ = merge_partials(torch.stack([out_b, out_t], dim=3), torch.stack([lse_b, lse_t], dim=3), dim=3)
    return out


# --------------------------------------------------------------------------------------------------
# sharded layers: each shard's partial, merged, then the tail
# --------------------------------------------------------------------------------------------------


def _shard_partial(shards: list[Any], q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``KVShard._partial`` of every row's shard ``s`` at once: ``q`` ``(B, Hkv, G, D)`` -> float32 ``out``
    ``(B, Hkv, G, Dv)`` and ``lse`` ``(B, Hkv, G)`` (``-inf`` for a row whose shard is empty)."""
    n, hkv, g, d = q.shape
    device = q.device
    like = next(s for s in shards if s is not None and s.length)
    if like.packed is None:
        empty = (like.keys[:, :, :0], like.values[:, :, :0])
        parts = [(s.keys, s.values) if s is not None and s.length else empty for s in shards]
        lengths = [0 if s is None else s.length for s in shards]
        keep = _within(lengths, device)[:, None, None, :]
        out, lse = attention_partial(
            q.reshape(n, hkv * g, 1, d), _padded([k for k, _ in parts]), _padded([v for _, v in parts]), scale, keep
        )
        return out.view(n, hkv, g, -1), lse.view(n, hkv, g)
    layers = [None if s is None or not s.length else s.packed for s in shards]
    outs, lses = [], []
    packed = [0 if x is None else x.packed_length for x in layers]
    if max(packed):
        with_packed = next(x for x in layers if x is not None and x.packed_length)
        kq = _stacked_qt(
            [x.packed_keys if x is not None and x.packed_length else None for x in layers], with_packed.packed_keys
        )
        vq = _stacked_qt(
            [x.packed_values if x is not None and x.packed_length else None for x in layers], with_packed.packed_values
        )
        kv_mask = _within(packed, device)[:, None, :].expand(n, hkv, max(packed)).contiguous()
        out_p, lse_p = packed_attention_partial(q.reshape(n, hkv * g, d), kq, vq, scale, kv_mask)
        outs.append(out_p.view(n, hkv, g, -1))
        lses.append(lse_p.view(n, hkv, g))
    rest = [0 if x is None else x.residual_length_now for x in layers]
    if max(rest):
        with_rest = next(x for x in layers if x is not None and x.residual_length_now)
        empty = (with_rest.residual_keys[:, :, :0], with_rest.residual_values[:, :, :0])
        parts = [
            (x.residual_keys, x.residual_values) if x is not None and x.residual_length_now else empty for x in layers
        ]
        keep = _within(rest, device)[:, None, None, :]
        out_r, lse_r = attention_partial(
            q.reshape(n, hkv * g, 1, d), _padded([k for k, _ in parts]), _padded([v for _, v in parts]), scale, keep
        )
        outs.append(out_r.view(n, hkv, g, -1))
        lses.append(lse_r.view(n, hkv, g))
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_partials(torch.stack(outs, dim=3), torch.stack(lses, dim=3), dim=3)


def _sharded_rows(
    query: torch.Tensor,
    rows: list[ShardedKVLayer],
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tails: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """``(B, Hq, 1, Dv)`` float32: :func:`~pikvpress.attention.sharded_layer_attention` of each row, stacked; sets
    each row's ``bytes_read`` to what that row's own read records."""
    b, hq, lq, d = query.shape
    hkv = tail_keys.shape[1]
    g = hq // hkv
    device = query.device
    first = rows[0]
    rows_q = query.reshape(b, hkv, g * lq, d)
    chosen = None
    if first.top_k_shards is not None and first.top_k_shards < first.num_shards:
        counts = torch.cat([r.key_count for r in rows]).to(device)
        centroid = torch.cat([r.key_sum for r in rows]) / counts.unsqueeze(-1).clamp_min(1)
        key_min, key_max = torch.cat([r.key_min for r in rows]), torch.cat([r.key_max for r in rows])
        scores = shard_scores(rows_q * scale, key_min, key_max, centroid, counts, first.shard_score)
        chosen = select_shards(scores, first.top_k_shards)  # (B, Hkv, G, S)
    bytes_read = [float(k.numel() * k.element_size() + v.numel() * v.element_size()) for k, v in tails]
    outs, lses = [], []
    for s in range(first.num_shards):
        shards = [r.shards[s] if s < len(r.shards) else None for r in rows]
        lengths = [0 if x is None else x.length for x in shards]
        read = chosen[..., s].any(dim=-1) if chosen is not None else None  # (B, Hkv)
        counted = [0 if not n else (hkv if read is None else int(read[i].sum())) for i, n in enumerate(lengths)]
        if not any(counted):
            continue
        out_s, lse_s = _shard_partial(shards, rows_q, scale)
        if chosen is not None:
            lse_s = lse_s.masked_fill(~chosen[..., s], float("-inf"))
        outs.append(out_s)
        lses.append(lse_s)
        for i, n_rows in enumerate(counted):
            if n_rows:
                bytes_read[i] += shards[i].row_kv_nbytes * n_rows
    for row, nbytes in zip(rows, bytes_read, strict=True):
        row.bytes_read = nbytes
    dv = tail_values.shape[-1]
    out_sh, lse_sh = merge_partials_or_empty(outs, lses, (b, hkv, g * lq), dv, device)
    tail_keep = _within([k.shape[2] for k, _ in tails], device)[:, None, None, :]
    out_t, lse_t = attention_partial(query, tail_keys, tail_values, scale, tail_keep)
    out, _ = merge_partials(
        torch.stack([out_sh.view(b, hq, lq, dv), out_t], dim=3),
        torch.stack([lse_sh.view(b, hq, lq), lse_t], dim=3),
        dim=3,
    )
    return out
