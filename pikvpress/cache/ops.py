"""What presses do to a cache layer, the same call for every layer kind.

pikvpress's packed and sharded layers implement it themselves (:class:`~pikvpress.cache.layer_base.PiKVCacheLayer`:
``evict``, ``nbytes``, ``read_nbytes``, plus transformers' ``update`` / ``crop``); a dense transformers layer gets
the dense implementation here. Presses call these functions and never branch on a layer's class.
"""

from __future__ import annotations

from typing import Any

import torch


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


def evict(cache: Any, layer_idx: int, order: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep ``budget`` tokens per row of layer ``layer_idx``, the best by ``order`` ``(B, H, N)`` (sequence indices,
    best first); return the kept indices ``(B, H, K)``, increasing. The layer's tensors shrink."""
    layer = cache.layers[layer_idx]
    if hasattr(layer, "evict"):
        return layer.evict(order, budget)
    kept = order[..., :budget].sort(dim=-1).values
    layer.keys, layer.values = gather_kept(layer.keys, layer.values, kept)
    return kept


def layer_nbytes(layer: Any) -> int:
    """Bytes one cache layer holds in this process: a packed layer's codes, scales, zeros and residual, a sharded
    layer's shards, tail and summaries, or a dense layer's key and value tensors."""
    if hasattr(layer, "read_nbytes"):
        return int(layer.nbytes)
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def layer_read_nbytes(layer: Any) -> float:
    """Key/value bytes the last decode step read from ``layer``: what a sharded layer's attention recorded, else every
    byte the layer holds (attention reads the whole layer)."""
    return layer.read_nbytes() if hasattr(layer, "read_nbytes") else float(layer_nbytes(layer))


def layer_tensor_nbytes(layer: Any, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of every tensor ``layer`` holds (walked through its attributes, lists, dicts and sub-objects such as
    shards and packed tensors, each tensor once), with floating-point tensors counted at ``float_dtype``'s size:
    ``torch.bfloat16`` gives the bytes the same cache holds in a bf16 run (codes, indices and offsets keep their
    integer sizes). With ``float_dtype=None`` it equals :func:`layer_nbytes` (the tests check it per layer kind)."""
    seen: set[int] = set()
    total = 0
    stack = [layer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            size = obj.element_size()
            if float_dtype is not None and obj.is_floating_point():
                size = torch.empty((), dtype=float_dtype).element_size()
            total += obj.numel() * size
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return total
