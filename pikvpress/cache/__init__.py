"""Where KV lives: packed (quantized) cache layers, expert-sharded cache layers, and the bytes a cache holds.

:class:`PackedKVLayer` stores one layer's keys and values bit-packed with a full-precision residual;
:class:`RaggedKVLayer` holds, in each (batch row, KV head), only the tokens a head-wise press kept there;
:class:`ShardedKVLayer` spreads them over shards (:class:`KVShard`) on several devices or ranks, and
:class:`ExpertShardedCache` is a cache made of such layers; :func:`cache_nbytes` reports the bytes any
transformers cache holds, read from its tensors. :class:`PaddedKVLayer` (dense layers, left-padded) and
:class:`RowBatchedLayer` (:func:`batch_rows`: packed and sharded layers, the rows' own) answer several sequences as one
batch.
"""

from __future__ import annotations

import torch

from pikvpress.cache.batched import PaddedKVLayer, RowBatchedLayer, batch_rows, row_batch_blocker
from pikvpress.cache.ops import evict, layer_nbytes, layer_read_nbytes, layer_tensor_nbytes
from pikvpress.cache.packed_layer import PackedKVLayer, PackedKVView
from pikvpress.cache.ragged_layer import RaggedKVLayer, RaggedKVView
from pikvpress.cache.shard import KVShard
from pikvpress.cache.sharded_cache import ExpertShardedCache
from pikvpress.cache.sharded_layer import ShardedKVLayer, ShardedKVView
from pikvpress.cache.sharding import ShardingOptions
from pikvpress.cache.view import KVView


def cache_nbytes(cache, float_dtype: torch.dtype | None = None) -> int:
    """Bytes held by every layer of a transformers ``Cache`` (packed layers included); with ``float_dtype``
    (``torch.bfloat16``), the bytes the same cache holds when its floating-point tensors are in that dtype
    (:func:`~pikvpress.cache.ops.layer_tensor_nbytes`: a bf16 run of the same tokens)."""
    if float_dtype is not None:
        return int(sum(layer_tensor_nbytes(layer, float_dtype) for layer in cache.layers))
    return int(sum(layer_nbytes(layer) for layer in cache.layers))


def cache_nbytes_per_device(cache) -> dict[str, int]:
    """Bytes a cache holds on each device (in this process)."""
    out: dict[str, int] = {}
    for layer in cache.layers:
        if hasattr(layer, "nbytes_per_device"):
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
    return float(sum(layer_read_nbytes(layer) for layer in cache.layers))


__all__ = [
    "ExpertShardedCache",
    "KVShard",
    "KVView",
    "PackedKVLayer",
    "PackedKVView",
    "PaddedKVLayer",
    "RaggedKVLayer",
    "RaggedKVView",
    "RowBatchedLayer",
    "ShardedKVLayer",
    "ShardedKVView",
    "ShardingOptions",
    "batch_rows",
    "cache_bytes_read",
    "cache_nbytes",
    "cache_nbytes_per_device",
    "evict",
    "layer_nbytes",
    "layer_read_nbytes",
    "row_batch_blocker",
]
