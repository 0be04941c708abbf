"""What pikvpress's cache layers (packed, sharded) share: the attention switch, the tag, batch operations."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

#: attribute set on the tensors ``update`` returns, pointing at the layer they come from
LAYER_TAG = "_pikv_packed_layer"

#: prefix of the attention implementations pikvpress registers (``pikv_sdpa``, ``pikv_eager``...)
ATTENTION_PREFIX = "pikv_"


class PiKVCacheLayer(CacheLayerMixin):
    """A cache layer that pikvpress's attention function reads itself (:mod:`pikvpress.attention`).

    ``update`` hands attention a part of the layer (the recent tokens) tagged with the layer
    (:meth:`tagged`) when the model runs a ``pikv_*`` attention implementation (:meth:`attention_active`,
    read from ``config``). Subclasses provide ``get_seq_length`` and ``_map_batch(fn)``, which applies ``fn``
    to the batch axis of every tensor they hold.
    """

    is_sliding = False
    is_compileable = False
    config: Any = None

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def attention_active(self) -> bool:
        """Whether the model reading this layer runs pikvpress's attention function."""
        impl = getattr(self.config, "_attn_implementation", None)
        return isinstance(impl, str) and impl.startswith(ATTENTION_PREFIX)

    def tagged(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``keys`` and ``values`` that tell pikvpress's attention function which layer they belong to."""
        keys, values = keys.view_as(keys), values.view_as(values)
        setattr(keys, LAYER_TAG, self)
        setattr(values, LAYER_TAG, self)
        return keys, values

    # ----------------------------------------------------------------------------------------------
    # keys / values: what kvpress reads and assigns (subclasses give _view, _dense and _assign)
    # ----------------------------------------------------------------------------------------------
    def _view(self, which: str) -> Any:
        """The layer's ``"keys"`` or ``"values"`` as kvpress sees them (a tensor or a view of the layer)."""
        raise NotImplementedError

    def _dense(self, which: str) -> torch.Tensor:
        """Every token's dense ``"keys"`` or ``"values"``, in sequence order."""
        raise NotImplementedError

    def _assign(self, which: str, value: Any) -> None:
        raise NotImplementedError

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(keys, values)`` of every token, in sequence order."""
        return self._dense("keys"), self._dense("values")

    @property
    def keys(self) -> Any:  # type: ignore[override]
        return self._view("keys") if self.is_initialized else None

    @keys.setter
    def keys(self, value: Any) -> None:
        self._assign("keys", value)

    @property
    def values(self) -> Any:  # type: ignore[override]
        return self._view("values") if self.is_initialized else None

    @values.setter
    def values(self, value: Any) -> None:
        self._assign("values", value)

    def _map_batch(self, fn) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device), ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))
