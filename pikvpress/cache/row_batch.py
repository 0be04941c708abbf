"""Several sequences' own cache layers answered as one batch: :class:`RowBatchedLayer`.

A packed layer (:class:`~pikvpress.cache.PackedKVLayer`) or a sharded one (:class:`~pikvpress.cache.ShardedKVLayer`)
cannot be stacked into one rectangular, left-padded batch that keeps every row's answer exactly what the row alone
would give, because *when* and *which* tokens such a layer packs or moves depends on the row's own token count:

- a packed layer packs whole groups of ``key_group_size`` tokens (KIVI keys are quantized per channel over such a
  group) once its residual reaches ``residual_length + key_group_size`` tokens. Left padding shifts the groups, and
  rows of different lengths would have to pack at different decode steps;
- a sharded layer splits its tokens into shards of equal length per row (``shard_counts`` of the row's own count),
  packs each shard's tokens in groups in shard order, and moves its tail's overflow to the shards in blocks of
  ``num_shards * flush_tokens`` tokens, again at row-specific steps.

Padding inside such a layer would change which tokens share a quantization group, which shard a token lands in and
when it leaves the full-precision tail, so the batched answer would differ from the row's own. Instead, a
:class:`RowBatchedLayer` holds the ``B`` rows' own layers, untouched: each row's layer receives only that row's real
new tokens (``incoming``; never a padding token), so it evolves exactly as it would alone (same packing steps, same
shard placement, same top-k routing), and the attention function (:func:`pikvpress.attention.row_batched_attention`)
attends each row's queries over that row's own layer with the row's own causal mask. Everything else of the model
(projections, MLPs, norms, the LM head) runs on the whole batch. Padded query positions get a zero output; padded
positions are never stored, so they can never receive attention.

The same layer also batches dense layers that cannot share one padding mask (a press that leaves a row's layers with
different lengths, such as PyramidKV), and carries each row's kvpress head-wise masked keys (AdaKV's
``module.masked_key_indices``), which its attention puts on the module for that row's call only.
"""

from __future__ import annotations

from typing import Any

import torch

from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.ops import layer_nbytes, layer_read_nbytes


def row_batch_blocker(layer: Any) -> str | None:
    """Why ``layer`` (one row's cache layer) cannot join a :class:`RowBatchedLayer`, or None if it can.

    Sliding-window layers are refused: their masks are built by the model from the cache's positions, which a batch
    shifts. Sharded layers spread over the ranks of a process group are refused too (every rank would have to run the
    per-row calls in the same order; untested).
    """
    from transformers.cache_utils import DynamicLayer, QuantizedLayer

    if getattr(layer, "is_sliding", False):
        return f"a sliding-window layer ({type(layer).__name__})"
    group = getattr(layer, "group", None)
    if group is not None and getattr(group, "world_size", 1) > 1:
        return "a sharded layer spread over the ranks of a process group"
    if isinstance(layer, PiKVCacheLayer) and not isinstance(layer, RowBatchedLayer):
        return None
    if isinstance(layer, DynamicLayer) and not isinstance(layer, QuantizedLayer):
        return None
    return f"a {type(layer).__name__} layer"


class RowBatchedLayer(PiKVCacheLayer):
    """The cache layers of ``B`` sequences (one per batch row), read as one batch of ``B`` rows.

    Parameters
    ----------
    rows : list
        Each row's own cache layer (batch size 1): a dense ``DynamicLayer``, a :class:`~pikvpress.cache.PackedKVLayer`
        or a :class:`~pikvpress.cache.ShardedKVLayer`. They are used in place (answering appends to them).
    masked_key_indices : list, optional
        Each row's kvpress head-wise masked keys for this layer (``(batch, head, seq)`` index tensors, as AdaKV leaves
        on the attention module after its prefill), or None per row.

    Notes
    -----
    Before each forward, :attr:`incoming` must say which of the new tokens are real for each row (``(B, q)`` bool;
    None: all of them): :meth:`update` gives each row's layer only its real tokens, in order, and attention reads each
    row's real queries against that row's layer (:func:`pikvpress.attention.row_batched_attention`). ``keys`` and
    ``values`` are not available on the batch: read a row's layer (``rows[i]``) instead.
    """

    def __init__(self, rows: list[Any], masked_key_indices: list[Any] | None = None):
        if not rows:
            raise ValueError("a RowBatchedLayer needs at least one row")
        for i, row in enumerate(rows):
            reason = row_batch_blocker(row)
            if reason is not None:
                raise ValueError(f"row {i} cannot be batched: {reason}")
            if getattr(row, "is_initialized", False) and _batch_size(row) not in (None, 1):
                raise ValueError(f"row {i}'s layer holds {_batch_size(row)} sequences; each row holds one")
        self.rows = list(rows)
        self.masked_key_indices = list(masked_key_indices) if masked_key_indices is not None else [None] * len(rows)
        if len(self.masked_key_indices) != len(rows):
            raise ValueError(f"{len(self.masked_key_indices)} masked_key_indices for {len(rows)} rows")
        self.config = next((getattr(r, "config", None) for r in rows if getattr(r, "config", None) is not None), None)
        self.incoming: torch.Tensor | None = None
        #: what each row's layer returned from its last update (None: the row had no real token)
        self.step: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(rows)
        #: the batch's sequence length (the longest row, plus every new token fed, padding included)
        self.length = max(row.get_seq_length() for row in rows)
        first = next((r for r in rows if getattr(r, "is_initialized", False)), None)
        self.dtype = getattr(first, "dtype", torch.float32)
        self.device = getattr(first, "device", torch.device("cpu"))
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def get_seq_length(self) -> int:
        return self.length

    def row_lengths(self) -> list[int]:
        """Each row's own sequence length."""
        return [row.get_seq_length() for row in self.rows]

    # ----------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Give each row's layer that row's real new tokens (:attr:`incoming`); return the new states tagged with this
        layer (attention reads each row's layer itself)."""
        b, _, q, _ = key_states.shape
        if b != self.batch_size:
            raise ValueError(f"a batch of {b} rows reached a RowBatchedLayer of {self.batch_size} rows")
        real = self.incoming
        if real is not None and tuple(real.shape) != (b, q):
            raise ValueError(f"incoming must be ({b}, {q}) for {q} new tokens, got {tuple(real.shape)}")
        self.step = []
        for i, row in enumerate(self.rows):
            if real is None:
                k, v = key_states[i : i + 1], value_states[i : i + 1]
            else:
                keep = real[i].to(key_states.device)
                if not bool(keep.any()):
                    self.step.append(None)
                    continue
                k, v = key_states[i : i + 1, :, keep], value_states[i : i + 1, :, keep]
            self.step.append(row.update(k, v, cache_kwargs))
        self.length += q
        return self.tagged(key_states, value_states)

    # ----------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes every row's layer holds."""
        return sum(layer_nbytes(row) for row in self.rows)

    def read_nbytes(self) -> float:
        """Key/value bytes the last decode step read from every row's layer."""
        return float(sum(layer_read_nbytes(row) for row in self.rows))

    def row_read_nbytes(self, row: int) -> float:
        """Key/value bytes the last decode step read from row ``row``'s layer (what that row alone reports)."""
        return layer_read_nbytes(self.rows[row])

    # ----------------------------------------------------------------------------------------------
    def _view(self, which: str) -> Any:
        raise TypeError(
            f"a RowBatchedLayer holds each row's own layer; read rows[i].{which} (rows of different lengths and "
            "layouts have no common tensor)"
        )

    _dense = _view

    def _assign(self, which: str, value: Any) -> None:
        raise TypeError(f"a RowBatchedLayer's {which} cannot be assigned; change rows[i] instead")

    def evict(self, order: torch.Tensor, budget: int) -> torch.Tensor:
        raise TypeError("a RowBatchedLayer is read-only for presses: evict inside each row's own layer")

    def crop(self, max_length: int) -> None:
        raise TypeError("a RowBatchedLayer cannot be cropped: crop each row's own layer")

    def _map_batch(self, fn) -> None:
        raise TypeError("a RowBatchedLayer cannot reorder or select its rows")

    def reset(self) -> None:
        for row in self.rows:
            row.reset()

    def __repr__(self) -> str:
        kinds = sorted({type(row).__name__ for row in self.rows})
        return f"RowBatchedLayer(rows={self.batch_size}, kinds={kinds}, lengths={self.row_lengths()})"


def _batch_size(layer: Any) -> int | None:
    """The batch size of a dense, packed or sharded layer's stored tensors (None if it stores none)."""
    for name in ("keys", "residual_keys", "tail_keys"):
        t = vars(layer).get(name)  # a dense layer's keys, a packed layer's residual, a sharded layer's tail
        if isinstance(t, torch.Tensor) and t.ndim == 4:
            return t.shape[0]
    return None


def batch_rows(layers: list[Any], masked_key_indices: list[Any] | None = None) -> RowBatchedLayer:
    """One layer reading ``layers`` (one per sequence, each of batch size 1) as the rows of one batch.

    The batch-combine operation of pikvpress's packed and sharded layers (and of dense layers whose rows cannot share
    one padding mask): see :class:`RowBatchedLayer` for why their rows stay separate and how padding never reaches
    them. ``masked_key_indices`` carries each row's kvpress head-wise masked keys for this layer.

    Raises
    ------
    ValueError
        Naming the row whose layer cannot be batched (:func:`row_batch_blocker`) and why.
    """
    return RowBatchedLayer(layers, masked_key_indices)
