"""One shard of a sharded cache layer: its tokens' keys and values (dense or packed) on one device.

A :class:`KVShard` holds, for every batch row and KV head, the same number ``L`` of tokens: their keys
and values (dense tensors, or a :class:`~pikvpress.cache.PackedKVLayer` when the layer is compressed)
and ``index`` ``(B, H, L)``, each token's position in the layer's sequence order (increasing along a
row). It computes its partial attention, ``(output, log-sum-exp)``, on its own device, for all rows or
only the rows a query routes to. Its routing summary (key min / max / sum) lives with the layer, on the
query's device, so that shards can be ranked without touching them.
"""

from __future__ import annotations

from typing import Any

import torch

from pikvpress.cache.packed_layer import PackedKVLayer
from pikvpress.kernels.attention import (
    attention_partial,
    merge_partials,
    packed_attention_partial,
)
from pikvpress.kernels.quantize import QuantizedTensor


def _rows_qt(qt: QuantizedTensor, bi: torch.Tensor, hi: torch.Tensor) -> QuantizedTensor:
    """The ``(n, 1, T, D)`` packed tensor of rows ``(bi, hi)`` of ``qt``."""
    pick = lambda t: t[bi, hi].unsqueeze(1)
    return QuantizedTensor(
        pick(qt.packed),
        pick(qt.scale),
        pick(qt.zero),
        qt.bits,
        qt.group_size,
        qt.layout,
        (bi.numel(), 1, *qt.shape[2:]),
    )


def _per_head(keep: torch.Tensor | None, g: int) -> torch.Tensor | None:
    """A ``(N, Hkv, L)`` token mask as ``(N, Hkv * g, 1, L)``, one row per query head of each KV head."""
    if keep is None:
        return None
    n, hkv, length = keep.shape
    return keep.unsqueeze(2).expand(n, hkv, g, length).reshape(n, hkv * g, 1, length)


class KVShard:
    """The tokens of one shard of one layer, on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the shard's keys, values and indices live (and where its partial attention runs).
    packing : dict, optional
        :class:`~pikvpress.cache.PackedKVLayer` arguments; None stores dense tensors.
    """

    def __init__(self, device: torch.device, packing: dict[str, Any] | None = None):
        self.device = torch.device(device)
        self.packing = packing
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.packed: PackedKVLayer | None = None
        self.index: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens per row."""
        return 0 if self.index is None else self.index.shape[-1]

    @property
    def kv_nbytes(self) -> int:
        """Bytes of keys and values (packed codes, scales and zero points, residual), from the tensors."""
        if self.packed is not None:
            return self.packed.nbytes
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes held: keys, values and the token indices."""
        index = 0 if self.index is None else self.index.numel() * self.index.element_size()
        return self.kv_nbytes + index

    @property
    def row_kv_nbytes(self) -> float:
        """Key and value bytes of one (batch row, KV head): what attention reads when a query routes to it."""
        if self.index is None or self.index.numel() == 0:
            return 0.0
        b, h = self.index.shape[:2]
        return self.kv_nbytes / (b * h)

    # ----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """Add tokens ``(B, H, n, D|Dv)`` whose sequence positions ``index`` ``(B, H, n)`` follow the shard's."""
        keys, values = keys.to(self.device), values.to(self.device)
        index = index.to(self.device, torch.int32)
        self.index = index if self.index is None else torch.cat([self.index, index], dim=2)
        if self.packing is not None:
            if self.packed is None:
                self.packed = PackedKVLayer.from_dense(keys, values, **self.packing)
            else:
                self.packed.append(keys, values)
            return
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=2)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` dense (a packed shard dequantized)."""
        if self.packed is not None:
            return self.packed.dequantized()
        return self.keys, self.values

    def dense_part(self, which: str) -> torch.Tensor:
        """The dense ``"keys"`` or ``"values"`` alone (a packed shard dequantizes only that one)."""
        if self.packed is not None:
            return self.packed._dense(which)
        return self.keys if which == "keys" else self.values

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only the tokens at ``positions`` ``(B, H, K)`` (increasing along each row) of the shard."""
        positions = positions.to(self.device)
        self.index = self.index.gather(2, positions.to(torch.int64))
        if self.packed is not None:
            self.packed = self.packed.gathered(positions)
            return
        b, h, k = positions.shape
        self.keys = self.keys.gather(2, positions.unsqueeze(-1).expand(b, h, k, self.keys.shape[-1]))
        self.values = self.values.gather(2, positions.unsqueeze(-1).expand(b, h, k, self.values.shape[-1]))

    def split(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the first ``length`` tokens of each row; return the rest as dense ``(keys, values, index)``."""
        keys, values = self.dense()
        rest = keys[:, :, length:], values[:, :, length:], self.index[:, :, length:]
        if self.packed is not None:
            self.packed.crop(length)
        else:
            self.keys, self.values = self.keys[:, :, :length].clone(), self.values[:, :, :length].clone()
        self.index = self.index[:, :, :length].clone()
        return rest

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to every tensor's batch axis (beam search reorders, batch selection)."""
        if self.index is None:
            return
        self.index = fn(self.index)
        if self.packed is not None:
            self.packed._map_batch(fn)
        else:
            self.keys, self.values = fn(self.keys), fn(self.values)

    # ----------------------------------------------------------------------------------------------
    def partial(
        self, q: torch.Tensor, scale: float, rows: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial attention of ``q`` ``(B, Hkv, G, D)`` (the ``G`` query rows of each KV head) over the shard.

        ``rows`` ``(B, Hkv)`` bool reads only those (batch, KV head) rows (None: all); ``keep`` ``(B, 1|Hkv, L)``
        bool drops tokens (padding). Returns float32 ``out`` ``(B, Hkv, G, Dv)`` and ``lse`` ``(B, Hkv, G)``
        on the shard's device; rows not read have ``out = 0`` and ``lse = -inf``.
        """
        b, hkv, g, _ = q.shape
        q = q.to(self.device)
        if keep is not None:
            keep = keep.to(self.device).expand(b, hkv, -1)
        if rows is None:
            return self._partial(q, scale, keep)
        rows = rows.to(self.device)
        bi, hi = rows.nonzero(as_tuple=True)
        dv = self.packed.residual_values.shape[-1] if self.packed is not None else self.values.shape[-1]
        out = torch.zeros(b, hkv, g, dv, dtype=torch.float32, device=self.device)
        lse = torch.full((b, hkv, g), float("-inf"), dtype=torch.float32, device=self.device)
        if bi.numel() == 0:
            return out, lse
        sub_q = q[bi, hi].unsqueeze(1)  # (n, 1, G, D): each read row as a batch row with one KV head
        sub_keep = None if keep is None else keep[bi, hi].unsqueeze(1)
        out_r, lse_r = self._partial(sub_q, scale, sub_keep, (bi, hi))
        out[bi, hi] = out_r[:, 0]
        lse[bi, hi] = lse_r[:, 0]
        return out, lse

    def _partial(
        self, q: torch.Tensor, scale: float, keep: torch.Tensor | None, rows: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``(N, Hkv, G, D)`` over this shard's rows ``rows`` (all when None); ``keep`` ``(N, Hkv, L)``."""
        n, hkv, g, d = q.shape
        pick = (lambda t: t) if rows is None else (lambda t: t[rows[0], rows[1]].unsqueeze(1))
        if self.packed is None:
            keys, values = pick(self.keys), pick(self.values)
            out, lse = attention_partial(q.reshape(n, hkv * g, 1, d), keys, values, scale, _per_head(keep, g))
            return out.view(n, hkv, g, -1), lse.view(n, hkv, g)
        layer = self.packed
        p = layer.packed_length
        outs, lses = [], []
        if p > 0:
            kq, vq = layer.packed_keys, layer.packed_values
            if rows is not None:
                kq, vq = _rows_qt(kq, *rows), _rows_qt(vq, *rows)
            kv_mask = None if keep is None else keep[..., :p].contiguous()
            out_p, lse_p = packed_attention_partial(q.reshape(n, hkv * g, d), kq, vq, scale, kv_mask)
            outs.append(out_p.view(n, hkv, g, -1))
            lses.append(lse_p.view(n, hkv, g))
        if layer.residual_length_now > 0:
            rk, rv = pick(layer.residual_keys), pick(layer.residual_values)
            mask = None if keep is None else _per_head(keep[..., p:], g)
            out_r, lse_r = attention_partial(q.reshape(n, hkv * g, 1, d), rk, rv, scale, mask)
            outs.append(out_r.view(n, hkv, g, -1))
            lses.append(lse_r.view(n, hkv, g))
        if len(outs) == 1:
            return outs[0], lses[0]
        return merge_partials(torch.stack(outs, dim=3), torch.stack(lses, dim=3), dim=3)
