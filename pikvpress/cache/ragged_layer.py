"""A transformers cache layer in which every (batch row, KV head) holds exactly the tokens its press kept.

Head-wise presses (AdaKV, CriticalAdaKV, KVzip's head-wise mode, head-wise routing) choose a different set of tokens
in each KV head. kvpress keeps the cache full size and masks the others (``masked_key_indices``); this layer holds the
kept tokens and nothing else::

    body: keys (N, Dk), values (N, Dv)  the kept tokens of all heads, flat, head after head (batch row, KV head);
                                        dense, or packed (int8/int4/int2, each token's channels in groups)
          offsets (B * Hkv + 1,) int64  where each head starts (FlashAttention's cu_seqlens)
          positions (N,) int16 | int32  each kept token's index in the sequence it was kept from
    tail: keys (B, Hkv, T, Dk), values  the tokens appended after compression (the question, the answer), dense

Outside, the layer looks like kvpress's masked version of the same press: its sequence is the ``body_length``
positions the press saw followed by the tail (``get_seq_length``), its ``keys`` / ``values`` are views of that
sequence (:meth:`RaggedKVLayer._dense` scatters the kept tokens to their positions, zeros elsewhere, and
:meth:`RaggedKVLayer.dense_keep` says which are kept), and cropping it (``layer.keys = layer.keys[:, :, :n]``, as
kvpress's pipeline removes an answer) drops the positions from ``n`` on. Attention over it (the model's attention
function, once :func:`~pikvpress.enable_packed_attention` has named it) reads the body with
:func:`~pikvpress.kernels.ragged_reference.ragged_attention_partial` and the tail densely, merged by log-sum-exp, so
its outputs are those of dense attention over exactly the kept tokens. Any other attention function would read the
zeros as tokens: :meth:`RaggedKVLayer.update` refuses it.
"""

from __future__ import annotations

from typing import Any

import torch

from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.view import KVView
from pikvpress.kernels.quantize import ALLOWED_BITS, ALLOWED_STATS_DTYPES, QuantizedTensor, dequantize, quantize_values
from pikvpress.kernels.ragged_reference import ragged_lengths, ragged_offsets, ragged_rows


def position_dtype(length: int) -> torch.dtype:
    """The integer dtype of the positions of a body of ``length`` positions: int16 below 32768, else int32."""
    return torch.int16 if length <= torch.iinfo(torch.int16).max + 1 else torch.int32


class RaggedKVView(KVView):
    """The keys or values of a :class:`RaggedKVLayer`, as a lazy, sliceable stand-in for its dense, masked view."""

    hint = (
        "A ragged layer holds a different number of tokens in each head; call .dequantize() on the view for the "
        "dense tensor with the dropped tokens zeroed (layer.dense_keep() tells which are kept)."
    )


class RaggedKVLayer(PiKVCacheLayer):
    """A cache layer holding, for each (batch row, KV head), only the tokens kept there, plus a dense tail.

    Parameters
    ----------
    config : transformers.PretrainedConfig, optional
        The model config: ``update`` hands attention the tail tagged with this layer when the model's attention
        implementation reads pikvpress's layers, and refuses any other.
    packing : dict, optional
        ``{"bits", "group_size", "stats_dtype"}``: the body is packed, keys and values each token over groups of
        ``group_size`` channels (:class:`~pikvpress.QuantizationPress`'s ``"per_token"`` layout; KIVI's groups of
        tokens would straddle heads). None: the body is dense. The tail is always dense.

    Build one with :meth:`from_kept` (a dense layer and which tokens each head keeps).
    """

    def __init__(self, config: Any = None, packing: dict[str, Any] | None = None):
        if packing is not None:
            check_ragged_packing(packing)
        self.config = config
        self.packing = None if packing is None else dict(packing)
        self.is_initialized = False
        self.dtype: torch.dtype = torch.float32
        self.device: torch.device = torch.device("cpu")
        self.batch = 0
        self.kv_heads = 0
        self.body_length = 0
        self.body_keys: torch.Tensor | QuantizedTensor | None = None
        self.body_values: torch.Tensor | QuantizedTensor | None = None
        self.offsets: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_kept(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        config: Any = None,
        packing: dict[str, Any] | None = None,
    ) -> RaggedKVLayer:
        """A layer holding the tokens of ``keys`` ``(B, Hkv, T, Dk)`` and ``values`` ``(B, Hkv, T, Dv)`` where
        ``keep`` ``(B, Hkv, T)`` (bool) is True, each head's in sequence order; the body spans the ``T`` positions.

        The inputs are not modified; the layer holds copies of the kept tokens only.
        """
        if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys and values must be (batch, kv_heads, tokens, dim) with equal first three dims, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if keep.dtype != torch.bool or keep.shape != keys.shape[:3]:
            raise ValueError(
                f"keep must be a bool tensor of shape {tuple(keys.shape[:3])}, got {keep.dtype} {tuple(keep.shape)}"
            )
        layer = cls(config=config, packing=packing)
        b, h, t, dk = keys.shape
        keep = keep.to(keys.device)
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.batch, layer.kv_heads, layer.body_length = b, h, t
        # (N, D): boolean indexing walks (b, h, t) row-major, so head after head
        layer.body_keys = layer._store(keys[keep])
        layer.body_values = layer._store(values[keep])
        layer.offsets = ragged_offsets(keep.sum(-1))
        layer.positions = keep.nonzero()[:, 2].to(position_dtype(t))
        layer.tail_keys = keys.new_empty((b, h, 0, dk))
        layer.tail_values = values.new_empty((b, h, 0, values.shape[-1]))
        layer.is_initialized = True
        return layer

    @classmethod
    def from_indices(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        config: Any = None,
        packing: dict[str, Any] | None = None,
    ) -> RaggedKVLayer:
        """A layer keeping, in head ``(b, h)``, the first ``counts[b, h]`` of ``indices[b, h]`` ``(B, Hkv, K)``
        (sequence indices, distinct within a head, any order)."""
        b, h, t = keys.shape[:3]
        k = indices.shape[-1]
        chosen = torch.arange(k, device=indices.device) < counts[..., None].to(indices.device)
        keep = torch.zeros((b, h, t), dtype=torch.bool, device=keys.device)
        keep.scatter_(2, indices.to(keys.device, torch.int64), chosen.to(keys.device))
        return cls.from_kept(keys, values, keep, config=config, packing=packing)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        empty = torch.zeros((b, h, 0), dtype=torch.bool, device=key_states.device)
        built = self.from_kept(
            key_states[:, :, :0], value_states[:, :, :0], empty, config=self.config, packing=self.packing
        )
        self.__dict__.update(built.__dict__)

    # ----------------------------------------------------------------------------------------------
    # the body's storage: dense rows, or packed ones
    # ----------------------------------------------------------------------------------------------
    def _store(self, flat: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """Flat tokens ``(N, D)`` as the body stores them."""
        if self.packing is None:
            return flat
        p = self.packing
        return quantize_values(flat.reshape(1, 1, *flat.shape), p["bits"], p["group_size"], p["stats_dtype"])

    def flat(self, which: str) -> torch.Tensor:
        """The body's ``"keys"`` or ``"values"`` as dense flat rows ``(N, D)`` (a packed body dequantized)."""
        body = self.body_keys if which == "keys" else self.body_values
        if isinstance(body, QuantizedTensor):
            return dequantize(body, self.dtype).view(body.shape[2], body.shape[3])
        return body

    @staticmethod
    def _rows(body: torch.Tensor | QuantizedTensor, rows: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """The body's flat rows ``rows`` (indices or a bool mask), in the same storage."""
        if not isinstance(body, QuantizedTensor):
            return body[rows.to(body.device)]
        rows = rows.to(body.packed.device)
        packed, scale, zero = (t[:, :, rows] for t in (body.packed, body.scale, body.zero))
        shape = (1, 1, packed.shape[2], body.shape[3])
        return QuantizedTensor(packed, scale, zero, body.bits, body.group_size, body.layout, shape)

    def _select_rows(self, rows: torch.Tensor) -> None:
        self.body_keys = self._rows(self.body_keys, rows)
        self.body_values = self._rows(self.body_values, rows)
        self.positions = self.positions[rows.to(self.positions.device)]

    @staticmethod
    def _body_nbytes(body: torch.Tensor | QuantizedTensor | None) -> int:
        if body is None:
            return 0
        return body.nbytes if isinstance(body, QuantizedTensor) else body.numel() * body.element_size()

    # ----------------------------------------------------------------------------------------------
    # lengths and bytes
    # ----------------------------------------------------------------------------------------------
    @property
    def head_lengths(self) -> torch.Tensor:
        """Tokens each (batch row, KV head) holds in the body, ``(B, Hkv)``."""
        return ragged_lengths(self.offsets).view(self.batch, self.kv_heads)

    @property
    def tail_length(self) -> int:
        """Tokens in the dense tail (appended after compression)."""
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    def get_seq_length(self) -> int:
        return self.body_length + self.tail_length if self.is_initialized else 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the kept tokens' keys and values (codes, scales and zeros when packed), their offsets and
        positions, and the tail."""
        tensors = (self.offsets, self.positions, self.tail_keys, self.tail_values)
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + self._body_nbytes(self.body_keys) + self._body_nbytes(self.body_values)

    # ----------------------------------------------------------------------------------------------
    # keys / values as views of the masked sequence
    # ----------------------------------------------------------------------------------------------
    def _head_of_token(self) -> torch.Tensor:
        """The (batch row * Hkv + KV head) of every body token, ``(N,)``."""
        heads = torch.arange(self.batch * self.kv_heads, device=self.offsets.device)
        return torch.repeat_interleave(heads, ragged_lengths(self.offsets), output_size=self.positions.shape[0])

    def _dense_shape(self, which: str) -> tuple[int, int, int, int]:
        tail = self.tail_keys if which == "keys" else self.tail_values
        if tail is None:
            return (0, 0, 0, 0)
        return (self.batch, self.kv_heads, self.get_seq_length(), tail.shape[-1])

    def _dense(self, which: str) -> torch.Tensor:
        """The body scattered to its positions (zeros where a head dropped the token), then the tail."""
        body = self.flat(which)
        tail = self.tail_keys if which == "keys" else self.tail_values
        rows = self.batch * self.kv_heads
        out = body.new_zeros((rows * self.body_length, body.shape[-1]))
        index = self._head_of_token().to(body.device) * self.body_length + self.positions.to(body.device, torch.int64)
        out.index_copy_(0, index, body)
        out = out.view(self.batch, self.kv_heads, self.body_length, body.shape[-1])
        return torch.cat([out, tail], dim=2)

    def dense_keep(self) -> torch.Tensor:
        """``(B, Hkv, body_length + tail_length)`` bool: which positions of the dense view hold a kept token."""
        rows = self.batch * self.kv_heads
        keep = torch.zeros(rows * self.body_length, dtype=torch.bool, device=self.device)
        index = self._head_of_token().to(self.device) * self.body_length + self.positions.to(self.device, torch.int64)
        keep[index] = True
        keep = keep.view(self.batch, self.kv_heads, self.body_length)
        tail = torch.ones((self.batch, self.kv_heads, self.tail_length), dtype=torch.bool, device=self.device)
        return torch.cat([keep, tail], dim=2)

    def _view(self, which: str) -> RaggedKVView:
        return RaggedKVView(self, which, self.get_seq_length())

    def _assign(self, which: str, value: Any) -> None:
        if value is None:
            self.reset()
            return
        if isinstance(value, RaggedKVView) and value.layer is self and value.which == which:
            self.crop(value.length)
            return
        raise TypeError(
            f"a RaggedKVLayer's {which} can only be cropped (layer.{which} = layer.{which}[:, :, :n]); got "
            f"{type(value).__name__}. To store new tensors, build a new layer with RaggedKVLayer.from_kept(...)."
        )

    # ----------------------------------------------------------------------------------------------
    # appending and reading
    # ----------------------------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append tokens ``(B, Hkv, n, Dk|Dv)`` to the tail (every head receives them)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.tail_keys = torch.cat([self.tail_keys, key_states.to(self.device, self.dtype)], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states.to(self.device, self.dtype)], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens; return the tail tagged with this layer for pikvpress's attention function.

        Raises ``RuntimeError`` when the model's attention function does not read pikvpress's layers: it would
        attend to the dense view's zeros.
        """
        self.append(key_states, value_states)
        if not self.attention_active():
            raise RuntimeError(
                "a RaggedKVLayer is read by attention implementation "
                f"{getattr(self.config, '_attn_implementation', None)!r}, which would attend to the tokens its heads "
                "dropped; call pikvpress.enable_packed_attention(model) first (the ragged presses do)."
            )
        return self.tagged(self.tail_keys, self.tail_values)

    # ----------------------------------------------------------------------------------------------
    # cropping, batch ops, reset
    # ----------------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop ``-max_length`` from the end): the tail is cut
        first, then every body token at a position from ``max_length`` on."""
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        max_length = max(0, max_length)
        if self.get_seq_length() <= max_length:
            return
        if max_length >= self.body_length:
            cut = max_length - self.body_length
            self.tail_keys = self.tail_keys[:, :, :cut].clone()
            self.tail_values = self.tail_values[:, :, :cut].clone()
            return
        kept = self.positions < max_length
        heads = self._head_of_token()
        counts = torch.zeros(self.batch * self.kv_heads, dtype=torch.int64, device=self.offsets.device)
        counts.index_add_(0, heads[kept.to(heads.device)], torch.ones_like(heads[kept.to(heads.device)]))
        self._select_rows(kept)
        self.offsets = ragged_offsets(counts)
        self.body_length = max_length
        self.tail_keys = self.tail_keys[:, :, :0].clone()
        self.tail_values = self.tail_values[:, :, :0].clone()

    def _map_batch(self, fn) -> None:
        """Apply a batch-axis operation (select, repeat, reorder rows) to the tail and, head by head, to the body."""
        rows = fn(torch.arange(self.batch, device=self.offsets.device))
        heads = (rows[:, None] * self.kv_heads + torch.arange(self.kv_heads, device=rows.device)).reshape(-1)
        self._select_rows(ragged_rows(self.offsets, heads))
        self.offsets = ragged_offsets(ragged_lengths(self.offsets)[heads])
        self.batch = int(rows.shape[0])
        self.tail_keys = fn(self.tail_keys)
        self.tail_values = fn(self.tail_values)

    def evict(self, order: torch.Tensor, budget: int) -> torch.Tensor:
        """Keep, in every (batch row, KV head), the first ``budget`` of the tokens it holds in ``order`` ``(B, H, N)``
        (positions of the layer's sequence, best first; a head holding fewer keeps them all); the tail joins the body.

        The layer's sequence is then cut to the positions some head still holds, returned as ``(B, H, K)``
        (increasing, the same for every head: a head may hold none of some of them), so that a caller's per-position
        statistics are compacted with it.
        """
        n = self.get_seq_length()
        held = self.dense_keep()
        held_in_order = held.gather(-1, order)
        chosen = held_in_order & (held_in_order.cumsum(-1) <= budget)
        keep = torch.zeros_like(held).scatter_(-1, order, chosen)
        columns = keep.reshape(-1, n).any(0).nonzero().squeeze(-1)  # positions some head still holds
        keys = self._dense("keys").index_select(2, columns.to(self.device))
        values = self._dense("values").index_select(2, columns.to(self.device))
        built = self.from_kept(keys, values, keep.index_select(2, columns), config=self.config, packing=self.packing)
        self.__dict__.update(built.__dict__)
        return columns.view(1, 1, -1).expand(self.batch, self.kv_heads, -1)

    def reset(self) -> None:
        """Drop every token (the layer stays initialised, with its dtype, device and shape)."""
        if self.body_keys is None:
            return
        self._select_rows(torch.zeros(0, dtype=torch.int64))
        self.offsets = torch.zeros_like(self.offsets)
        self.body_length = 0
        self.tail_keys = self.tail_keys[:, :, :0].clone()
        self.tail_values = self.tail_values[:, :, :0].clone()

    def __repr__(self) -> str:
        held = int(self.positions.shape[0]) if self.positions is not None else 0
        packed = "" if self.packing is None else f", int{self.packing['bits']}"
        return (
            f"RaggedKVLayer(batch={self.batch}, kv_heads={self.kv_heads}, body={self.body_length} positions, "
            f"{held} kept{packed}, tail={self.tail_length}, nbytes={self.nbytes})"
        )


def check_ragged_packing(packing: dict[str, Any]) -> None:
    """Validate a ragged body's packing; raise ``ValueError`` naming the key and the allowed values."""
    if set(packing) != {"bits", "group_size", "stats_dtype"}:
        raise ValueError(f"packing must have the keys bits, group_size and stats_dtype, got {sorted(packing)}")
    bits, group, stats = packing["bits"], packing["group_size"], packing["stats_dtype"]
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"packing bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or group & (group - 1):
        raise ValueError(f"packing group_size must be a positive power of two, got {group!r}")
    if stats not in ALLOWED_STATS_DTYPES:
        raise ValueError(f"packing stats_dtype must be one of {ALLOWED_STATS_DTYPES}, got {stats!r}")
