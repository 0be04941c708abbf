"""How the model reads pikvpress's packed and sharded cache layers: one attention wrapper, selected per layer.

Every attention function transformers has registered (``sdpa``, ``flash_attention_2``, ...) and the eager function
of every supported family is wrapped once, when :mod:`pikvpress` is imported (:func:`install_attention_dispatch`).
A cache layer pikvpress stores hands attention only its recent tokens, tagged with the layer; the wrapper sees the
tag and computes, for every query (decode or a multi-token question):

- for a :class:`~pikvpress.cache.PackedKVLayer`: partial attention over the packed tokens with
  :func:`~pikvpress.kernels.packed_attention_split_partials` (the Triton kernel on CUDA reads the packed bytes
  directly, split along the sequence; the pure-torch reference on CPU), masking padded and head-wise pruned tokens;
- for a :class:`~pikvpress.cache.ShardedKVLayer`: each chosen shard's partial where it lives;
- partial attention over the full-precision tokens (which include the new ones, causally masked);
- attention sinks (GPT-OSS) as one more partial with output 0;

and merges the partials exactly by log-sum-exp. A :class:`~pikvpress.cache.RowBatchedLayer` (several sequences' own
layers answered as one batch) is read, at a decode step over packed or sharded rows, as one padded and masked stack
(:mod:`pikvpress.rows_attention`), otherwise row by row: each row's real queries over that row's own layer, through
the model's attention function, with the row's own causal mask and head-wise masked keys
(:func:`row_batched_attention`); a :class:`~pikvpress.cache.PaddedKVLayer` (several sequences' dense layers,
left-padded) with its padding masked (:func:`padded_layer_attention`). Every call with untagged keys (a dense cache, a
sliding-window layer) goes to the original function unchanged. The model's ``config._attn_implementation`` is never rewritten, so
two threads or nested forwards cannot flip it. Layers tag their parts once :func:`enable_packed_attention` has named
the model's attention implementation (the presses call it); until then, and after :func:`disable_packed_attention`,
they hand attention their dequantized tokens.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pikvpress.cache.batched import PaddedKVLayer, RowBatchedLayer
from pikvpress.cache.layer_base import DISPATCHED, LAYER_TAG, dispatch_key
from pikvpress.cache.packed_layer import PackedKVLayer
from pikvpress.cache.sharded_layer import ShardedKVLayer
from pikvpress.kernels.attention import (
    attention_partial,
    merge_partials,
    merge_partials_or_empty,
    packed_attention_partial,
    packed_attention_with_residual,
)
from pikvpress.kernels.quantize import _use_triton
from pikvpress.models.families import FAMILIES
from pikvpress.routing.shards import select_shards, shard_scores
from pikvpress.rows_attention import stack_groups, stacked_rows_attention
from pikvpress.scheduling.decode_queries import listening, record_decode_query

__all__ = [
    "disable_packed_attention",
    "enable_packed_attention",
    "install_attention_dispatch",
    "packed_layer_attention",
    "padded_layer_attention",
    "reads_row_batches",
    "row_batched_attention",
    "sharded_layer_attention",
]

#: marks the attention functions that read pikvpress's layers themselves
_DISPATCH = "_pikv_dispatch"

#: attention over further layer kinds, by layer class, registered by the module that reads them
#: (:mod:`pikvpress.ragged_attention`): ``reader(module, query, key, value, attention_mask, layer, scaling=...,
#: s_aux=...)`` returns ``(B, Lq, Hq, Dv)``
READERS: dict[type, Callable[..., torch.Tensor]] = {}


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------


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


def _keep(
    attention_mask: torch.Tensor | None,
    module: nn.Module,
    b: int,
    hq: int,
    hkv: int,
    lq: int,
    p: int,
    n: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Which of the ``n = p + r`` cached tokens each query attends to, as bool broadcastable to
    ``(B, Hq, Lq, N)``, or None for all of them: the model's mask (4-d bool or additive, or a 2-d
    padding mask), causality among the ``lq`` new tokens (the last ones), and kvpress's head-wise
    pruned keys (AdaKV's ``module.masked_key_indices``)."""
    keep = None
    if attention_mask is not None:
        if attention_mask.ndim == 4:
            mask = align_mask(attention_mask, n)
            keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        else:  # flash-attention style (B, N) padding mask: 1 keep, 0 pad
            keep = (attention_mask[:, -n:] != 0)[:, None, None, :]
    if lq > 1 and (keep is None or keep.shape[-2] == 1):  # the mask does not carry causality
        qpos = torch.arange(n - lq, n, device=device)[:, None]
        causal = torch.arange(n, device=device)[None, :] <= qpos
        keep = causal if keep is None else keep & causal
    masked = getattr(module, "masked_key_indices", None)
    if masked is not None and lq != n:
        head_keep = torch.ones(b, hkv, n, dtype=torch.bool, device=device)
        batch_idx, head_idx, seq_idx = masked
        head_keep[batch_idx, head_idx, seq_idx] = False
        head_keep = head_keep.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
        keep = head_keep if keep is None else keep & head_keep
    return keep


def _prefix_kv_mask(keep: torch.Tensor | None, b: int, hq: int, hkv: int, p: int) -> torch.Tensor | None:
    """The per-token mask ``(B, 1|Hkv, P)`` of the first ``p`` tokens (a layer's packed or sharded tokens, which
    precede every query, so the last query row tells padding and pruning), or None if every token is kept."""
    if keep is None:
        return None
    m = keep[..., -1, :p]
    if m.ndim < 3:
        m = m.reshape(1, 1, p)
    m = m.expand(b, m.shape[1], p) if m.shape[0] == 1 else m
    if m.shape[1] == hq and hq != hkv:
        m = m[:, :: hq // hkv]
    if bool(m.all()):
        return None
    return m.contiguous()


# --------------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------------


def packed_layer_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: PackedKVLayer,
    scaling: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Lq, D) over ``layer``'s packed tokens followed by the residual
    ``key`` / ``value`` (B, Hkv, R, D|Dv); returns (B, Lq, Hq, Dv) in ``query``'s dtype.

    On CUDA (or with ``PIKVPRESS_FORCE_TRITON=1``) the packed part runs the split Triton kernel and
    is merged with the residual's partial attention by log-sum-exp; elsewhere one pure-torch softmax
    covers both (:func:`~pikvpress.kernels.packed_attention_with_residual`).
    """
    b, hq, lq, d = query.shape
    hkv, r = key.shape[1], key.shape[2]
    p = layer.packed_length
    n = p + r
    scale = float(scaling) if scaling is not None else d**-0.5
    keep = _keep(attention_mask, module, b, hq, hkv, lq, p, n, query.device)
    if not _use_triton(query):
        out = packed_attention_with_residual(
            query, layer.packed_keys, layer.packed_values, key, value, scale, keep, s_aux
        )
        return out.transpose(1, 2).to(query.dtype).contiguous()

    outs, lses = [], []
    if p > 0:
        kv_mask = _prefix_kv_mask(keep, b, hq, hkv, p)
        q2 = query.reshape(b, hq * lq, d)  # (h, l) rows: row // (Hq*Lq/Hkv) is the kv head
        out_p, lse_p = packed_attention_partial(q2, layer.packed_keys, layer.packed_values, scale, kv_mask)
        outs.append(out_p.view(b, hq, lq, -1))
        lses.append(lse_p.view(b, hq, lq))
    if r > 0:
        out_r, lse_r = attention_partial(query, key, value, scale, None if keep is None else keep[..., p:])
        outs.append(out_r)
        lses.append(lse_r)
    if s_aux is not None:
        out_a, lse_a = _sinks_partial(s_aux, b, hq, lq, outs[0].shape[-1] if outs else value.shape[-1], query.device)
        outs.append(out_a)
        lses.append(lse_a)
    if not outs:
        return torch.zeros((b, lq, hq, value.shape[-1]), dtype=query.dtype, device=query.device)
    out, _ = merge_partials(torch.stack(outs, dim=3), torch.stack(lses, dim=3), dim=3)
    return out.transpose(1, 2).to(query.dtype).contiguous()


def _sinks_partial(s_aux: torch.Tensor, b: int, hq: int, lq: int, dv: int, device: torch.device):
    """Attention sinks (GPT-OSS) as a partial: one more logit per head in the softmax, contributing no value."""
    out = torch.zeros((b, hq, lq, dv), dtype=torch.float32, device=device)
    return out, s_aux.float().to(device).view(1, hq, 1).expand(b, hq, lq)


def sharded_layer_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: ShardedKVLayer,
    scaling: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Lq, D) over ``layer``'s shards followed by its tail ``key`` / ``value``
    (B, Hkv, R, D|Dv, the new tokens last); returns (B, Lq, Hq, Dv) in ``query``'s dtype.

    With ``layer.top_k_shards`` set, each query row (query head and token) reads only its best shards by the
    shards' summaries (:func:`~pikvpress.routing.shard_scores`), and a (batch row, KV head) of a shard is read
    when any of its query rows chose it. Each shard computes its partial (output, lse) on its own device (the
    packed kernel for packed shards); the partials move to the query's device, are merged, exchanged with the
    other ranks in one collective when the layer spans a process group, and merged with the tail's partial
    (causal among the new tokens) and the attention sinks. With every shard read the result is dense
    attention over the layer's tokens. Records ``layer.bytes_read`` (key/value bytes read on this rank).
    """
    b, hq, lq, d = query.shape
    hkv, r = key.shape[1], key.shape[2]
    g = hq // hkv
    p = layer.sharded_length
    n = p + r
    device = query.device
    scale = float(scaling) if scaling is not None else d**-0.5
    keep = _keep(attention_mask, module, b, hq, hkv, lq, p, n, device)
    shard_keep = _prefix_kv_mask(keep, b, hq, hkv, p)  # the shards' tokens precede every query
    if shard_keep is not None:
        shard_keep = shard_keep.expand(b, hkv, p)
    rows_q = query.reshape(b, hkv, g * lq, d)  # the query rows of each kv head: (query head, token)
    chosen = None
    if layer.top_k_shards is not None and layer.top_k_shards < layer.num_shards:
        counts = layer.key_count.to(device)  # real (not padding) tokens behind each shard's summary
        centroid = layer.key_sum / counts.unsqueeze(-1).clamp_min(1)
        scores = shard_scores(rows_q * scale, layer.key_min, layer.key_max, centroid, counts, layer.shard_score)
        chosen = select_shards(scores, layer.top_k_shards)  # (B, Hkv, G, S)
    outs, lses = [], []
    bytes_read = float(key.numel() * key.element_size() + value.numel() * value.element_size())
    for s, shard in layer.local_shards:
        if shard.length == 0:
            continue
        rows = None
        if chosen is not None:
            rows = chosen[..., s].any(dim=-1)
            n_rows = int(rows.sum())
            if n_rows == 0:
                continue
        else:
            n_rows = b * hkv
        token_keep = None if shard_keep is None else shard_keep.gather(-1, shard.index.to(device, torch.int64))
        out_s, lse_s = shard.partial(rows_q, scale, rows, token_keep)
        out_s, lse_s = out_s.to(device), lse_s.to(device)
        if chosen is not None:
            lse_s = lse_s.masked_fill(~chosen[..., s], float("-inf"))
        outs.append(out_s)
        lses.append(lse_s)
        bytes_read += shard.row_kv_nbytes * n_rows
    layer.bytes_read = bytes_read
    dv = value.shape[-1]
    out_sh, lse_sh = merge_partials_or_empty(outs, lses, (b, hkv, g * lq), dv, device)
    if layer.group is not None and layer.group.world_size > 1:
        out_sh, lse_sh = layer.group.merge(
            out_sh, lse_sh, f"layer {getattr(module, 'layer_idx', '?')}'s partial attention"
        )
    partials = [(out_sh.view(b, hq, lq, dv), lse_sh.view(b, hq, lq))]
    if r > 0:
        partials.append(attention_partial(query, key, value, scale, None if keep is None else keep[..., p:]))
    if s_aux is not None:
        partials.append(_sinks_partial(s_aux, b, hq, lq, dv, device))
    out, _ = merge_partials(
        torch.stack([o for o, _ in partials], dim=3), torch.stack([l for _, l in partials], dim=3), dim=3
    )
    return out.transpose(1, 2).to(query.dtype).contiguous()


def _model_attention_function(module: nn.Module) -> Callable:
    """The attention function ``module`` calls (as its forward looks it up, wrappers included)."""
    impl = getattr(module.config, "_attn_implementation", None)
    if impl in (None, "eager"):
        return importlib.import_module(type(module).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def reads_row_batches(module: nn.Module) -> bool:
    """Whether the attention function ``module`` calls reads pikvpress's tagged layers (a
    :class:`~pikvpress.cache.RowBatchedLayer` included): every registered function and the eager function of every
    family pikvpress supports do once :mod:`pikvpress` is imported."""
    try:
        return _dispatched(_model_attention_function(module))
    except (AttributeError, KeyError, ImportError):
        return False


def _row_kwargs(kwargs: dict[str, Any], row: int, real: torch.Tensor, b: int, lq: int) -> dict[str, Any]:
    """Row ``row``'s share of an attention call's keyword arguments: per-token tensors ``(B, Lq, ...)`` (such as
    ``position_ids``) cut to the row's real tokens, per-row tensors ``(B, ...)`` to the row."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == b and b > 1:
            value = value[row : row + 1]
            if value.ndim >= 2 and value.shape[1] == lq:
                value = value[:, real.to(value.device)]
        out[name] = value
    return out


def row_batched_attention(
    module: nn.Module, query: torch.Tensor, value: torch.Tensor, layer: RowBatchedLayer, **kwargs: Any
) -> torch.Tensor:
    """Attention of a batch's ``query`` (B, Hq, Lq, D) over a :class:`~pikvpress.cache.RowBatchedLayer`, row by row
    (``value`` (B, Hkv, Lq, Dv): the batch's new values, for the output's shape); returns (B, Lq, Hq, Dv) in
    ``query``'s dtype.

    Row ``i``'s real queries (``layer.incoming[i]``; the others, padding, get a zero output) attend over what row
    ``i``'s own layer returned from this step's update (``layer.step[i]``), through the model's own attention function
    (``module``'s, every wrapper included), exactly as that row alone would: a causal mask over the row's own length
    when it has several new tokens (none for one, as transformers builds it), and the row's head-wise masked keys
    (``layer.masked_key_indices[i]``) on ``module`` for the call. At a decode step, the rows of one kind and packing
    are read as one stack instead (:func:`~pikvpress.rows_attention.stacked_rows_attention`), the same up to rounding.
    """
    b, hq, lq, d = query.shape
    out = None
    stacked: set[int] = set()
    scaling = kwargs.get("scaling")
    scale = float(scaling) if scaling is not None else d**-0.5
    for members in stack_groups(_stackable_rows(query, layer, kwargs), query.device):
        group_out = stacked_rows_attention(
            query[members], [layer.rows[i] for i in members], [layer.step[i] for i in members], scale
        )
        if out is None:
            out = group_out.new_zeros((b, lq, *group_out.shape[2:]))
        out[members] = group_out
        stacked.update(members)
    function = _model_attention_function(module)
    real_all = layer.incoming if layer.incoming is not None else torch.ones(b, lq, dtype=torch.bool)
    eager = getattr(module.config, "_attn_implementation", None) in (None, "eager")
    saved = getattr(module, "masked_key_indices", None)
    try:
        for i, part in enumerate(layer.step):
            if part is None or i in stacked:
                continue
            real = real_all[i].to(query.device)
            row_query = query[i : i + 1, :, real]
            li = row_query.shape[2]
            n = layer.rows[i].get_seq_length()
            mask = None
            if li > 1 or eager:
                q_pos = torch.arange(n - li, n, device=query.device)[:, None]
                mask = (torch.arange(n, device=query.device)[None, :] <= q_pos)[None, None]
            module.masked_key_indices = layer.masked_key_indices[i]
            row_out, _ = function(module, row_query, part[0], part[1], mask, **_row_kwargs(kwargs, i, real, b, lq))
            if out is None:
                out = row_out.new_zeros((b, lq, *row_out.shape[2:]))
            out[i, real] = row_out[0].to(out.dtype)
    finally:
        module.masked_key_indices = saved
    if out is None:  # no row had a real token: nothing is read
        return query.new_zeros((b, lq, hq, value.shape[-1]))
    return out.to(query.dtype)


def _stackable_rows(query: torch.Tensor, layer: RowBatchedLayer, kwargs: dict[str, Any]) -> list[Any]:
    """Each row's own layer if this call is a decode step that row may join a stack at
    (:func:`~pikvpress.rows_attention.stack_groups`), else None for it: one new token, no attention sinks, no
    decode-time press listening for each row's query, the row has its token and no head-wise masked keys."""
    if query.shape[2] != 1 or kwargs.get("s_aux") is not None or listening():
        return [None] * len(layer.rows)
    return [
        row if part is not None and masked is None else None
        for row, part, masked in zip(layer.rows, layer.step, layer.masked_key_indices, strict=True)
    ]


def _grouped_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of ``query`` (B, Hq, Lq, D) over grouped ``key`` / ``value`` (B, Hkv, N, D|Dv) under the bool mask
    ``keep`` (broadcastable to (B, Hq, Lq, N)); returns (B, Hq, Lq, Dv). The query heads that share a key head are
    laid out as that head's queries, (B, Hkv, g * Lq, D), so that no key is repeated per query head and the mask stays
    per row when it is (SDPA's ``enable_gqa`` takes a slower path on CPU when a mask is given)."""
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    if g == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scale)
    grouped = query.reshape(b, hkv, g * lq, d)  # head h = kv * g + j: rows (j, t) of kv head ``kv``
    if keep.shape[1] == 1 and keep.shape[2] == 1:
        mask = keep  # (B|1, 1, 1, N): the same for every query
    else:
        mask = keep.expand(b, hq, lq, keep.shape[-1]).reshape(b, hkv, g * lq, keep.shape[-1])
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, lq, value.shape[-1])


def padded_layer_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: PaddedKVLayer,
    scaling: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Lq, D) over a :class:`~pikvpress.cache.PaddedKVLayer`'s ``key`` / ``value``
    (B, Hkv, N, D|Dv, every position); returns (B, Lq, Hq, Dv) in ``query``'s dtype.

    The model's mask (right-aligned to the layer, causality added for several queries when it lacks it) and
    kvpress's head-wise masked keys (:func:`_keep`) are combined with the layer's own ``valid``, so no padded
    position is attended, whatever mask the model built. The keys stay grouped: one SDPA call over each key head's
    query heads (:func:`_grouped_sdpa`; transformers' SDPA path repeats every key per query head as soon as a mask is
    given, which costs more than the attention itself on CPU). Attention sinks (GPT-OSS) merge as one more partial.
    """
    b, hq, lq, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    scale = float(scaling) if scaling is not None else d**-0.5
    keep = _keep(attention_mask, module, b, hq, hkv, lq, 0, n, query.device)
    valid = layer.valid.to(query.device)[:, None, None, :]
    keep = valid if keep is None else keep & valid
    if s_aux is None:
        return _grouped_sdpa(query, key, value, keep, scale).transpose(1, 2).contiguous()
    out_r, lse_r = attention_partial(query, key, value, scale, keep)
    out_a, lse_a = _sinks_partial(s_aux, b, hq, lq, value.shape[-1], query.device)
    out, _ = merge_partials(torch.stack([out_r, out_a], dim=3), torch.stack([lse_r, lse_a], dim=3), dim=3)
    return out.transpose(1, 2).to(query.dtype).contiguous()


def _read_pikv_layer(module: nn.Module, query, key, value, attention_mask, layer, **kwargs: Any):
    """Attention over a packed or sharded layer (``key`` is the part ``update`` returned, tagged with the layer), or
    over a batch of rows' own layers."""
    if isinstance(layer, RowBatchedLayer):
        return row_batched_attention(module, query, value, layer, **kwargs), None
    if module.training and kwargs.get("dropout", 0.0):
        raise ValueError("packed KV attention does not support dropout; call model.eval()")
    if isinstance(layer, PaddedKVLayer):
        out = padded_layer_attention(
            module, query, key, value, attention_mask, layer, scaling=kwargs.get("scaling"), s_aux=kwargs.get("s_aux")
        )
        return out, None
    read = READERS.get(type(layer))
    if read is None:
        read = sharded_layer_attention if isinstance(layer, ShardedKVLayer) else packed_layer_attention
    out = read(
        module, query, key, value, attention_mask, layer, scaling=kwargs.get("scaling"), s_aux=kwargs.get("s_aux")
    )
    return out, None


def _dispatching(base: Callable) -> Callable:
    """``base`` (an attention function), reading pikvpress's layers itself: a call whose ``key`` is tagged with a
    packed or sharded layer goes to :func:`packed_layer_attention` / :func:`sharded_layer_attention`, every other call
    to ``base`` unchanged. Either way the step's queries go to a decode-time press that asked for them."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        record_decode_query(module, query)
        layer = getattr(key, LAYER_TAG, None)
        if layer is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        return _read_pikv_layer(module, query, key, value, attention_mask, layer, **kwargs)

    attention.__name__ = getattr(base, "__name__", "attention")
    attention.__wrapped__ = base  # type: ignore[attr-defined]
    setattr(attention, _DISPATCH, True)
    return attention


def _dispatched(func: Any) -> bool:
    while func is not None:
        if getattr(func, _DISPATCH, False):
            return True
        func = getattr(func, "__wrapped__", None)
    return False


def _modeling_module(model_type: str) -> Any:
    try:
        return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None


def _wrap_registered(impl: str) -> None:
    """Wrap the attention function transformers registered as ``impl`` (once)."""
    if impl not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {impl!r} is not registered with transformers")
    if not _dispatched(ALL_ATTENTION_FUNCTIONS[impl]):
        ALL_ATTENTION_FUNCTIONS[impl] = _dispatching(ALL_ATTENTION_FUNCTIONS[impl])


def _wrap_eager(model_type: str | None) -> bool:
    """Wrap ``model_type``'s modeling file's own eager function (once); False if it has none."""
    module = _modeling_module(model_type) if model_type else None
    func = getattr(module, "eager_attention_forward", None)
    if func is None:
        return False
    if not _dispatched(func):
        module.eager_attention_forward = _dispatching(func)
    return True


def _install(impl: str, model_type: str | None) -> None:
    """Wrap the function behind ``impl`` (for ``"eager"``: ``model_type``'s own) once, and let layers of models
    running it hand attention their tagged parts."""
    if impl == "eager":
        if not _wrap_eager(model_type):
            return
    else:
        _wrap_registered(impl)
    DISPATCHED.add(dispatch_key(impl, model_type))


def install_attention_dispatch() -> None:
    """Wrap every registered attention function, and the eager function of every family pikvpress supports, so they
    can read pikvpress's layers (idempotent). Run when :mod:`pikvpress` is imported, before the kvpress compatibility
    layer wraps them, so that turning that layer off and on keeps these wrappers. A wrapper passes every call whose
    keys are not a pikvpress layer's to the original function; layers hand attention their tagged parts only once
    :func:`enable_packed_attention` has named the model's attention implementation."""
    for impl in list(ALL_ATTENTION_FUNCTIONS.keys()):
        _wrap_registered(impl)
    for spec in FAMILIES:
        for model_type in spec.model_types:
            _wrap_eager(model_type)


def enable_packed_attention(model: nn.Module) -> None:
    """Make ``model`` read packed and sharded cache layers with pikvpress's attention (idempotent).

    The attention function ``model`` runs was wrapped once (:func:`install_attention_dispatch`; its
    ``config._attn_implementation`` is never changed): for a layer pikvpress stores, the wrapper reads the packed
    bytes and the shards where they are; every other call goes to the original function. Presses call it, so
    ``model.generate`` and kvpress's pipeline (which decodes outside the press's context) read packed layers without
    dequantizing them. Nothing is written on the model.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _install(config._attn_implementation or "eager", getattr(config, "model_type", None))


def disable_packed_attention(model: nn.Module | None = None) -> None:
    """Undo :func:`enable_packed_attention` (for every model): packed and sharded layers then hand attention their
    dequantized tokens (slower, the same result up to rounding); the wrappers pass every call through."""
    DISPATCHED.clear()
