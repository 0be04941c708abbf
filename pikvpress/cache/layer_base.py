"""What pikvpress's cache layers (packed, sharded) share: the attention switch, the tag, batch operations."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

#: attribute set on the tensors ``update`` returns, pointing at the layer they come from
LAYER_TAG = "_pikv_packed_layer"

#: the attention implementations whose functions read pikvpress's layers (pikvpress.attention), as
#: :func:`dispatch_key` names them
DISPATCHED: set[str] = set()


def tag_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``keys`` and ``values`` that tell pikvpress's attention function which layer they belong to."""
    keys, values = keys.view_as(keys), values.view_as(values)
    setattr(keys, LAYER_TAG, layer)
    setattr(values, LAYER_TAG, layer)
    return keys, values


def dispatch_key(impl: str | None, model_type: str | None) -> str:
    """How :data:`DISPATCHED` names an attention implementation: ``eager`` is each family's own function."""
    return f"eager:{model_type}" if impl in (None, "eager") else impl


class PiKVCacheLayer(CacheLayerMixin):
    """A cache layer that pikvpress's attention function reads itself (:mod:`pikvpress.attention`).

    ``update`` hands attention a part of the layer (the recent tokens) tagged with the layer
    (:meth:`tagged`) when the model's attention function reads pikvpress's layers (:meth:`attention_active`,
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
        """Whether the attention function of the model reading this layer reads pikvpress's layers."""
        config = self.config
        if config is None:
            return False
        return dispatch_key(getattr(config, "_attn_implementation", None), getattr(config, "model_type", None)) in DISPATCHED

    def tagged(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``keys`` and ``values`` that tell pikvpress's attention function which layer they belong to."""
        return tag_layer(self, keys, values)

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

    # ----------------------------------------------------------------------------------------------
    # what presses use, the same for every layer kind (dense layers: pikvpress.cache.ops)
    # ----------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the layer holds in this process, read from its tensors (codes, scales, indices included)."""
        raise NotImplementedError

    def read_nbytes(self) -> float:
        """Key/value bytes the last decode step read from this layer (this process): all it holds, unless the
        layer's attention reads a part of it."""
        return float(self.nbytes)

    def evict(self, order: torch.Tensor, budget: int) -> torch.Tensor:
        """Keep ``budget`` tokens per (batch row, KV head), the best by ``order`` ``(B, H, N)`` (the layer's sequence
        indices, best first); return the kept indices ``(B, H, K)``, increasing. The layer shrinks in place."""
        raise NotImplementedError

    def _map_batch(self, fn) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device), ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))
