"""QuantizationPress: store each layer's KV cache bit-packed (int8 / int4 / int2) after the prefill."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

from pikvpress.attention import enable_packed_attention
from pikvpress.cache import PackedKVLayer, cache_nbytes
from pikvpress.cache.packed_layer import Layout, check_head_dims, check_packing_args, default_group_size
from pikvpress.cache.support import check_cache
from pikvpress.models.adapter import language_model, layer_adapter

logger = logging.getLogger(__name__)


@dataclass
class QuantizationPress(BasePress):
    """Pack the KV cache: keys and values quantized to ``bits`` and stored as packed bytes.

    After the prefill (and any token-pruning press placed before it in a ``ComposedPress``), each
    full-attention layer's cache becomes a :class:`~pikvpress.cache.PackedKVLayer`: the older tokens
    quantized and packed (KIVI layout by default: keys per channel over groups of
    ``key_group_size`` tokens, values per token over groups of ``group_size`` channels; scales and
    zero points in ``stats_dtype``), the most recent ``residual_length`` or more tokens kept in full
    precision. Decoding appends to the residual and packs it a key group at a time. The model reads
    packed layers through pikvpress's attention function (``pikv_<base>``), which attends to the
    packed bytes without materialising the dequantized cache on GPU. Sliding-window layers (bounded
    already) stay dense. No token is removed: ``compression_ratio`` is 0.

    Bytes per element, overheads included: ``bits/8 + 2 * stats_bytes / group`` for each of keys
    (group ``key_group_size``) and values (group ``group_size``), plus the residual in full precision.

    Parameters
    ----------
    bits : int
        8, 4 or 2.
    group_size : int, optional
        Channels sharing one scale and zero point (values; keys too in the ``"per_token"`` layout): a power of
        two dividing every layer's key and value head dims. None (default): per layer, the largest power of two
        dividing both its head dims, at most 64 (:func:`~pikvpress.cache.packed_layer.default_group_size`).
    key_group_size : int
        Tokens sharing one key scale and zero point per channel (``"kivi"`` layout), and the number
        of tokens packed at a time. A power of two.
    residual_length : int
        Most recent tokens kept in full precision (>= 0); the residual holds between
        ``residual_length`` and ``residual_length + key_group_size - 1`` tokens.
    stats_dtype : torch.dtype
        torch.float16 or torch.bfloat16.
    layout : {"kivi", "per_token"}
        ``"kivi"`` (keys per channel, values per token) or ``"per_token"`` (both per token).

    Examples
    --------
    >>> press = ComposedPress([SnapKVPress(compression_ratio=0.5), QuantizationPress(bits=4)])
    >>> with press(model):
    ...     model(context_ids, past_key_values=cache)      # prune, then pack
    >>> cache_nbytes(cache)                                # bytes held, scales included
    """

    bits: int = 4
    group_size: int | None = None
    key_group_size: int = 128
    residual_length: int = 128
    stats_dtype: torch.dtype = torch.float16
    layout: Layout = "kivi"
    compression_ratio: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        check_packing_args(
            self.bits, self.group_size, self.key_group_size, self.residual_length, self.stats_dtype, self.layout
        )

    # ----------------------------------------------------------------------------------------------
    def post_init_from_model(self, model: nn.Module) -> None:
        """Check every layer's head dims against ``group_size`` and switch on packed attention."""
        self.__post_init__()
        for layer in language_model(model).layers:
            attention = layer.self_attn
            adapter = layer_adapter(attention)
            if adapter is not None:
                if adapter.is_sliding:
                    continue
                key_dim, value_dim = adapter.key_dim, adapter.value_dim
            else:
                key_dim = value_dim = int(attention.head_dim)
            group = self.group_size or default_group_size(key_dim, value_dim)
            check_head_dims(group, self.bits, key_dim, value_dim, f" of layer {attention.layer_idx}")
        enable_packed_attention(model)

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        cache = kwargs["past_key_values"]
        check_cache(cache, type(self).__name__, quantized=False)
        idx = module.layer_idx
        layer = cache.layers[idx]
        if isinstance(layer, PackedKVLayer) or getattr(layer, "is_sliding", False):
            return output
        cache.layers[idx] = self.pack(layer.keys, layer.values, module.config)
        return output

    def packing(self, key_dim: int | None = None, value_dim: int | None = None) -> dict[str, Any]:
        """The :class:`~pikvpress.cache.PackedKVLayer` arguments this press packs a layer with; ``group_size`` is
        resolved for a layer of these head dims when the press was given none (else left None)."""
        names = ("bits", "group_size", "key_group_size", "residual_length", "stats_dtype", "layout")
        packing = {name: getattr(self, name) for name in names}
        if packing["group_size"] is None and key_dim is not None and value_dim is not None:
            packing["group_size"] = default_group_size(key_dim, value_dim)
        return packing

    def pack(self, keys: torch.Tensor, values: torch.Tensor, config: Any = None) -> PackedKVLayer:
        """The packed layer this press stores for one layer's ``keys`` and ``values``; ``config`` is
        the model config whose attention implementation the layer checks when it is read."""
        return PackedKVLayer.from_dense(keys, values, **self.packing(keys.shape[-1], values.shape[-1]), config=config)

    @staticmethod
    def cache_nbytes(cache: Any) -> int:
        """Bytes ``cache`` holds (packed codes, scales, zero points, residuals, dense layers)."""
        return cache_nbytes(cache)
