"""KIVI-style asymmetric uniform quantization of KV tensors, with bit packing.

Keys are quantized per channel (groups of ``group_size`` consecutive tokens share one scale and
zero per channel), values per token (groups of ``group_size`` consecutive channels of one token),
as in KIVI (Liu et al., 2024). For a group with minimum ``m`` and maximum ``M``::

    zero  = m                                   (stored in ``stats_dtype``)
    scale = (M - m) / (2**bits - 1)             (stored in ``stats_dtype``)
    q     = clamp(floor((x - zero) / scale + 1/2), 0, 2**bits - 1)     (q = 0 where scale == 0)
    x_hat = q * scale + zero

``q`` is computed from the *stored* (``stats_dtype``-rounded) scale and zero, in float32, so that
quantization and dequantization see the same statistics; rounding is half-up (``floor(y + 1/2)``),
which the reference and the kernel compute identically, so packed bytes match bit for bit.
A group of equal values gets scale 0 and dequantizes to its stored zero exactly.

Packing runs along the last (dim) axis: ``8 // bits`` codes per uint8 byte, code ``j`` of a row in
byte ``j // (8 // bits)`` at bit offset ``(j % (8 // bits)) * bits``, low bits first.

Every function has a Triton kernel and a pure-torch reference. The kernel runs when the input is on
CUDA or when the environment variable ``PIKVPRESS_FORCE_TRITON=1`` is set (tests use this with
``TRITON_INTERPRET=1`` to run the kernels on CPU); the reference runs otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from pikvpress.kernels.lazy_jit import LazyKernels, next_pow2

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "dequantize_reference",
    "quantize_keys",
    "quantize_keys_reference",
    "quantize_values",
    "quantize_values_reference",
]

ALLOWED_BITS = (2, 4, 8)
ALLOWED_STATS_DTYPES = (torch.float16, torch.bfloat16)
Layout = Literal["per_channel", "per_token"]


@dataclass(frozen=True)
class QuantizedTensor:
    """A packed, quantized KV tensor and the statistics that dequantize it.

    Parameters
    ----------
    packed : torch.Tensor
        uint8 codes, shape ``(B, H, T, D * bits // 8)``.
    scale : torch.Tensor
        Per-group scales in the stats dtype; ``(B, H, T // G, D)`` for ``"per_channel"`` (keys),
        ``(B, H, T, D // G)`` for ``"per_token"`` (values).
    zero : torch.Tensor
        Per-group zero points (group minima), same shape and dtype as ``scale``.
    bits : int
        Bits per code, one of 2, 4, 8.
    group_size : int
        ``G``, the number of elements sharing one scale and zero.
    layout : {"per_channel", "per_token"}
        Grouping along tokens (keys) or along channels (values).
    shape : tuple of int
        ``(B, H, T, D)`` of the original tensor.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    layout: Layout
    shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        """Bytes held by ``packed``, ``scale`` and ``zero``, read from the tensors themselves."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_args(x: torch.Tensor, bits: int, group_size: int, stats_dtype: torch.dtype, layout: Layout) -> None:
    name = "k" if layout == "per_channel" else "v"
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = x.ndim if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-d tensor (batch, heads, tokens, dim), got ndim={got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {x.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 1
        or (group_size & (group_size - 1))
    ):
        raise ValueError(f"group_size must be a positive power of two, got {group_size!r}")
    if stats_dtype not in ALLOWED_STATS_DTYPES:
        raise ValueError(f"stats_dtype must be one of {ALLOWED_STATS_DTYPES}, got {stats_dtype}")
    _, _, t, d = x.shape
    if (d * bits) % 8:
        raise ValueError(f"dim * bits must be divisible by 8 to pack whole bytes, got dim={d}, bits={bits}")
    if layout == "per_channel" and t % group_size:
        raise ValueError(
            f"group_size must divide the number of tokens for keys, got group_size={group_size}, tokens={t}"
        )
    if layout == "per_token" and d % group_size:
        raise ValueError(f"group_size must divide dim for values, got group_size={group_size}, dim={d}")


def _check_qt(qt: QuantizedTensor, dtype: torch.dtype) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")  # noqa: TRY004
    if qt.layout not in ("per_channel", "per_token"):
        raise ValueError(f"qt.layout must be 'per_channel' or 'per_token', got {qt.layout!r}")
    if isinstance(qt.bits, bool) or not isinstance(qt.bits, int) or qt.bits not in ALLOWED_BITS:
        raise ValueError(f"qt.bits must be one of {ALLOWED_BITS}, got {qt.bits!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype (float32, float16, bfloat16), got {dtype}")


def _use_triton(x: torch.Tensor) -> bool:
    if os.environ.get("PIKVPRESS_FORCE_TRITON", "0") == "1":
        if triton is None:
            raise RuntimeError("PIKVPRESS_FORCE_TRITON=1 but triton is not installed")
        return True
    return x.is_cuda and triton is not None


# --------------------------------------------------------------------------------------------------
# Pure-torch references
# --------------------------------------------------------------------------------------------------


def _quantize_groups_reference(
    xg: torch.Tensor, bits: int, stats_dtype: torch.dtype, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float32 ``xg`` with groups along ``dim``; returns codes (int32) and stored stats."""
    qmax = 2**bits - 1
    mn = xg.amin(dim=dim, keepdim=True)
    mx = xg.amax(dim=dim, keepdim=True)
    scale = ((mx - mn) / qmax).to(stats_dtype)
    zero = mn.to(stats_dtype)
    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    y = torch.where(s > 0, (xg - z) / safe, torch.zeros_like(xg))
    q = torch.floor(y + 0.5).clamp_(0, qmax).to(torch.int32)
    return q, scale.squeeze(dim), zero.squeeze(dim)


def _pack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int codes ``(..., D)`` into uint8 ``(..., D * bits // 8)``, low bits first."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 ``(..., NB)`` into int32 codes ``(..., NB * 8 // bits)``."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize_keys_reference(
    k: torch.Tensor, bits: int, group_size: int, stats_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Pure-torch per-channel quantization of keys; see :func:`quantize_keys`."""
    _check_args(k, bits, group_size, stats_dtype, "per_channel")
    b, h, t, d = k.shape
    xg = k.float().reshape(b, h, t // group_size, group_size, d)
    q, scale, zero = _quantize_groups_reference(xg, bits, stats_dtype, dim=3)
    packed = _pack_reference(q.reshape(b, h, t, d), bits)
    return QuantizedTensor(packed, scale.contiguous(), zero.contiguous(), bits, group_size, "per_channel", (b, h, t, d))


def quantize_values_reference(
    v: torch.Tensor, bits: int, group_size: int, stats_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Pure-torch per-token quantization of values; see :func:`quantize_values`."""
    _check_args(v, bits, group_size, stats_dtype, "per_token")
    b, h, t, d = v.shape
    xg = v.float().reshape(b, h, t, d // group_size, group_size)
    q, scale, zero = _quantize_groups_reference(xg, bits, stats_dtype, dim=4)
    packed = _pack_reference(q.reshape(b, h, t, d), bits)
    return QuantizedTensor(packed, scale.contiguous(), zero.contiguous(), bits, group_size, "per_token", (b, h, t, d))


def dequantize_reference(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Pure-torch unpack and dequantize; see :func:`dequantize`."""
    _check_qt(qt, dtype)
    g = qt.group_size
    q = _unpack_reference(qt.packed, qt.bits).float()
    s, z = qt.scale.float(), qt.zero.float()
    if qt.layout == "per_channel":
        s = s.repeat_interleave(g, dim=2)
        z = z.repeat_interleave(g, dim=2)
    else:
        s = s.repeat_interleave(g, dim=3)
        z = z.repeat_interleave(g, dim=3)
    return (q * s + z).to(dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
#
# The kernel bodies are plain Python functions, jitted on first use (and re-jitted if
# TRITON_INTERPRET changes), because ``triton.jit`` reads TRITON_INTERPRET when it decorates.
# Reductions call ``tl.reduce`` with triton.language.standard's combine functions rather than
# ``tl.min`` / ``tl.max`` / ``tl.sum``: those are themselves jitted when triton is imported, so they
# cannot run under an interpreter switched on after that import (as tests do); ``tl.reduce`` is a
# builtin the interpreter patches, and it recognises these combine functions.
# Every kernel views the input as a contiguous (R, D) matrix of rows R = B*H*T and the packed
# output as (R, NB) bytes, NB = D * bits // 8; elements are addressed as [row, byte, slot] with
# channel = byte * PER + slot, PER = 8 // bits.
# --------------------------------------------------------------------------------------------------


def _quantize_per_channel_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    D,
    NB,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    G: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    STATS_FP16: tl.constexpr,
):
    """One program per token group: rows [pid*G, pid*G + G) of (R, D); stats row ``pid`` of (R // G, D)."""
    pid = tl.program_id(0).to(tl.int64)
    QMAX: tl.constexpr = (1 << BITS) - 1
    rows = pid * G + tl.arange(0, G)  # [G]
    byte = tl.arange(0, BLOCK_NB)  # [BLOCK_NB]
    slot = tl.arange(0, PER)  # [PER]
    col = byte[:, None] * PER + slot[None, :]  # [BLOCK_NB, PER]
    cmask = (byte < NB)[:, None] & (slot < PER)[None, :]
    x = tl.load(x_ptr + rows[:, None, None] * D + col[None, :, :], mask=cmask[None, :, :], other=0.0)
    x = x.to(tl.float32)  # [G, BLOCK_NB, PER]
    mn = tl.reduce(x, 0, tl.standard._elementwise_min)
    mx = tl.reduce(x, 0, tl.standard._elementwise_max)
    scale = tl.math.div_rn(mx - mn, QMAX * 1.0)
    if STATS_FP16:
        scale_st = scale.to(tl.float16)
        zero_st = mn.to(tl.float16)
    else:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates
        sb = scale.to(tl.int32, bitcast=True)
        zb = mn.to(tl.int32, bitcast=True)
        sb = ((sb + 0x7FFF + ((sb >> 16) & 1)) >> 16) << 16
        zb = ((zb + 0x7FFF + ((zb >> 16) & 1)) >> 16) << 16
        scale_st = sb.to(tl.float32, bitcast=True).to(tl.bfloat16)
        zero_st = zb.to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(scale_ptr + pid * D + col, scale_st, mask=cmask)
    tl.store(zero_ptr + pid * D + col, zero_st, mask=cmask)
    s = scale_st.to(tl.float32)[None, :, :]
    z = zero_st.to(tl.float32)[None, :, :]
    pos = s > 0
    y = tl.where(pos, tl.math.div_rn(x - z, tl.where(pos, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), QMAX * 1.0).to(tl.int32)
    b = tl.reduce(
        q << (slot * BITS)[None, None, :], 2, tl.standard._sum_combine
    )  # [G, BLOCK_NB]; disjoint bits: sum == or
    tl.store(packed_ptr + rows[:, None] * NB + byte[None, :], b.to(tl.uint8), mask=(byte < NB)[None, :])


def _quantize_per_token_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    R,
    D,
    NB,
    NG,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    STATS_FP16: tl.constexpr,
):
    """One program per BLOCK_R rows; each row's D channels form NG = D // G groups of G channels.

    Groups align with bytes (G and PER are powers of two and G divides D), so the padding bytes
    beyond NB hold whole padding groups, which load as zeros and are never stored.
    """
    pid = tl.program_id(0).to(tl.int64)
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGP: tl.constexpr = BLOCK_NB * PER // G  # padded groups per row
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    byte = tl.arange(0, BLOCK_NB)
    slot = tl.arange(0, PER)
    col = byte[:, None] * PER + slot[None, :]  # [BLOCK_NB, PER]
    rmask = rows < R
    mask = rmask[:, None, None] & (byte < NB)[None, :, None] & (slot < PER)[None, None, :]
    x = tl.load(x_ptr + rows[:, None, None] * D + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
    xg = tl.reshape(x, (BLOCK_R, NGP, G))
    mn = tl.reduce(xg, 2, tl.standard._elementwise_min)  # [BLOCK_R, NGP]
    mx = tl.reduce(xg, 2, tl.standard._elementwise_max)
    scale = tl.math.div_rn(mx - mn, QMAX * 1.0)
    if STATS_FP16:
        scale_st = scale.to(tl.float16)
        zero_st = mn.to(tl.float16)
    else:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates
        sb = scale.to(tl.int32, bitcast=True)
        zb = mn.to(tl.int32, bitcast=True)
        sb = ((sb + 0x7FFF + ((sb >> 16) & 1)) >> 16) << 16
        zb = ((zb + 0x7FFF + ((zb >> 16) & 1)) >> 16) << 16
        scale_st = sb.to(tl.float32, bitcast=True).to(tl.bfloat16)
        zero_st = zb.to(tl.float32, bitcast=True).to(tl.bfloat16)
    grp = tl.arange(0, NGP)
    smask = rmask[:, None] & (grp < NG)[None, :]
    soff = rows[:, None] * NG + grp[None, :]
    tl.store(scale_ptr + soff, scale_st, mask=smask)
    tl.store(zero_ptr + soff, zero_st, mask=smask)
    s = tl.reshape(tl.broadcast_to(scale_st.to(tl.float32)[:, :, None], (BLOCK_R, NGP, G)), (BLOCK_R, BLOCK_NB, PER))
    z = tl.reshape(tl.broadcast_to(zero_st.to(tl.float32)[:, :, None], (BLOCK_R, NGP, G)), (BLOCK_R, BLOCK_NB, PER))
    pos = s > 0
    y = tl.where(pos, tl.math.div_rn(x - z, tl.where(pos, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), QMAX * 1.0).to(tl.int32)
    b = tl.reduce(q << (slot * BITS)[None, None, :], 2, tl.standard._sum_combine)  # [BLOCK_R, BLOCK_NB]
    tl.store(
        packed_ptr + rows[:, None] * NB + byte[None, :], b.to(tl.uint8), mask=rmask[:, None] & (byte < NB)[None, :]
    )


def _dequantize_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    R,
    D,
    NB,
    NG,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    """One program per BLOCK_R rows of (R, NB) bytes; writes (R, D) in ``out``'s dtype.

    Stats are (R // G, D) for per-channel (keys) and (R, NG) for per-token (values).
    """
    pid = tl.program_id(0).to(tl.int64)
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.arange(0, BLOCK_NB)
    slot = tl.arange(0, PER)
    rmask = rows < R
    bmask = rmask[:, None] & (byte < NB)[None, :]
    b = tl.load(packed_ptr + rows[:, None] * NB + byte[None, :], mask=bmask, other=0).to(tl.int32)
    q = ((b[:, :, None] >> (slot * BITS)[None, None, :]) & MASK).to(tl.float32)  # [BLOCK_R, BLOCK_NB, PER]
    col = byte[None, :, None] * PER + slot[None, None, :]  # [1, BLOCK_NB, PER]
    mask = bmask[:, :, None] & (slot < PER)[None, None, :]
    if PER_TOKEN:
        soff = rows[:, None, None] * NG + col // G
    else:
        soff = (rows // G)[:, None, None] * D + col
    s = tl.load(scale_ptr + soff, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + soff, mask=mask, other=0.0).to(tl.float32)
    xh = q * s + z
    if OUT_BF16:  # round to nearest even by hand, as in the quantize kernels
        xb = xh.to(tl.int32, bitcast=True)
        xh = (((xb + 0x7FFF + ((xb >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    tl.store(out_ptr + rows[:, None, None] * D + col, xh.to(out_ptr.dtype.element_ty), mask=mask)


_KERNEL_FNS = {
    "quantize_per_channel": _quantize_per_channel_kernel,
    "quantize_per_token": _quantize_per_token_kernel,
    "dequantize": _dequantize_kernel,
}
_kernel = LazyKernels(_KERNEL_FNS)

#: Number of Triton launches made by this module (tests read it to prove the kernels ran).
LAUNCHES = {"count": 0}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace this to poison outputs before each launch)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_per_block(elems_per_row: int, rows: int, target: int = 4096) -> int:
    return max(1, min(next_pow2(rows), next_pow2(max(1, target // elems_per_row))))


def _quantize_triton(x: torch.Tensor, bits: int, g: int, stats_dtype: torch.dtype, layout: Layout) -> QuantizedTensor:
    b, h, t, d = x.shape
    x2 = x.contiguous()
    r, per, nb = b * h * t, 8 // bits, d * bits // 8
    block_nb = next_pow2(nb)
    packed = _empty((b, h, t, nb), torch.uint8, x.device)
    stats_shape = (b, h, t // g, d) if layout == "per_channel" else (b, h, t, d // g)
    scale = _empty(stats_shape, stats_dtype, x.device)
    zero = _empty(stats_shape, stats_dtype, x.device)
    fp16 = stats_dtype == torch.float16
    if r > 0:
        if layout == "per_channel":
            _kernel("quantize_per_channel")[(r // g,)](
                x2,
                packed,
                scale,
                zero,
                d,
                nb,
                BITS=bits,
                PER=per,
                G=g,
                BLOCK_NB=block_nb,
                STATS_FP16=fp16,
            )
        else:
            # the padded width BLOCK_NB * PER must hold whole groups
            block_nb = max(block_nb, next_pow2(max(1, g // per)))
            block_r = _rows_per_block(block_nb * per, r)
            _kernel("quantize_per_token")[(triton.cdiv(r, block_r),)](
                x2,
                packed,
                scale,
                zero,
                r,
                d,
                nb,
                d // g,
                BITS=bits,
                PER=per,
                G=g,
                BLOCK_R=block_r,
                BLOCK_NB=block_nb,
                STATS_FP16=fp16,
            )
        LAUNCHES["count"] += 1
    return QuantizedTensor(packed, scale, zero, bits, g, layout, (b, h, t, d))


def _dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, t, d = qt.shape
    r, per, nb = b * h * t, 8 // qt.bits, d * qt.bits // 8
    out = _empty((b, h, t, d), dtype, qt.packed.device)
    if r > 0:
        block_nb = next_pow2(nb)
        block_r = _rows_per_block(block_nb * per, r)
        _kernel("dequantize")[(triton.cdiv(r, block_r),)](
            qt.packed.contiguous(),
            qt.scale.contiguous(),
            qt.zero.contiguous(),
            out,
            r,
            d,
            nb,
            d // qt.group_size,
            BITS=qt.bits,
            PER=per,
            G=qt.group_size,
            BLOCK_R=block_r,
            BLOCK_NB=block_nb,
            PER_TOKEN=qt.layout == "per_token",
            OUT_BF16=dtype == torch.bfloat16,
        )
        LAUNCHES["count"] += 1
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def quantize_keys(
    k: torch.Tensor, bits: int, group_size: int, stats_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Quantize keys per channel: each group of ``group_size`` consecutive tokens shares one
    scale and zero per channel.

    Parameters
    ----------
    k : torch.Tensor
        Keys, shape ``(B, H, T, D)``, floating point; ``T % group_size == 0``, ``D * bits % 8 == 0``.
    bits : int
        2, 4 or 8.
    group_size : int
        ``G``, a power of two dividing ``T``.
    stats_dtype : torch.dtype
        float16 (default) or bfloat16, the dtype scales and zeros are stored in.

    Returns
    -------
    QuantizedTensor
        ``packed`` uint8 ``(B, H, T, D * bits // 8)``; ``scale``, ``zero`` ``(B, H, T // G, D)``;
        layout ``"per_channel"``.
    """
    _check_args(k, bits, group_size, stats_dtype, "per_channel")
    if _use_triton(k):
        return _quantize_triton(k, bits, group_size, stats_dtype, "per_channel")
    return quantize_keys_reference(k, bits, group_size, stats_dtype)


def quantize_values(
    v: torch.Tensor, bits: int, group_size: int, stats_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Quantize values per token: each group of ``group_size`` consecutive channels of one token
    shares one scale and zero.

    Parameters
    ----------
    v : torch.Tensor
        Values, shape ``(B, H, T, D)``, floating point; ``D % group_size == 0``, ``D * bits % 8 == 0``.
    bits : int
        2, 4 or 8.
    group_size : int
        ``G``, a power of two dividing ``D``.
    stats_dtype : torch.dtype
        float16 (default) or bfloat16, the dtype scales and zeros are stored in.

    Returns
    -------
    QuantizedTensor
        ``packed`` uint8 ``(B, H, T, D * bits // 8)``; ``scale``, ``zero`` ``(B, H, T, D // G)``;
        layout ``"per_token"``.
    """
    _check_args(v, bits, group_size, stats_dtype, "per_token")
    if _use_triton(v):
        return _quantize_triton(v, bits, group_size, stats_dtype, "per_token")
    return quantize_values_reference(v, bits, group_size, stats_dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Unpack and dequantize: ``x_hat = q * scale + zero``, computed in float32.

    Parameters
    ----------
    qt : QuantizedTensor
        From :func:`quantize_keys` or :func:`quantize_values`.
    dtype : torch.dtype
        Output dtype.

    Returns
    -------
    torch.Tensor
        ``(B, H, T, D)`` in ``dtype``, on ``qt.packed``'s device.
    """
    _check_qt(qt, dtype)
    if _use_triton(qt.packed):
        return _dequantize_triton(qt, dtype)
    return dequantize_reference(qt, dtype)
