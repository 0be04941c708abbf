"""RaggedPress: a head-wise press's choice held as a ragged cache, so that what it removes leaves memory."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

import pikvpress.ragged_attention  # noqa: F401  (registers the attention over ragged layers)
from pikvpress.attention import enable_packed_attention
from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.ragged_layer import RaggedKVLayer
from pikvpress.models.adapter import language_model
from pikvpress.presses.quantization_press import QuantizationPress

logger = logging.getLogger(__name__)


@dataclass
class RaggedPress(BasePress):
    """Run a head-wise press, then store each layer as a :class:`~pikvpress.cache.RaggedKVLayer`: every (batch row,
    KV head) holds exactly the tokens the press kept there.

    kvpress's head-wise presses (``AdaKVPress``, ``CriticalAdaKVPress``, ...) choose a different set of tokens in each
    KV head but keep the cache full size and mask the others during attention (``module.masked_key_indices``), so
    they free no memory. Wrapped in ``RaggedPress``, the same choice is held as a ragged layer: the masked tokens are
    dropped, the kept ones stored flat with per-head offsets, and attention reads each head's own tokens
    (:mod:`pikvpress.ragged_attention`), which equals the masked attention exactly. The wrapped press alone stays
    available as the masked comparison. A press that masks nothing (it removed tokens uniformly, or kept all) leaves
    its layer as it is. A press compressing in kvpress's per-layer hooks (AdaKV, CriticalAdaKV) has each layer made
    ragged in its hook; a press with its own context manager (``KVzipPress``, head-wise or layer-wise) when its
    context ends, in the cache its prefill filled.

    Parameters
    ----------
    press : BasePress
        The press whose choice is stored, e.g. ``AdaKVPress(SnapKVPress(0.5))``.
    compression : QuantizationPress, optional
        Pack the kept tokens (int8 / int4 / int2) in its ``"per_token"`` layout: each token's channels in groups of
        ``group_size`` with one scale and zero point each (``layout="kivi"`` groups tokens, which would straddle
        heads, and is refused). None: the kept tokens stay in the model's dtype.

    Examples
    --------
    >>> press = RaggedPress(AdaKVPress(SnapKVPress(compression_ratio=0.5)))
    >>> with press(model):
    ...     model(context_ids, past_key_values=cache)
    >>> cache_nbytes(cache)  # half the tokens' bytes, plus per-head offsets and positions
    """

    press: BasePress
    compression: QuantizationPress | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.press, BasePress):
            raise TypeError(f"press must be a kvpress BasePress, got {type(self.press).__name__}")
        if self.compression is not None:
            if not isinstance(self.compression, QuantizationPress):
                raise TypeError(f"compression must be a QuantizationPress, got {type(self.compression).__name__}")
            if self.compression.layout != "per_token":
                raise ValueError(
                    "a ragged body packs each token over groups of channels: give "
                    f"QuantizationPress(layout='per_token'), got layout={self.compression.layout!r}"
                )

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    @property
    def replays_with_hooks(self) -> bool:
        """Whether the wrapped press compresses in kvpress's per-layer hooks (then each layer becomes ragged in its
        hook, and a captured prefill can be replayed through them); a press with its own context manager (KVzip)
        marks its tokens when its context ends, and the layers become ragged then."""
        return _compresses_in_hooks(self.press)

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        if self.replays_with_hooks:
            with super().__call__(model):
                yield
            return
        caches: list[Any] = []

        def probe(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
            cache = kwargs.get("past_key_values")
            if cache is not None and not any(c is cache for c in caches):
                caches.append(cache)

        modules = _attention_modules(model)
        handles = [module.register_forward_hook(probe, with_kwargs=True) for module in modules]
        try:
            with self.press(model):
                enable_packed_attention(model)
                yield
        finally:
            for handle in handles:
                handle.remove()
        for cache in caches:
            for module in modules:
                _store_ragged(module, cache, self.compression)

    def post_init_from_model(self, model: nn.Module) -> None:
        self.press.post_init_from_model(model)
        if self.compression is not None:
            self.compression.post_init_from_model(model)  # checks every layer's head dims against its groups
        enable_packed_attention(model)

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        module.masked_key_indices = None  # what the wrapped press marks now, not what an earlier request left
        output = self.press.forward_hook(module, input, kwargs, output)
        _store_ragged(module, kwargs["past_key_values"], self.compression)
        return output


def _compresses_in_hooks(press: BasePress) -> bool:
    return type(press).__call__ is BasePress.__call__


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in language_model(model).layers]


def _store_ragged(module: nn.Module, cache: Any, compression: QuantizationPress | None = None) -> None:
    """Replace layer ``module.layer_idx`` of ``cache`` by a ragged layer of the tokens its press did not mask
    (``module.masked_key_indices``), packed as ``compression`` packs, and clear the mask; a layer with no mask is
    left as it is."""
    masked = getattr(module, "masked_key_indices", None)
    if masked is None or module.layer_idx >= len(cache.layers):
        return
    layer = cache.layers[module.layer_idx]
    if getattr(layer, "is_sliding", False):  # a window layer keeps its own tokens; the press's mask stays (kvpress's)
        return
    module.masked_key_indices = None  # the ragged layer drops these tokens; nothing is left on the module
    if isinstance(layer, PiKVCacheLayer):
        raise TypeError(
            f"RaggedPress wraps a press that leaves a dense layer; layer {module.layer_idx} holds a "
            f"{type(layer).__name__}"
        )
    keys, values = layer.keys, layer.values
    keep = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    batch_idx, head_idx, seq_idx = (i.to(keys.device) for i in masked)
    keep[batch_idx, head_idx, seq_idx] = False
    packing = None
    if compression is not None:
        packing = compression.packing(keys.shape[-1], values.shape[-1])
        packing = {name: packing[name] for name in ("bits", "group_size", "stats_dtype")}
    cache.layers[module.layer_idx] = RaggedKVLayer.from_kept(keys, values, keep, config=module.config, packing=packing)
