"""Several sequences' caches answered as one batch: :class:`PaddedKVLayer` (dense layers, left-padded) and
:class:`RowBatchedLayer` (any layer, the rows' own layers kept apart).

Dense layers (``DynamicLayer`` of one sequence each) stack into one :class:`PaddedKVLayer`: the rows are left-padded to
the longest, and the layer holds which of its positions are real (``valid``, ``(B, N)``; tokens fed while answering
are marked by :attr:`PaddedKVLayer.incoming`, so a left-padded question's padding stays masked). Its attention
(:func:`pikvpress.attention.padded_layer_attention`) masks every padded position, whatever mask the model built, and
keeps grouped-query attention grouped (transformers' SDPA path copies the keys per query head as soon as a mask is
given). Each layer carries its own padding, so the layers of one row may have different lengths (PyramidKV).

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
from transformers.cache_utils import DynamicLayer, QuantizedLayer

from pikvpress.cache.layer_base import PiKVCacheLayer, tag_layer
from pikvpress.cache.ops import layer_nbytes, layer_read_nbytes


def row_batch_blocker(layer: Any) -> str | None:
    """Why ``layer`` (one row's cache layer) cannot join a batch (:class:`RowBatchedLayer`, or :class:`PaddedKVLayer`
    when it is dense), or None if it can.

    Sliding-window layers are refused: their masks are built by the model from the cache's positions, which a batch
    shifts. Sharded layers spread over the ranks of a process group are refused too (every rank would have to run the
    per-row calls in the same order; untested).
    """
    if getattr(layer, "is_sliding", False):
        return f"a sliding-window layer ({type(layer).__name__})"
    group = getattr(layer, "group", None)
    if group is not None and getattr(group, "world_size", 1) > 1:
        return "a sharded layer spread over the ranks of a process group"
    if isinstance(layer, (RowBatchedLayer, PaddedKVLayer)):
        return "a layer that already holds a batch"
    if isinstance(layer, PiKVCacheLayer):
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
        raise TypeError("a RowBatchedLayer cannot reorder or select its rows this way: use select_rows")

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the rows ``rows`` (positions in the current batch, in the new order): the dropped rows' layers
        leave the batch untouched, the kept ones are read as before (a batch drops the rows whose answers have
        ended)."""
        if not rows:
            raise ValueError("a RowBatchedLayer keeps at least one row")
        self.rows = [self.rows[i] for i in rows]
        self.masked_key_indices = [self.masked_key_indices[i] for i in rows]
        self.step = [self.step[i] for i in rows] if len(self.step) > max(rows) else [None] * len(rows)
        self.incoming = None

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


class PaddedKVLayer(DynamicLayer):
    """The dense keys and values of ``B`` sequences, left-padded to one length, and which positions are real.

    Parameters
    ----------
    keys, values : torch.Tensor
        ``(B, H, N, D)`` and ``(B, H, N, Dv)``, every row's tokens at the right end.
    valid : torch.Tensor
        ``(B, N)`` bool: False at padded positions.

    Notes
    -----
    Before each forward, :attr:`incoming` (``(B, q)`` bool, None: all real) says which new tokens are real (a
    left-padded question's padding is not); :meth:`update` appends them, padding included, and extends
    :attr:`valid`. ``update`` returns the keys tagged with the layer, so that pikvpress's attention reads them with
    the padding masked (:func:`pikvpress.attention.padded_layer_attention`).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        super().__init__()
        if keys.shape[:3] != values.shape[:3] or tuple(valid.shape) != (keys.shape[0], keys.shape[2]):
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and valid {tuple(valid.shape)} disagree"
            )
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.valid = valid.to(keys.device, torch.bool)
        self.incoming: torch.Tensor | None = None
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # preallocated keys / values (reserve)

    def reserve(self, tokens: int) -> None:
        """Preallocate room for ``tokens`` more tokens, so that appending them writes in place instead of copying
        the whole layer at every step (``keys`` / ``values`` become views of the room)."""
        b, h, n, dk = self.keys.shape
        if tokens <= 0:
            return
        keys = self.keys.new_empty((b, h, n + tokens, dk))
        values = self.values.new_empty((b, h, n + tokens, self.values.shape[-1]))
        keys[:, :, :n], values[:, :, :n] = self.keys, self.values
        self._room = keys, values
        self.keys, self.values = keys[:, :, :n], values[:, :, :n]

    @classmethod
    def from_rows(cls, layers: list[Any]) -> PaddedKVLayer:
        """One layer holding ``layers`` (dense, one sequence each) as its rows, left-padded with zeros.

        Raises
        ------
        ValueError
            Naming the row whose layer is not a dense one-sequence layer, or whose shape, dtype or device differs.
        """
        for i, layer in enumerate(layers):
            reason = row_batch_blocker(layer)
            if reason is None and (isinstance(layer, PiKVCacheLayer) or not layer.is_initialized):
                reason = f"a {type(layer).__name__} (a PaddedKVLayer holds dense layers that hold tokens)"
            if reason is None and layer.keys.shape[0] != 1:
                reason = f"it holds {layer.keys.shape[0]} sequences"
            if reason is None and (
                layer.keys.shape[1::2] != layers[0].keys.shape[1::2]
                or layer.values.shape[1::2] != layers[0].values.shape[1::2]
                or layer.keys.dtype != layers[0].keys.dtype
                or layer.keys.device != layers[0].keys.device
            ):
                reason = "its heads, head dims, dtype or device differ from row 0's"
            if reason is not None:
                raise ValueError(f"row {i} cannot be padded into a batch: {reason}")
        lengths = [layer.keys.shape[2] for layer in layers]
        longest = max(lengths)
        first = layers[0]
        b, (_, h, _, dk), dv = len(layers), first.keys.shape, first.values.shape[-1]
        keys = first.keys.new_zeros((b, h, longest, dk))
        values = first.values.new_zeros((b, h, longest, dv))
        valid = torch.zeros((b, longest), dtype=torch.bool, device=first.keys.device)
        for i, (layer, n) in enumerate(zip(layers, lengths)):
            keys[i, :, longest - n :] = layer.keys[0]
            values[i, :, longest - n :] = layer.values[0]
            valid[i, longest - n :] = True
        return cls(keys, values, valid)

    @classmethod
    def concat(cls, layers: list[PaddedKVLayer], reserve: int = 0) -> PaddedKVLayer:
        """One layer holding the rows of ``layers``, in order, left-padded to the longest; ``reserve``: room for tokens
        to come (:meth:`reserve`). Every row keeps its real keys, values and validity, shifted right by the padding it
        gains (two batches whose answers ran long go on as one)."""
        if not layers:
            raise ValueError("nothing to concatenate")
        first = layers[0]
        for i, layer in enumerate(layers):
            if (
                layer.keys.shape[1::2] != first.keys.shape[1::2]
                or layer.values.shape[-1] != first.values.shape[-1]
                or layer.keys.dtype != first.keys.dtype
                or layer.keys.device != first.keys.device
            ):
                raise ValueError(f"layer {i}'s heads, head dims, dtype or device differ from layer 0's")
        longest = max(layer.keys.shape[2] for layer in layers)
        rows = sum(layer.valid.shape[0] for layer in layers)
        h, dk, dv = first.keys.shape[1], first.keys.shape[3], first.values.shape[3]
        room = longest + max(int(reserve), 0)
        keys = first.keys.new_zeros((rows, h, room, dk))
        values = first.values.new_zeros((rows, h, room, dv))
        valid = torch.zeros((rows, longest), dtype=torch.bool, device=first.valid.device)
        start = 0
        for layer in layers:
            b, n = layer.valid.shape[0], layer.keys.shape[2]
            keys[start : start + b, :, longest - n : longest] = layer.keys
            values[start : start + b, :, longest - n : longest] = layer.values
            valid[start : start + b, longest - n :] = layer.valid
            start += b
        out = cls(keys[:, :, :longest], values[:, :, :longest], valid)
        if reserve > 0:
            out._room = keys, values
        return out

    def select_rows(self, rows: list[int]) -> int:
        """Keep only the rows ``rows`` (positions in the current batch, in the new order), and drop the leading
        positions that are padding in every kept row; returns how many were dropped (the kept rows' positions move
        left by that many). The preallocated room is kept, so later appends still write in place.

        The kept rows' real keys and values, and their order, are unchanged: their attention reads the same positions
        (a batch drops the rows whose answers have ended, and the padding only the dropped rows needed)."""
        if not rows:
            raise ValueError("a PaddedKVLayer keeps at least one row")
        index = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        valid = self.valid.index_select(0, index)
        trim = int((~valid).cumprod(dim=1).sum(dim=1).min().item()) if valid.shape[1] else 0
        n = self.keys.shape[2]
        if self._room is not None:
            keys, values = self._room
        else:
            keys, values = self.keys, self.values
        keys = keys.index_select(0, index.to(keys.device))[:, :, trim:]
        values = values.index_select(0, index.to(values.device))[:, :, trim:]
        if self._room is not None:
            self._room = keys, values
        self.keys, self.values = keys[:, :, : n - trim], values[:, :, : n - trim]
        self.valid = valid[:, trim:]
        self.incoming = None
        return trim

    def padding(self) -> list[int]:
        """Each row's left padding (its padded positions before its first real token)."""
        return [int(n) for n in (~self.valid).cumprod(dim=1).sum(dim=1).tolist()]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens of every row and their validity (:attr:`incoming`); return every position's keys
        and values, tagged with the layer."""
        b, _, q, _ = key_states.shape
        real = self.incoming
        if real is None:
            real = torch.ones((b, q), dtype=torch.bool, device=self.valid.device)
        elif tuple(real.shape) != (b, q):
            raise ValueError(f"incoming must be ({b}, {q}) for {q} new tokens, got {tuple(real.shape)}")
        n = self.keys.shape[2]
        room = self._room
        if room is not None and n + q <= room[0].shape[2]:
            room[0][:, :, n : n + q] = key_states
            room[1][:, :, n : n + q] = value_states
            self.keys, self.values = room[0][:, :, : n + q], room[1][:, :, : n + q]
        else:
            self._room = None
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.valid = torch.cat([self.valid, real.to(self.valid.device, torch.bool)], dim=1)
        return tag_layer(self, self.keys, self.values)

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        self.valid = self.valid[:, : self.get_seq_length()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._room = None
        super().batch_repeat_interleave(repeats)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._room = None
        super().batch_select_indices(indices)
        self.valid = self.valid[indices.to(self.valid.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._room = None
        super().reorder_cache(beam_idx)
        self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def __repr__(self) -> str:
        return f"PaddedKVLayer(rows={self.valid.shape[0]}, length={self.get_seq_length()}, padding={self.padding()})"
