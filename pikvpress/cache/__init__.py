"""Where KV lives: packed (quantized) cache layers, and the bytes a cache holds.

:class:`PackedKVLayer` stores one layer's keys and values bit-packed with a full-precision residual;
:func:`cache_nbytes` reports the bytes any transformers cache holds, read from its tensors.
"""

from __future__ import annotations

import torch

from pikvpress.cache.packed_layer import PackedKVLayer, PackedKVView


def layer_nbytes(layer) -> int:
    """Bytes one cache layer holds: a packed layer's codes, scales, zeros and residual, or a dense
    layer's key and value tensors."""
    if isinstance(layer, PackedKVLayer):
        return layer.nbytes
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def cache_nbytes(cache) -> int:
    """Bytes held by every layer of a transformers ``Cache`` (packed layers included)."""
    return int(sum(layer_nbytes(layer) for layer in cache.layers))


__all__ = ["PackedKVLayer", "PackedKVView", "cache_nbytes", "layer_nbytes"]
