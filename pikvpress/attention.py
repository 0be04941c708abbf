"""The attention function pikvpress registers with transformers for packed (quantized) cache layers.

``pikv_<base>`` (``pikv_sdpa``, ``pikv_eager``, ``pikv_flash_attention_2``...) is registered with
``AttentionInterface`` and ``AttentionMaskInterface``. For a layer whose cache is a
:class:`~pikvpress.cache.PackedKVLayer` it computes, for every query (decode or a multi-token
question):

- partial attention over the packed tokens with
  :func:`~pikvpress.kernels.packed_attention_split_partials` (the Triton kernel on CUDA reads the
  packed bytes directly, split along the sequence; the pure-torch reference on CPU), masking padded
  and head-wise pruned tokens;
- partial attention over the full-precision residual (which includes the new tokens, causally masked);
- attention sinks (GPT-OSS) as one more partial with output 0;

and merges the partials exactly by log-sum-exp. Every other layer and cache goes to ``<base>``
unchanged.

:func:`enable_packed_attention` installs a hook on the model's decoder stack that switches the model
to ``pikv_<base>`` for the duration of any forward whose cache holds a packed layer, and back after.
:class:`~pikvpress.presses.QuantizationPress` calls it, so ``model.generate`` and kvpress's pipeline
(which decodes outside the press's context) read packed layers without dequantizing them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pikvpress.cache.layer_base import ATTENTION_PREFIX, LAYER_TAG
from pikvpress.cache.packed_layer import PackedKVLayer
from pikvpress.cache.sharded_layer import ShardedKVLayer
from pikvpress.compat.patches import DECODE_QUERY_TOKENS, KEEP_DECODE_QUERY, align_mask
from pikvpress.kernels.attention import (
    attention_partial,
    merge_partials,
    packed_attention_partial,
    packed_attention_with_residual,
)
from pikvpress.kernels.quantize import _use_triton
from pikvpress.models.adapter import language_model
from pikvpress.routing.shards import select_shards, shard_scores

__all__ = [
    "disable_packed_attention",
    "enable_packed_attention",
    "packed_attention_name",
    "packed_layer_attention",
    "register_packed_attention",
    "sharded_layer_attention",
]

_HOOKS_ATTR = "_pikv_packed_attention_hooks"
_RESTORE_ATTR = "_pikv_restore_attn_implementation"


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------


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
        counts = torch.tensor(layer.shard_lengths, device=device).expand(b, hkv, -1)
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
    if outs:
        out_sh, lse_sh = merge_partials(torch.stack(outs, dim=3), torch.stack(lses, dim=3), dim=3)
    else:
        out_sh = torch.zeros((b, hkv, g * lq, dv), dtype=torch.float32, device=device)
        lse_sh = torch.full((b, hkv, g * lq), float("-inf"), dtype=torch.float32, device=device)
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


def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "eager":  # the modeling file's own eager function (GPT-OSS's adds sinks)
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def packed_attention_name(base: str) -> str:
    """The registered name wrapping ``base`` (``"sdpa"`` -> ``"pikv_sdpa"``)."""
    return base if base.startswith(ATTENTION_PREFIX) else ATTENTION_PREFIX + base


def register_packed_attention(base: str) -> str:
    """Register ``pikv_<base>`` with transformers' attention and mask interfaces; return its name."""
    name = packed_attention_name(base)
    if name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return name
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not registered with transformers")

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ):
        if getattr(module, KEEP_DECODE_QUERY, False) and query.shape[2] <= DECODE_QUERY_TOKENS:
            module.pikvpress_decode_query = query  # the step's post-RoPE queries, for AdaptiveSchedulingPress
        layer = getattr(key, LAYER_TAG, None)
        if layer is None:
            return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if module.training and kwargs.get("dropout", 0.0):
            raise ValueError("packed KV attention does not support dropout; call model.eval()")
        read = sharded_layer_attention if isinstance(layer, ShardedKVLayer) else packed_layer_attention
        out = read(
            module, query, key, value, attention_mask, layer, scaling=kwargs.get("scaling"), s_aux=kwargs.get("s_aux")
        )
        return out, None

    attention.__name__ = f"{name}_attention"
    AttentionInterface.register(name, attention)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, sdpa_mask)
    AttentionMaskInterface.register(name, mask_fn)
    return name


# --------------------------------------------------------------------------------------------------
# switching a model to it while a packed cache is read
# --------------------------------------------------------------------------------------------------


def _has_packed_layer(cache: Any) -> bool:
    return any(isinstance(layer, (PackedKVLayer, ShardedKVLayer)) for layer in getattr(cache, "layers", ()))


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    config = module.config
    impl = config._attn_implementation
    if cache is None or not _has_packed_layer(cache) or impl is None or impl.startswith(ATTENTION_PREFIX):
        return
    name = register_packed_attention(impl)
    setattr(module, _RESTORE_ATTR, impl)
    config._attn_implementation = name


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    impl = getattr(module, _RESTORE_ATTR, None)
    if impl is not None:
        module.config._attn_implementation = impl
        delattr(module, _RESTORE_ATTR)


def enable_packed_attention(model: nn.Module) -> None:
    """Make ``model`` read packed cache layers with pikvpress's attention (idempotent).

    A hook on the decoder stack switches ``config._attn_implementation`` to ``pikv_<base>`` during
    any forward whose ``past_key_values`` holds a :class:`~pikvpress.cache.PackedKVLayer`, and back
    afterwards; other forwards are untouched.
    """
    stack = language_model(model)
    if getattr(stack, _HOOKS_ATTR, None):
        return
    hooks = [
        stack.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        stack.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
    ]
    setattr(stack, _HOOKS_ATTR, hooks)


def disable_packed_attention(model: nn.Module) -> None:
    """Remove the hooks :func:`enable_packed_attention` installed (packed layers then dequantize)."""
    stack = language_model(model)
    for hook in getattr(stack, _HOOKS_ATTR, None) or []:
        hook.remove()
    if hasattr(stack, _HOOKS_ATTR):
        delattr(stack, _HOOKS_ATTR)
