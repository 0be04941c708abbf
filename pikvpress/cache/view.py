"""A lazy, sliceable stand-in for the keys or values of a cache layer that does not hold them as one tensor.

kvpress reads ``layer.keys.shape`` and crops a cache by ``layer.keys = layer.keys[:, :, :n]``; packed and
sharded layers answer both through a :class:`KVView` without materialising their tokens. The layer provides
``_dense_shape(which)``, ``_dense(which)``, ``dtype`` and ``device``, and crops itself when a view of its own
is assigned back.
"""

from __future__ import annotations

from typing import Any, Literal

import torch


class KVView:
    """The keys or values of a cache layer that does not store them as one tensor, as a lazy, sliceable
    stand-in for a tensor (packed layers, sharded layers).

    Slicing along the token axis (``view[:, :, :n]``, ``view[..., :n, :]``) returns a shorter view;
    assigning a view of a layer back to that layer's ``keys`` / ``values`` crops the layer to it.
    ``dequantize()`` materialises the dense tensor. Passing a view to a torch function raises a
    ``TypeError`` that says what to do instead.
    """

    def __init__(self, layer: Any, which: Literal["keys", "values"], length: int):
        self.layer = layer
        self.which = which
        self.length = length

    @property
    def shape(self) -> torch.Size:
        b, h, _, d = self.layer._dense_shape(self.which)
        return torch.Size((b, h, self.length, d))

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    @property
    def device(self) -> torch.device:
        return self.layer.device

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self) -> torch.Tensor:
        """The dense ``(B, H, length, D)`` tensor (packed tokens dequantized, shards gathered in sequence order)."""
        return self.layer._dense(self.which)[:, :, : self.length]

    def __getitem__(self, index: Any) -> KVView:
        if not isinstance(index, tuple):
            index = (index,)
        if index and index[0] is Ellipsis:  # [..., :n, :] or [..., :n]
            rest = index[1:]
            index = (slice(None),) * (4 - len(rest)) + rest
        index = index + (slice(None),) * (4 - len(index))
        if len(index) != 4 or any(i != slice(None) for j, i in enumerate(index) if j != 2):
            raise TypeError(f"a {type(self).__name__} can only be sliced along the token axis (dim 2), got {index!r}")
        sl = index[2]
        if not isinstance(sl, slice) or sl.step not in (None, 1) or sl.start not in (None, 0):
            raise TypeError(f"a {type(self).__name__} can only keep a prefix of its tokens ([:, :, :n]), got {sl!r}")
        stop = self.length if sl.stop is None else sl.stop
        if stop < 0:
            stop = max(0, self.length + stop)
        return type(self)(self.layer, self.which, min(stop, self.length))

    #: what to do instead, appended to the error a torch function raises on a view
    hint = "call .dequantize() on the view for a dense copy."

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{func.__name__} got a {cls.__name__} of a cache layer, not a tensor. {cls.hint}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.which}, shape={tuple(self.shape)})"


def dense(x: Any) -> torch.Tensor:
    """``x`` as a dense tensor: a tensor as it is, a pikvpress layer's view dequantized (gathered)."""
    return x if isinstance(x, torch.Tensor) else x.dequantize()
