"""Where KV lives: packed (quantized) cache layers, expert-sharded cache layers, and the bytes a cache holds.

:class:`PackedKVLayer` stores one layer's keys and values bit-packed with a full-precision residual;
:class:`ShardedKVLayer` spreads them over shards (:class:`KVShard`) on several devices or ranks, and
:class:`ExpertShardedCache` is a cache made of such layers; :func:`cache_nbytes` reports the bytes any
transformers cache holds, read from its tensors.
"""

from __future__ import annotations

import torch

from pikvpress.cache.packed_layer import PackedKVLayer, PackedKVView
from pikvpress.cache.shard import KVShard
from pikvpress.cache.sharded_cache import ExpertShardedCache
from pikvpress.cache.sharded_layer import ShardedKVLayer, ShardedKVView
from pikvpress.cache.view import KVView


def layer_nbytes(layer) -> int:
    """Bytes one cache layer holds (in this process): a packed layer's codes, scales, zeros and residual, a
    sharded layer's shards, tail and summaries, or a dense layer's key and value tensors."""
    if isinstance(layer, (PackedKVLayer, ShardedKVLayer)):
        return layer.nbytes
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def cache_nbytes(cache) -> int:
    """Bytes held by every layer of a transformers ``Cache`` (packed layers included)."""
    return int(sum(layer_nbytes(layer) for layer in cache.layers))


def cache_nbytes_per_device(cache) -> dict[str, int]:
    """Bytes a cache holds on each device (in this process)."""
    out: dict[str, int] = {}
    for layer in cache.layers:
        if isinstance(layer, ShardedKVLayer):
            parts = layer.nbytes_per_device()
        else:
            keys = getattr(layer, "keys", None)
            parts = {str(keys.device): layer_nbytes(layer)} if keys is not None else {}
        for device, nbytes in parts.items():
            out[device] = out.get(device, 0) + nbytes
    return out


def cache_bytes_read(cache) -> float:
    """Key/value bytes the last decode step read from ``cache`` (this process, summed over layers): for a sharded
    layer, what its attention recorded (the tail and the shards the queries routed to); for any other layer,
    every byte it holds (attention reads the whole layer)."""
    total = 0.0
    for layer in cache.layers:
        if isinstance(layer, ShardedKVLayer) and layer.has_shards:
            total += layer.bytes_read
        else:
            total += layer_nbytes(layer)
    return total


__all__ = [
    "ExpertShardedCache",
    "KVShard",
    "KVView",
    "PackedKVLayer",
    "PackedKVView",
    "ShardedKVLayer",
    "ShardedKVView",
    "cache_bytes_read",
    "cache_nbytes",
    "cache_nbytes_per_device",
    "layer_nbytes",
]
