"""RaggedPress: a head-wise press's choice held as a ragged cache, so that what it removes leaves memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

import pikvpress.ragged_attention  # noqa: F401  (registers the attention over ragged layers)
from pikvpress.attention import enable_packed_attention
from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.ragged_layer import RaggedKVLayer

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
    its layer as it is.

    Parameters
    ----------
    press : BasePress
        The press whose choice is stored, e.g. ``AdaKVPress(SnapKVPress(0.5))``.

    Examples
    --------
    >>> press = RaggedPress(AdaKVPress(SnapKVPress(compression_ratio=0.5)))
    >>> with press(model):
    ...     model(context_ids, past_key_values=cache)
    >>> cache_nbytes(cache)  # half the tokens' bytes, plus per-head offsets and positions
    """

    press: BasePress

    def __post_init__(self) -> None:
        if not isinstance(self.press, BasePress):
            raise TypeError(f"press must be a kvpress BasePress, got {type(self.press).__name__}")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    def post_init_from_model(self, model: nn.Module) -> None:
        self.press.post_init_from_model(model)
        enable_packed_attention(model)

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        module.masked_key_indices = None  # what the wrapped press marks now, not what an earlier request left
        output = self.press.forward_hook(module, input, kwargs, output)
        masked = getattr(module, "masked_key_indices", None)
        if masked is None:
            return output
        module.masked_key_indices = None  # the ragged layer drops these tokens; nothing is left on the module
        cache = kwargs["past_key_values"]
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, PiKVCacheLayer):
            raise TypeError(
                f"RaggedPress wraps a press that leaves a dense layer; layer {module.layer_idx} holds a "
                f"{type(layer).__name__}"
            )
        keys, values = layer.keys, layer.values
        keep = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        batch_idx, head_idx, seq_idx = (i.to(keys.device) for i in masked)
        keep[batch_idx, head_idx, seq_idx] = False
        cache.layers[module.layer_idx] = RaggedKVLayer.from_kept(keys, values, keep, config=module.config)
        return output
