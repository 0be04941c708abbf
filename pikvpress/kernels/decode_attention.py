"""Split-KV decode attention over packed (quantized) keys and values, and the exact merge.

One decode query per head attends to a KV cache whose sequence axis is cut into contiguous
splits. Each split yields its softmax-normalised output ``o_s`` and the natural-log
log-sum-exp ``l_s`` of its scaled logits; :func:`merge_attention_states` combines them exactly
(FlashInfer's ``merge_state`` identity)::

    L = logsumexp_s(l_s)            o = sum_s exp(l_s - L) * o_s

An empty split has ``l_s = -inf`` and ``o_s = 0`` and drops out of the merge.

Keys come packed per channel (:func:`pikvpress.kernels.quantize.quantize_keys`), values packed per
token (:func:`pikvpress.kernels.quantize.quantize_values`). Grouped-query attention: query head
``h`` reads kv head ``h // (Hq // Hkv)``.

Splits: ``num_splits`` is either an int ``S`` (each split then holds
``ceil((T // G) / S) * G`` tokens, ``G`` the key group size, the last ones possibly fewer or none)
or a sequence of per-split token counts, each a multiple of ``G``, summing to ``T``.

The Triton kernel runs one program per (batch, query head, split): it walks its chunk in tiles,
loads the packed key bytes and key stats of a tile, unpacks and dequantizes them in registers,
computes the logits, keeps an online softmax, and accumulates the unpacked, dequantized values;
the dequantized cache is never written to memory. The kernel runs when ``q`` is on CUDA or when
``PIKVPRESS_FORCE_TRITON=1``; the pure-torch reference (dequantize, then float32 attention per
split) runs otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from pikvpress.kernels.lazy_jit import LazyKernels, next_pow2
from pikvpress.kernels.quantize import QuantizedTensor, _use_triton, dequantize_reference

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = [
    "dense_decode_attention_partial",
    "merge_attention_states",
    "packed_decode_attention",
    "packed_decode_attention_partial",
    "packed_decode_attention_partial_reference",
    "split_bounds",
]


# --------------------------------------------------------------------------------------------------
# Argument checks and split boundaries
# --------------------------------------------------------------------------------------------------


def split_bounds(num_tokens: int, num_splits: int | Sequence[int], align: int = 1) -> list[int]:
    """Boundaries ``[b_0 = 0, b_1, ..., b_S = T]`` of the splits; split ``s`` is ``[b_s, b_{s+1})``.

    Parameters
    ----------
    num_tokens : int
        ``T``.
    num_splits : int or sequence of int
        A positive int ``S`` (each split gets ``ceil((T // align) / S) * align`` tokens, trailing
        splits may be short or empty), or the token count of every split (each a non-negative
        multiple of ``align``, summing to ``T``).
    align : int
        Every boundary must be a multiple of this (the key group size).
    """
    if isinstance(num_splits, bool):
        raise ValueError(f"num_splits must be a positive int or a sequence of split sizes, got {num_splits!r}")  # noqa: TRY004
    if isinstance(num_splits, int):
        if num_splits < 1:
            raise ValueError(f"num_splits must be a positive int or a sequence of split sizes, got {num_splits!r}")
        chunk = -(-(num_tokens // align) // num_splits) * align
        return [min(s * chunk, num_tokens) for s in range(num_splits + 1)]
    if not isinstance(num_splits, Sequence) or len(num_splits) == 0:
        raise ValueError(f"num_splits must be a positive int or a sequence of split sizes, got {num_splits!r}")
    sizes = list(num_splits)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise ValueError(f"num_splits sizes must be non-negative ints, got {sizes}")
    if any(n % align for n in sizes):
        raise ValueError(
            f"num_splits sizes must be multiples of the key group size {align} so split boundaries "
            f"align to key groups, got {sizes}"
        )
    if sum(sizes) != num_tokens:
        raise ValueError(f"num_splits sizes must sum to the number of tokens {num_tokens}, got {sizes}")
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return bounds


def _check_q_scale(q: torch.Tensor, scale: float) -> None:
    if not isinstance(q, torch.Tensor) or q.ndim != 3:
        got = q.ndim if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 3-d tensor (batch, query heads, dim), got ndim={got}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_shapes(q: torch.Tensor, kshape: tuple, vshape: tuple, kname: str, vname: str) -> int:
    """Checks (B, Hq, D) against keys (B, Hkv, T, D) and values (B, Hkv, T, Dv); returns Hq // Hkv."""
    if len(kshape) != 4:
        raise ValueError(f"{kname} must be 4-d (batch, kv heads, tokens, dim), got shape {tuple(kshape)}")
    if len(vshape) != 4:
        raise ValueError(f"{vname} must be 4-d (batch, kv heads, tokens, dim), got shape {tuple(vshape)}")
    b, hq, d = q.shape
    kb, hkv, t, kd = kshape
    if kb != b or kd != d:
        raise ValueError(f"{kname} shape {tuple(kshape)} does not match q shape {tuple(q.shape)} in batch or dim")
    if tuple(vshape[:3]) != (kb, hkv, t):
        raise ValueError(f"{vname} shape {tuple(vshape)} must match {kname} shape {tuple(kshape)} in (B, Hkv, T)")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of {kname} heads ({hkv}) for grouped-query attention")
    return hq // hkv


def _check_packed(q: torch.Tensor, k_packed: QuantizedTensor, v_packed: QuantizedTensor, scale: float) -> int:
    _check_q_scale(q, scale)
    if not isinstance(k_packed, QuantizedTensor):
        raise ValueError(f"k_packed must be a QuantizedTensor, got {type(k_packed).__name__}")  # noqa: TRY004
    if not isinstance(v_packed, QuantizedTensor):
        raise ValueError(f"v_packed must be a QuantizedTensor, got {type(v_packed).__name__}")  # noqa: TRY004
    if k_packed.layout != "per_channel":
        raise ValueError(f"k_packed.layout must be 'per_channel' (keys), got {k_packed.layout!r}")
    if v_packed.layout != "per_token":
        raise ValueError(f"v_packed.layout must be 'per_token' (values), got {v_packed.layout!r}")
    if k_packed.packed.device != q.device or v_packed.packed.device != q.device:
        raise ValueError("k_packed and v_packed must be on q's device")
    return _check_shapes(q, k_packed.shape, v_packed.shape, "k_packed", "v_packed")


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------


def merge_attention_states(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    dim: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge partial attention states along the split axis.

    Parameters
    ----------
    outs : torch.Tensor or sequence of torch.Tensor
        Partial outputs ``(..., S, ..., Dv)``: the split axis ``dim`` of ``lses`` and a trailing
        value dim. A sequence of tensors is stacked along ``dim`` first.
    lses : torch.Tensor or sequence of torch.Tensor
        Natural-log log-sum-exps, ``outs.shape[:-1]``; ``-inf`` marks an empty split.
    dim : int
        The split axis, indexed in ``lses`` (``dim=-1`` is the last axis of ``lses``, the
        second-to-last of ``outs``).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(..., Dv)`` float32 with the split axis removed, ``lse`` float32 likewise; where
        every split is empty, ``out = 0`` and ``lse = -inf``.
    """
    if not isinstance(lses, torch.Tensor):
        lses = torch.stack(list(lses), dim=dim)
    lnd = lses.ndim
    if not -lnd <= dim < lnd:
        raise ValueError(f"dim must index an axis of lses (ndim {lnd}), got {dim}")
    dim = dim % lnd
    if not isinstance(outs, torch.Tensor):
        outs = torch.stack(list(outs), dim=dim)
    if outs.ndim != lnd + 1 or outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"outs shape {tuple(outs.shape)} must be lses shape {tuple(lses.shape)} plus a trailing value dim"
        )
    lses = lses.float()
    big = torch.logsumexp(lses, dim=dim, keepdim=True)  # -inf where every split is empty
    safe = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    w = torch.exp(lses - safe).unsqueeze(-1)  # 0 for empty splits
    contrib = torch.where(w > 0, w * outs.float(), torch.zeros((), dtype=torch.float32, device=outs.device))
    return contrib.sum(dim=dim), big.squeeze(dim)


# --------------------------------------------------------------------------------------------------
# Pure-torch references
# --------------------------------------------------------------------------------------------------


def _partial_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bounds: list[int], group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 per-split attention of ``q`` (B, Hq, D) over ``k`` (B, Hkv, T, D), ``v`` (B, Hkv, T, Dv)."""
    b, hq, _ = q.shape
    dv = v.shape[-1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    qf = q.float()
    ns = len(bounds) - 1
    out = torch.zeros((b, hq, ns, dv), dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, ns), float("-inf"), dtype=torch.float32, device=q.device)
    for s in range(ns):
        lo, hi = bounds[s], bounds[s + 1]
        if hi <= lo:
            continue
        logits = torch.einsum("bhd,bhtd->bht", qf, k[:, :, lo:hi]) * scale
        lse[:, :, s] = torch.logsumexp(logits, dim=-1)
        out[:, :, s] = torch.einsum("bht,bhtd->bhd", torch.softmax(logits, dim=-1), v[:, :, lo:hi])
    return out, lse


def packed_decode_attention_partial_reference(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`packed_decode_attention_partial` (dequantizes the whole cache)."""
    group = _check_packed(q, k_packed, v_packed, scale)
    bounds = split_bounds(k_packed.shape[2], num_splits, k_packed.group_size)
    k = dequantize_reference(k_packed, torch.float32)
    v = dequantize_reference(v_packed, torch.float32)
    return _partial_reference(q, k, v, float(scale), bounds, group)


def dense_decode_attention_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_splits: int | Sequence[int] = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split decode attention over dense (unpacked) K/V, same contract as
    :func:`packed_decode_attention_partial` (reference implementation on every device).

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, D)``.
    k, v : torch.Tensor
        ``(B, Hkv, T, D)`` and ``(B, Hkv, T, Dv)``, floating point.
    scale : float
        Softmax scale.
    num_splits : int or sequence of int
        As in :func:`split_bounds` with ``align=1``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(B, Hq, S, Dv)`` float32 and ``lse`` ``(B, Hq, S)`` float32.
    """
    _check_q_scale(q, scale)
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    group = _check_shapes(q, tuple(k.shape), tuple(v.shape), "k", "v")
    bounds = split_bounds(k.shape[2], num_splits, 1)
    return _partial_reference(q, k, v, float(scale), bounds, group)


# --------------------------------------------------------------------------------------------------
# Triton kernel
#
# As in quantize.py: the body is a plain function jitted on first use (triton.jit reads
# TRITON_INTERPRET when it decorates), and reductions use tl.reduce with triton.language.standard's
# combine functions, which the interpreter can run after a late switch-on.
# Addressing: q (B*Hq, D); packed keys (B*Hkv*T, NBK) bytes, key stats (B*Hkv*T//GK, D); packed
# values (B*Hkv*T, NBV) bytes, value stats (B*Hkv*T, DV//GV); channel = byte * PER + slot.
# --------------------------------------------------------------------------------------------------


def _packed_decode_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    kz_ptr,
    vp_ptr,
    vs_ptr,
    vz_ptr,
    bounds_ptr,
    out_ptr,
    lse_ptr,
    sm_scale,
    HQ,
    HKV,
    T,
    D,
    DV,
    NBK,
    NBV,
    NGV,
    NUM_SPLITS,
    N_TILES,
    KV_GROUP,
    BITS_K: tl.constexpr,
    PER_K: tl.constexpr,
    GK: tl.constexpr,
    BITS_V: tl.constexpr,
    PER_V: tl.constexpr,
    GV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NBK: tl.constexpr,
    BLOCK_NBV: tl.constexpr,
):
    """One program per (batch * query head, split); grid ``(B * HQ, NUM_SPLITS)``."""
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    hk = h // KV_GROUP
    MASK_K: tl.constexpr = (1 << BITS_K) - 1
    MASK_V: tl.constexpr = (1 << BITS_V) - 1

    start = tl.load(bounds_ptr + sp).to(tl.int64)
    end = tl.load(bounds_ptr + sp + 1).to(tl.int64)
    kv_row0 = (b * HKV + hk) * T  # first token row of this kv head

    kbyte = tl.arange(0, BLOCK_NBK)
    kslot = tl.arange(0, PER_K)
    kcol = kbyte[:, None] * PER_K + kslot[None, :]  # [BLOCK_NBK, PER_K]
    kcmask = (kbyte < NBK)[:, None] & (kslot < PER_K)[None, :]
    qv = tl.load(q_ptr + bh * D + kcol, mask=kcmask, other=0.0).to(tl.float32)  # [BLOCK_NBK, PER_K]

    vbyte = tl.arange(0, BLOCK_NBV)
    vslot = tl.arange(0, PER_V)
    vcol = vbyte[:, None] * PER_V + vslot[None, :]  # [BLOCK_NBV, PER_V]
    vcmask = (vbyte < NBV)[:, None] & (vslot < PER_V)[None, :]

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.full([1], 0.0, tl.float32)
    acc = tl.full([BLOCK_NBV, PER_V], 0.0, tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for i in range(N_TILES):
        t = start + i * BLOCK_T + offs_t  # [BLOCK_T] token index within the kv head
        tmask = t < end
        rows = kv_row0 + t
        # keys: unpack and dequantize in registers
        kb = tl.load(
            kp_ptr + rows[:, None] * NBK + kbyte[None, :], mask=tmask[:, None] & (kbyte < NBK)[None, :], other=0
        ).to(tl.int32)
        kq = ((kb[:, :, None] >> (kslot * BITS_K)[None, None, :]) & MASK_K).to(tl.float32)
        kmask = tmask[:, None, None] & kcmask[None, :, :]
        ksoff = ((kv_row0 // GK) + t // GK)[:, None, None] * D + kcol[None, :, :]
        ks = tl.load(ks_ptr + ksoff, mask=kmask, other=0.0).to(tl.float32)
        kz = tl.load(kz_ptr + ksoff, mask=kmask, other=0.0).to(tl.float32)
        kx = kq * ks + kz  # [BLOCK_T, BLOCK_NBK, PER_K]
        logit = tl.reduce(tl.reduce(kx * qv[None, :, :], 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)
        logit = tl.where(tmask, logit * sm_scale, float("-inf"))  # [BLOCK_T]
        # online softmax; a fully masked tile keeps m at -inf, so exponents use a finite stand-in
        m_new = tl.maximum(m_i, tl.reduce(logit, 0, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(tmask, tl.exp(logit - m_safe), 0.0)  # [BLOCK_T]
        l_i = l_i * alpha + tl.reduce(p, 0, tl.standard._sum_combine)
        # values: unpack and dequantize in registers
        vb = tl.load(
            vp_ptr + rows[:, None] * NBV + vbyte[None, :], mask=tmask[:, None] & (vbyte < NBV)[None, :], other=0
        ).to(tl.int32)
        vq = ((vb[:, :, None] >> (vslot * BITS_V)[None, None, :]) & MASK_V).to(tl.float32)
        vmask = tmask[:, None, None] & vcmask[None, :, :]
        vsoff = rows[:, None, None] * NGV + (vcol // GV)[None, :, :]
        vs = tl.load(vs_ptr + vsoff, mask=vmask, other=0.0).to(tl.float32)
        vz = tl.load(vz_ptr + vsoff, mask=vmask, other=0.0).to(tl.float32)
        vx = vq * vs + vz  # [BLOCK_T, BLOCK_NBV, PER_V]
        acc = acc * alpha[:, None] + tl.reduce(p[:, None, None] * vx, 0, tl.standard._sum_combine)
        m_i = m_new

    nonempty = l_i > 0.0  # [1]
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    tl.store(out_ptr + (bh * NUM_SPLITS + sp) * DV + vcol, o, mask=vcmask)
    tl.store(lse_ptr + bh * NUM_SPLITS + sp + tl.arange(0, 1), lse)


_KERNEL_FNS = {"packed_decode": _packed_decode_kernel}
_kernel = LazyKernels(_KERNEL_FNS)

#: Number of Triton launches made by this module (tests read it to prove the kernel ran).
LAUNCHES = {"count": 0}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace this to poison outputs before each launch)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _partial_triton(
    q: torch.Tensor, kq: QuantizedTensor, vq: QuantizedTensor, scale: float, bounds: list[int], group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, d = q.shape
    _, hkv, t, _ = kq.shape
    dv = vq.shape[3]
    ns = len(bounds) - 1
    out = _empty((b, hq, ns, dv), torch.float32, q.device)
    lse = _empty((b, hq, ns), torch.float32, q.device)
    if b * hq == 0:
        return out, lse
    per_k, per_v = 8 // kq.bits, 8 // vq.bits
    nbk, nbv = d * kq.bits // 8, dv * vq.bits // 8
    longest = max(hi - lo for lo, hi in itertools.pairwise(bounds))
    block_t = max(16, min(64, next_pow2(max(1, longest))))
    n_tiles = -(-longest // block_t)
    bounds_t = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    _kernel("packed_decode")[(b * hq, ns)](
        q.contiguous(),
        kq.packed.contiguous(),
        kq.scale.contiguous(),
        kq.zero.contiguous(),
        vq.packed.contiguous(),
        vq.scale.contiguous(),
        vq.zero.contiguous(),
        bounds_t,
        out,
        lse,
        float(scale),
        hq,
        hkv,
        t,
        d,
        dv,
        nbk,
        nbv,
        dv // vq.group_size,
        ns,
        n_tiles,
        group,
        BITS_K=kq.bits,
        PER_K=per_k,
        GK=kq.group_size,
        BITS_V=vq.bits,
        PER_V=per_v,
        GV=vq.group_size,
        BLOCK_T=block_t,
        BLOCK_NBK=next_pow2(nbk),
        BLOCK_NBV=next_pow2(nbv),
    )
    LAUNCHES["count"] += 1
    return out, lse


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def packed_decode_attention_partial(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split decode attention over packed K/V: (output, log-sum-exp) per split.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, D)``, one decode query per head; float16, bfloat16 or float32.
    k_packed : QuantizedTensor
        Keys, layout ``"per_channel"``, shape ``(B, Hkv, T, D)``; ``Hq % Hkv == 0``.
    v_packed : QuantizedTensor
        Values, layout ``"per_token"``, shape ``(B, Hkv, T, Dv)``.
    scale : float
        Softmax scale applied to ``q . k``.
    num_splits : int or sequence of int
        Splits of the T axis, aligned to ``k_packed.group_size``; see :func:`split_bounds`.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(B, Hq, S, Dv)`` float32, each split's softmax-normalised output (0 for an empty
        split), and ``lse`` ``(B, Hq, S)`` float32, natural-log log-sum-exp of the split's scaled
        logits (``-inf`` for an empty split).
    """
    group = _check_packed(q, k_packed, v_packed, scale)
    bounds = split_bounds(k_packed.shape[2], num_splits, k_packed.group_size)
    if _use_triton(q):
        return _partial_triton(q, k_packed, v_packed, float(scale), bounds, group)
    k = dequantize_reference(k_packed, torch.float32)
    v = dequantize_reference(v_packed, torch.float32)
    return _partial_reference(q, k, v, float(scale), bounds, group)


def packed_decode_attention(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Decode attention over packed K/V: :func:`packed_decode_attention_partial`, then
    :func:`merge_attention_states`. Returns ``(B, Hq, Dv)`` in ``q``'s dtype."""
    out, lse = packed_decode_attention_partial(q, k_packed, v_packed, scale, num_splits)
    merged, _ = merge_attention_states(out, lse, dim=2)
    return merged.to(q.dtype)
