"""Which caches pikvpress's presses work on, checked before a press changes anything."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer, QuantizedLayer

from pikvpress.cache.layer_base import PiKVCacheLayer


def check_cache(cache: Any, press: str, *, quantized: bool = True, layer_idx: int | None = None) -> None:
    """Raise ``ValueError`` naming ``cache``'s class and what ``press`` supports if it cannot work on ``cache``.

    Supported: a ``DynamicCache`` (its subclasses included, :class:`~pikvpress.ExpertShardedCache` too) whose layers
    are ``DynamicLayer`` s (sliding-window ones included) or pikvpress's packed and sharded layers; with
    ``quantized``, also transformers' ``QuantizedCache`` layers (read dequantized, as kvpress reads them). A
    ``StaticCache`` is refused: its layers have a fixed length that a press cannot shorten. ``layer_idx`` checks that
    layer only (a decode step), else every layer.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        _refuse(cache, press, quantized, "it holds no cache layers")
    checked = layers if layer_idx is None else [layers[layer_idx]]
    for layer in checked:
        if isinstance(layer, PiKVCacheLayer):
            continue
        if isinstance(layer, DynamicLayer) and (quantized or not isinstance(layer, QuantizedLayer)):
            continue
        _refuse(cache, press, quantized, f"its layers are {type(layer).__name__}")


def _refuse(cache: Any, press: str, quantized: bool, why: str) -> None:
    supported = "DynamicCache (or a subclass, ExpertShardedCache included)" + (", QuantizedCache" if quantized else "")
    raise ValueError(
        f"{press} cannot work on a {type(cache).__name__} ({why}); supported caches: {supported}. "
        "Pass past_key_values=DynamicCache(), or let the model create one (not cache_implementation='static')"
    )
