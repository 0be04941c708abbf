"""A transformers cache layer that stores a layer's keys and values packed (int8/int4/int2).

Tokens live in two parts, in sequence order::

    [ packed: tokens 0 .. P-1 ]  [ residual: tokens P .. P+R'-1, full precision ]

``P`` is a multiple of ``key_group_size`` (keys are quantized per channel over groups of that many
tokens, KIVI); the residual holds the most recent tokens, at least ``residual_length`` of them once
the layer has that many, and fewer than ``residual_length + key_group_size``. When appending makes the
residual reach ``residual_length + key_group_size`` tokens, its oldest ``key_group_size`` tokens are
quantized, packed and appended to the packed part, and the full-precision copies are freed.

Decoding reads the packed part with :func:`pikvpress.kernels.packed_attention_split_partials` (never
materialising the dequantized cache on GPU) and the residual densely; the two partial attentions are
merged exactly by log-sum-exp (:mod:`pikvpress.attention`). ``update`` therefore returns only the
residual (tagged with this layer) when pikvpress's attention function is active for the model, and
the fully dequantized keys and values otherwise, so that any other attention function stays correct.

``keys`` and ``values`` are :class:`PackedKVView` objects rather than tensors: they report the shape,
dtype and device of the full sequence, can be sliced along the token axis (``layer.keys[:, :, :n]``)
and assigned back to crop the layer, which is what kvpress's pipeline does to remove an answer from
the cache. ``view.dequantize()`` returns the dense tensor.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.view import KVView
from pikvpress.kernels.quantize import (
    ALLOWED_BITS,
    ALLOWED_STATS_DTYPES,
    QuantizedTensor,
    dequantize,
    quantize_keys,
    quantize_values,
)

logger = logging.getLogger(__name__)

Layout = Literal["kivi", "per_token"]
LAYOUTS: tuple[str, ...] = ("kivi", "per_token")


def _is_pow2(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


def check_packing_args(
    bits: Any, group_size: Any, key_group_size: Any, residual_length: Any, stats_dtype: Any, layout: Any
) -> None:
    """Validate packing arguments; raise ``ValueError`` naming the argument and the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be an int in {ALLOWED_BITS}, got {bits!r}")
    if group_size is not None and not _is_pow2(group_size):
        raise ValueError(f"group_size must be None (follow each layer's head dims) or a positive power of two, got {group_size!r}")
    if not _is_pow2(key_group_size):
        raise ValueError(f"key_group_size must be a positive power of two, got {key_group_size!r}")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
    if stats_dtype not in ALLOWED_STATS_DTYPES:
        raise ValueError(f"stats_dtype must be one of {ALLOWED_STATS_DTYPES}, got {stats_dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


#: the largest channel group :func:`default_group_size` picks
MAX_DEFAULT_GROUP = 64


def default_group_size(key_dim: int, value_dim: int) -> int:
    """The channel group of a layer whose ``group_size`` was not given: the largest power of two dividing both head
    dims, at most ``MAX_DEFAULT_GROUP`` (Phi-3's 96 -> 32, 80 -> 16, MLA's 192 / 128 -> 64)."""
    both = key_dim | value_dim
    return min(MAX_DEFAULT_GROUP, both & -both)


def check_head_dims(group_size: int, bits: int, key_dim: int, value_dim: int, where: str = "") -> None:
    """Raise ``ValueError`` if ``group_size`` cannot group the channels of ``key_dim`` / ``value_dim``."""
    for name, dim in (("key", key_dim), ("value", value_dim)):
        if dim % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {name} head dim {dim}{where}; "
                f"use a power of two that divides {dim}"
            )
        if (dim * bits) % 8:
            raise ValueError(f"bits={bits} cannot pack the {name} head dim {dim}{where} into whole bytes")


class PackedKVView(KVView):
    """The keys or values of a :class:`PackedKVLayer`, as a lazy, sliceable stand-in for a tensor.

    Slicing along the token axis (``view[:, :, :n]``, ``view[..., :n, :]``) returns a shorter view;
    assigning a view of a layer back to that layer's ``keys`` / ``values`` crops the layer to it.
    ``dequantize()`` materialises the dense tensor. Passing a view to a torch function raises a
    ``TypeError`` that says what to do instead.
    """

    hint = (
        "Packed layers are written by QuantizationPress, which must be the last press of a ComposedPress; "
        "call .dequantize() on the view for a dense copy."
    )

    def __repr__(self) -> str:
        return f"PackedKVView({self.which}, shape={tuple(self.shape)}, bits={self.layer.bits})"


class PackedKVLayer(PiKVCacheLayer):
    """A cache layer holding keys and values quantized and bit-packed, plus a full-precision residual.

    Parameters
    ----------
    bits : int
        Bits per stored element: 8, 4 or 2.
    group_size : int
        Channels per value quantization group (and per key group in the ``"per_token"`` layout); a
        power of two dividing the head dims.
    key_group_size : int
        Tokens per key quantization group in the ``"kivi"`` layout, and the number of tokens moved
        from the residual to the packed part at a time (both layouts); a power of two.
    residual_length : int
        Most recent tokens always kept in full precision (>= 0).
    stats_dtype : torch.dtype
        dtype of the scales and zero points (float16 or bfloat16).
    layout : {"kivi", "per_token"}
        ``"kivi"``: keys per channel over token groups, values per token over channel groups (KIVI);
        ``"per_token"``: keys and values both per token over channel groups.
    config : transformers.PretrainedConfig, optional
        The model config; ``update`` returns only the residual when its attention implementation is
        pikvpress's (``pikv_*``), and dense dequantized tensors otherwise.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        key_group_size: int = 128,
        residual_length: int = 128,
        stats_dtype: torch.dtype = torch.float16,
        layout: Layout = "kivi",
        config: Any = None,
    ):
        check_packing_args(bits, group_size, key_group_size, residual_length, stats_dtype, layout)
        self.bits = bits
        self.group_size = group_size
        self.key_group_size = key_group_size
        self.residual_length = residual_length
        self.stats_dtype = stats_dtype
        self.layout = layout
        self.config = config
        self.is_initialized = False
        self.dtype: torch.dtype = torch.float32
        self.device: torch.device = torch.device("cpu")
        self.packed_keys: QuantizedTensor | None = None
        self.packed_values: QuantizedTensor | None = None
        self.residual_keys: torch.Tensor | None = None
        self.residual_values: torch.Tensor | None = None
        self._packed_len_keys = 0
        self._packed_len_values = 0
        self._warned_dense = False

    # ----------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, **kwargs: Any) -> PackedKVLayer:
        """A layer holding ``keys`` ``(B, Hkv, T, Dk)`` and ``values`` ``(B, Hkv, T, Dv)``, packed.

        All checks run before anything is stored; the inputs are not modified.
        """
        layer = cls(**kwargs)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError("keys and values must be tensors")  # noqa: TRY004
        if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys and values must be (batch, kv_heads, tokens, dim) with equal first three dims, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if not keys.is_floating_point() or keys.dtype != values.dtype:
            raise ValueError(f"keys and values must share one floating dtype, got {keys.dtype} and {values.dtype}")
        check_head_dims(layer.group_size, layer.bits, keys.shape[-1], values.shape[-1])
        layer.lazy_initialization(keys, values)
        layer.residual_keys = keys
        layer.residual_values = values
        layer._flush()
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        self.residual_keys = key_states.new_empty((b, h, 0, dk))
        self.residual_values = value_states.new_empty((b, h, 0, dv))
        self.is_initialized = True

    # ----------------------------------------------------------------------------------------------
    # lengths and bytes
    # ----------------------------------------------------------------------------------------------
    @property
    def packed_length(self) -> int:
        """Tokens in the packed part."""
        return self._packed_len_keys

    @property
    def residual_length_now(self) -> int:
        """Tokens in the full-precision residual."""
        return 0 if self.residual_keys is None else self.residual_keys.shape[2]

    def get_seq_length(self) -> int:
        return self._packed_len_keys + self.residual_length_now if self.is_initialized else 0

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points, and the residual, from the tensors."""
        total = 0
        for qt in (self.packed_keys, self.packed_values):
            if qt is not None:
                total += qt.nbytes
        for t in (self.residual_keys, self.residual_values):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ----------------------------------------------------------------------------------------------
    # keys / values as views
    # ----------------------------------------------------------------------------------------------
    def _dense_shape(self, which: str) -> tuple[int, int, int, int]:
        res = self.residual_keys if which == "keys" else self.residual_values
        if res is None:
            return (0, 0, 0, 0)
        b, h, _, d = res.shape
        return (b, h, self._packed_len(which) + res.shape[2], d)

    def _packed_len(self, which: str) -> int:
        return self._packed_len_keys if which == "keys" else self._packed_len_values

    def _dense(self, which: str) -> torch.Tensor:
        """The packed part dequantized, then the residual."""
        qt = self.packed_keys if which == "keys" else self.packed_values
        res = self.residual_keys if which == "keys" else self.residual_values
        if qt is None:
            return res
        return torch.cat([dequantize(qt, self.dtype), res], dim=2)

    def _view(self, which: str) -> PackedKVView:
        return PackedKVView(self, which, self._dense_shape(which)[2])

    def _assign(self, which: str, value: Any) -> None:
        if value is None:
            self.reset()
            return
        if isinstance(value, PackedKVView) and value.layer is self and value.which == which:
            self._crop_one(which, value.length)
            return
        raise TypeError(
            f"a PackedKVLayer's {which} can only be cropped (layer.{which} = layer.{which}[:, :, :n]); "
            f"got {type(value).__name__}. To store new dense tensors, build a new layer with "
            "PackedKVLayer.from_dense(keys, values, ...)."
        )

    # ----------------------------------------------------------------------------------------------
    # packing
    # ----------------------------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor, which: str) -> QuantizedTensor:
        if which == "keys" and self.layout == "kivi":
            return quantize_keys(x.contiguous(), self.bits, self.key_group_size, self.stats_dtype)
        return quantize_values(x.contiguous(), self.bits, self.group_size, self.stats_dtype)

    def _flush(self) -> None:
        """Move whole key groups from the residual to the packed part while it is over its bound."""
        assert self.residual_keys is not None and self.residual_values is not None
        n = self.residual_keys.shape[2]
        g = self.key_group_size
        move = (n - self.residual_length) // g * g if n >= self.residual_length + g else 0
        if move <= 0:
            return
        for which in ("keys", "values"):
            res = self.residual_keys if which == "keys" else self.residual_values
            new = self._quantize(res[:, :, :move], which)
            old = self.packed_keys if which == "keys" else self.packed_values
            merged = new if old is None else _cat_packed(old, new)
            rest = res[:, :, move:].clone()  # frees the full-precision copies of the moved tokens
            if which == "keys":
                self.packed_keys, self.residual_keys = merged, rest
                self._packed_len_keys += move
            else:
                self.packed_values, self.residual_values = merged, rest
                self._packed_len_values += move

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append tokens ``(B, Hkv, n, D|Dv)`` to the residual and pack whole key groups out of it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.residual_keys = torch.cat([self.residual_keys, key_states.to(self.device, self.dtype)], dim=2)
        self.residual_values = torch.cat([self.residual_values, value_states.to(self.device, self.dtype)], dim=2)
        self._flush()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens; return the residual tagged with this layer (pikvpress attention) or the
        dense dequantized keys and values (any other attention implementation)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._packed_len_keys != self._packed_len_values:
            raise RuntimeError(
                "PackedKVLayer keys and values were cropped to different lengths; crop both (layer.keys = "
                "layer.keys[:, :, :n]; layer.values = layer.values[:, :, :n])"
            )
        self.append(key_states, value_states)
        if self.attention_active():
            return self.tagged(self.residual_keys, self.residual_values)
        if self.packed_keys is not None and not self._warned_dense:
            logger.warning(
                "a packed KV layer is read by attention implementation %r, which needs dense tensors: "
                "dequantizing the whole layer every step. Use pikvpress.enable_packed_attention(model).",
                getattr(self.config, "_attn_implementation", None),
            )
            self._warned_dense = True
        return self.dequantized()

    # ----------------------------------------------------------------------------------------------
    # cropping, batch ops, reset
    # ----------------------------------------------------------------------------------------------
    def _crop_one(self, which: str, length: int) -> None:
        total = self._dense_shape(which)[2]
        length = max(0, min(length, total))
        if length == total:
            return
        qt = self.packed_keys if which == "keys" else self.packed_values
        res = self.residual_keys if which == "keys" else self.residual_values
        plen = self._packed_len(which)
        if length >= plen:
            res = res[:, :, : length - plen].clone()
        else:
            keep = length // self.key_group_size * self.key_group_size
            dense = dequantize(qt, self.dtype)[:, :, keep:length]  # the partial group goes back to full precision
            res = dense.clone()
            qt = _slice_packed(qt, keep) if keep > 0 else None
            plen = keep
        if which == "keys":
            self.packed_keys, self.residual_keys, self._packed_len_keys = qt, res, plen
        else:
            self.packed_values, self.residual_values, self._packed_len_values = qt, res, plen

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop ``-max_length`` from the end)."""
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self.get_seq_length() <= max_length:
            return
        self._crop_one("keys", max_length)
        self._crop_one("values", max_length)

    def _map_batch(self, fn) -> None:
        for name in ("packed_keys", "packed_values"):
            qt = getattr(self, name)
            if qt is not None:
                packed, scale, zero = fn(qt.packed), fn(qt.scale), fn(qt.zero)
                shape = (packed.shape[0], *qt.shape[1:])
                setattr(self, name, QuantizedTensor(packed, scale, zero, qt.bits, qt.group_size, qt.layout, shape))
        if self.residual_keys is not None:
            self.residual_keys = fn(self.residual_keys)
            self.residual_values = fn(self.residual_values)

    def gathered(self, indices: torch.Tensor) -> PackedKVLayer:
        """A new layer, packed the same way, holding only the tokens at ``indices`` ``(B, Hkv, K)``.

        What a press that evicts tokens while decoding stores: the kept tokens are dequantized and packed
        again (their latest ``residual_length`` stay in full precision). Per-token groups (values, and keys
        in the ``"per_token"`` layout) keep their grid; KIVI's per-channel key groups are re-formed from the
        kept tokens, one more rounding for those keys.
        """
        keys, values = self.dequantized()
        b, h, k = indices.shape
        keys = keys.gather(2, indices.unsqueeze(-1).expand(b, h, k, keys.shape[-1]))
        values = values.gather(2, indices.unsqueeze(-1).expand(b, h, k, values.shape[-1]))
        return PackedKVLayer.from_dense(keys, values, **self.packing())

    def evict(self, order: torch.Tensor, budget: int) -> torch.Tensor:
        """Keep the first ``budget`` tokens of ``order`` (packed again: :meth:`gathered`); return them, increasing."""
        kept = order[..., :budget].sort(dim=-1).values
        self.__dict__.update(self.gathered(kept).__dict__)
        return kept

    def packing(self) -> dict[str, Any]:
        """The constructor arguments this layer was built with (how it packs), for a new layer packed alike."""
        names = ("bits", "group_size", "key_group_size", "residual_length", "stats_dtype", "layout", "config")
        return {name: getattr(self, name) for name in names}

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.residual_keys is not None and self.residual_keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        """Drop every token (the layer stays initialised, with its dtype and device)."""
        self.packed_keys = self.packed_values = None
        self._packed_len_keys = self._packed_len_values = 0
        if self.residual_keys is not None:
            self.residual_keys = self.residual_keys[:, :, :0].clone()
            self.residual_values = self.residual_values[:, :, :0].clone()

    def __repr__(self) -> str:
        return (
            f"PackedKVLayer(bits={self.bits}, layout={self.layout!r}, packed={self.packed_length}, "
            f"residual={self.residual_length_now}, nbytes={self.nbytes})"
        )


def _cat_packed(a: QuantizedTensor, b: QuantizedTensor) -> QuantizedTensor:
    """Concatenate two packed tensors along tokens (same bits, group size and layout)."""
    packed = torch.cat([a.packed, b.packed], dim=2)
    scale = torch.cat([a.scale, b.scale], dim=2)
    zero = torch.cat([a.zero, b.zero], dim=2)
    shape = (a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3])
    return QuantizedTensor(packed, scale, zero, a.bits, a.group_size, a.layout, shape)


def _slice_packed(qt: QuantizedTensor, length: int) -> QuantizedTensor:
    """The first ``length`` tokens of a packed tensor (a multiple of its token group for per_channel)."""
    stats_len = length // qt.group_size if qt.layout == "per_channel" else length
    packed = qt.packed[:, :, :length].clone()
    scale = qt.scale[:, :, :stats_len].clone()
    zero = qt.zero[:, :, :stats_len].clone()
    return QuantizedTensor(packed, scale, zero, qt.bits, qt.group_size, qt.layout, (*qt.shape[:2], length, qt.shape[3]))
