"""Split-KV decode attention over packed (quantized) keys and values, and the exact merge.

One decode query per head attends to a KV cache whose sequence axis is cut into contiguous
splits. Each split yields its softmax-normalised output ``o_s`` and the natural-log
log-sum-exp ``l_s`` of its scaled logits; :func:`merge_attention_states` combines them exactly
(FlashInfer's ``merge_state`` identity)::

    L = logsumexp_s(l_s)            o = sum_s exp(l_s - L) * o_s

An empty split has ``l_s = -inf`` and ``o_s = 0`` and drops out of the merge.

Keys and values are :class:`~pikvpress.kernels.quantize.QuantizedTensor` objects of either layout:
``"per_channel"`` (groups of consecutive tokens share a scale and zero per channel, what
:func:`~pikvpress.kernels.quantize.quantize_keys` makes; KIVI keys) or ``"per_token"`` (groups of
consecutive channels of one token, what :func:`~pikvpress.kernels.quantize.quantize_values` makes;
KIVI values). Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``.

An optional boolean ``kv_mask`` ``(B, Hkv, T)`` or ``(B, 1, T)`` (broadcast over kv heads) keeps the
tokens where it is True and drops the others (their logits are ``-inf``): left padding in a batch,
per-head eviction. A split whose tokens are all dropped is an empty split.

Splits: ``num_splits`` is either an int ``S`` (each split then holds
``ceil((T // G) / S) * G`` tokens, the last ones possibly fewer or none) or a sequence of per-split
token counts, each a multiple of ``G``, summing to ``T``. ``G`` is the largest token-group size of
the per-channel operands (1 when neither is per-channel), so no split cuts a token group.

The Triton kernel runs one program per (batch, kv head, split) serving all ``Hq // Hkv`` query heads
of that kv head (a group too large for one program's registers, more than 8 query heads at head
dim 128, is cut into a few row blocks, see ``_block_config``): it walks its chunk in tiles, loads
the packed key bytes and key stats of a tile once, unpacks and dequantizes them in registers,
computes the logits of every query head of the group, keeps one online softmax per query head, and
accumulates the unpacked, dequantized values; each packed byte is read once per split and row
block (not once per query head) and the dequantized cache is never written to memory. The kernel
runs when ``q`` is on CUDA or when ``PIKVPRESS_FORCE_TRITON=1``; the pure-torch reference runs
otherwise (it dequantizes the cache once to float32, then does float32 attention with one batched
matmul per kv head group).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from pikvpress.kernels.lazy_jit import LazyKernels, next_pow2
from pikvpress.kernels.quantize import ALLOWED_BITS, QuantizedTensor, _use_triton, dequantize_reference

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = [
    "choose_num_splits",
    "dense_attention_partial",
    "dense_decode_attention_partial",
    "merge_attention_states",
    "packed_attention_with_residual",
    "packed_decode_attention",
    "packed_decode_attention_partial",
    "packed_decode_attention_partial_reference",
    "programs_per_split",
    "split_bounds",
]

_LAYOUTS = ("per_channel", "per_token")


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
        Every boundary must be a multiple of this (the token-group size of the per-channel
        operands).
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
            f"num_splits sizes must be multiples of the token group size {align} (the largest group size "
            f"of the per-channel keys/values) so split boundaries align to token groups, got {sizes}"
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


def _check_quantized(qt: QuantizedTensor, name: str, device: torch.device) -> None:
    """Layout, bits, group size, and the shapes / devices of packed bytes and stats (the kernel
    addresses them as raw contiguous buffers, so a mismatch must not reach it)."""
    if qt.layout not in _LAYOUTS:
        raise ValueError(f"{name}.layout must be 'per_channel' or 'per_token', got {qt.layout!r}")
    if isinstance(qt.bits, bool) or not isinstance(qt.bits, int) or qt.bits not in ALLOWED_BITS:
        raise ValueError(f"{name}.bits must be one of {ALLOWED_BITS}, got {qt.bits!r}")
    g = qt.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or (g & (g - 1)):
        raise ValueError(f"{name}.group_size must be a positive power of two, got {g!r}")
    b, h, t, d = qt.shape
    if qt.layout == "per_channel" and t % g:
        raise ValueError(f"{name}.group_size {g} must divide the tokens {t} for layout 'per_channel'")
    if qt.layout == "per_token" and d % g:
        raise ValueError(f"{name}.group_size {g} must divide the dim {d} for layout 'per_token'")
    if (d * qt.bits) % 8:
        raise ValueError(f"{name}: dim * bits must be a multiple of 8, got dim={d}, bits={qt.bits}")
    for part in (qt.packed, qt.scale, qt.zero):
        if not isinstance(part, torch.Tensor) or part.device != device:
            raise ValueError(f"{name} (packed, scale and zero) must be tensors on q's device {device}")
    packed_shape = (b, h, t, d * qt.bits // 8)
    if qt.packed.dtype != torch.uint8 or tuple(qt.packed.shape) != packed_shape:
        raise ValueError(
            f"{name}.packed must be uint8 of shape {packed_shape}, got {qt.packed.dtype} {tuple(qt.packed.shape)}"
        )
    stats_shape = (b, h, t // g, d) if qt.layout == "per_channel" else (b, h, t, d // g)
    for sname, st in (("scale", qt.scale), ("zero", qt.zero)):
        if tuple(st.shape) != stats_shape or not st.is_floating_point():
            raise ValueError(
                f"{name}.{sname} must be floating point of shape {stats_shape} for layout {qt.layout!r}, "
                f"got {st.dtype} {tuple(st.shape)}"
            )


def _check_packed(q: torch.Tensor, k_packed: QuantizedTensor, v_packed: QuantizedTensor, scale: float) -> int:
    _check_q_scale(q, scale)
    if not isinstance(k_packed, QuantizedTensor):
        raise ValueError(f"k_packed must be a QuantizedTensor, got {type(k_packed).__name__}")  # noqa: TRY004
    if not isinstance(v_packed, QuantizedTensor):
        raise ValueError(f"v_packed must be a QuantizedTensor, got {type(v_packed).__name__}")  # noqa: TRY004
    group = _check_shapes(q, k_packed.shape, v_packed.shape, "k_packed", "v_packed")
    _check_quantized(k_packed, "k_packed", q.device)
    _check_quantized(v_packed, "v_packed", q.device)
    return group


def _token_align(*operands: QuantizedTensor) -> int:
    """Split alignment: the largest token-group size of the per-channel operands (1 if none).
    Group sizes are powers of two, so the largest is a multiple of every other one."""
    return max((qt.group_size for qt in operands if qt.layout == "per_channel"), default=1)


def _check_kv_mask(kv_mask: torch.Tensor | None, q: torch.Tensor, kv_shape: tuple) -> None:
    """``kv_mask``: None, or bool ``(B, Hkv, T)`` / ``(B, 1, T)`` on q's device."""
    if kv_mask is None:
        return
    b, hkv, t = kv_shape[:3]
    if not isinstance(kv_mask, torch.Tensor):
        raise ValueError(f"kv_mask must be a bool tensor or None, got {type(kv_mask).__name__}")  # noqa: TRY004
    if kv_mask.dtype != torch.bool:
        raise ValueError(f"kv_mask must be a bool tensor (True = attend), got dtype {kv_mask.dtype}")
    if kv_mask.ndim != 3 or kv_mask.shape[0] != b or kv_mask.shape[1] not in (1, hkv) or kv_mask.shape[2] != t:
        raise ValueError(
            f"kv_mask must have shape (B, Hkv, T) = {(b, hkv, t)} or (B, 1, T) = {(b, 1, t)}, "
            f"got {tuple(kv_mask.shape)}"
        )
    if kv_mask.device != q.device:
        raise ValueError(f"kv_mask must be on q's device {q.device}, got {kv_mask.device}")


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


def _codes_f32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 ``(..., NB)`` into float32 codes ``(..., NB * 8 // bits)`` (a fresh tensor).

    One shift-and-mask per slot of a byte, converted to float32 as it is copied into that slot's
    strided positions of the output.
    """
    if bits == 8:
        return packed.float()
    per = 8 // bits
    m = (1 << bits) - 1
    out = torch.empty((*packed.shape, per), dtype=torch.float32, device=packed.device)
    for j in range(per):
        out[..., j] = (packed >> (j * bits)) & m if j else packed & m
    return out.flatten(-2)


def _dequantize_f32(qt: QuantizedTensor) -> torch.Tensor:
    """float32 ``q * scale + zero`` of ``qt`` ``(B, H, T, D)``: the stats broadcast over their groups
    (never repeated) and fused in place into the unpacked codes with one ``addcmul``."""
    b, h, t, d = qt.shape
    g = qt.group_size
    x = _codes_f32(qt.packed, qt.bits)
    s, z = qt.scale.float(), qt.zero.float()
    if qt.layout == "per_channel":
        xv, s, z = x.view(b, h, t // g, g, d), s.unsqueeze(3), z.unsqueeze(3)
    else:
        xv, s, z = x.view(b, h, t, d // g, g), s.unsqueeze(4), z.unsqueeze(4)
    torch.addcmul(z, xv, s, out=xv)
    return x


def _folds_values(vq: QuantizedTensor) -> bool:
    """Values per token with one channel group per token: their scale and zero fold into the weights."""
    return vq.layout == "per_token" and vq.group_size == vq.shape[3]


def _weighted_values(p: torch.Tensor, vq: QuantizedTensor) -> torch.Tensor:
    """``p @ dequantize(vq)`` for weights ``p`` ``(B, H, M, T)``; folds the value stats when it can,
    ``(p * s) @ codes + p @ zero``, so the values are never dequantized."""
    if _folds_values(vq):
        return torch.matmul(p * vq.scale.float().transpose(-1, -2), _codes_f32(vq.packed, vq.bits)).add_(
            torch.matmul(p, vq.zero.float())
        )
    return torch.matmul(p, _dequantize_f32(vq))


def _softmax_av(logits: torch.Tensor, v: torch.Tensor | QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` (..., T) float32, ``v`` (..., T, Dv) float32 or packed -> (softmax(logits) @ v,
    logsumexp); a row of only ``-inf`` logits (every token masked, or T = 0) gives 0 and ``-inf``."""
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    out = _weighted_values(p, v) if isinstance(v, QuantizedTensor) else torch.matmul(p, v)
    return out.masked_fill_(torch.isneginf(lse).unsqueeze(-1), 0.0), lse


def _partial_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | QuantizedTensor,
    scale: float,
    bounds: list[int],
    kv_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 per-split attention of ``q`` (B, Hq, D) over ``k`` (B, Hkv, T, D), ``v`` (B, Hkv, T, Dv).

    The query heads of one kv head are batched as rows of one matmul against that head's keys (no
    copy of K/V per query head); the logits of all splits come from that one matmul. ``v`` may be a
    packed tensor whose stats fold into the weights (see :func:`_folds_values`) when there is one split.
    """
    b, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    group = hq // hkv
    ns = len(bounds) - 1
    k = k.float()
    if isinstance(v, torch.Tensor):
        v = v.float()
    logits = torch.matmul(q.float().reshape(b, hkv, group, d), k.transpose(-1, -2))  # (B, Hkv, G, T)
    logits.mul_(scale)
    if kv_mask is not None:  # (B, Hkv or 1, T) -> (B, Hkv or 1, 1, T), broadcast over G (and Hkv)
        logits.masked_fill_(~kv_mask.unsqueeze(2), float("-inf"))
    if ns == 1:  # the whole sequence; no per-split slicing or copies
        out, lse = _softmax_av(logits, v)
        return out.reshape(b, hq, 1, dv), lse.reshape(b, hq, 1)
    out = torch.zeros((b, hkv, group, ns, dv), dtype=torch.float32, device=q.device)
    lse = torch.full((b, hkv, group, ns), float("-inf"), dtype=torch.float32, device=q.device)
    for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi > lo:
            out[:, :, :, s], lse[:, :, :, s] = _softmax_av(logits[..., lo:hi], v[:, :, lo:hi])
    return out.view(b, hq, ns, dv), lse.view(b, hq, ns)


def _partial_cpu(
    q: torch.Tensor,
    kq: QuantizedTensor,
    vq: QuantizedTensor,
    scale: float,
    bounds: list[int],
    kv_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: the reference's float32 math, with the codes unpacked by shifts and, with one
    split, the value stats folded into the weights when values are per token in one group (the KIVI
    default), so the values are never dequantized."""
    v = vq if len(bounds) == 2 and _folds_values(vq) else _dequantize_f32(vq)
    return _partial_reference(q, _dequantize_f32(kq), v, scale, bounds, kv_mask)


def packed_attention_with_residual(
    q: torch.Tensor,
    k_packed: QuantizedTensor | None,
    v_packed: QuantizedTensor | None,
    k_residual: torch.Tensor,
    v_residual: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over packed tokens followed by full-precision tokens, one softmax (CPU).

    The pure-torch path pikvpress's attention function takes off CUDA: the packed keys are unpacked
    and dequantized for the duration of the call (one layer at a time), the value stats fold into
    the weights, and packed and residual logits share one softmax, so a decode step costs a few dozen
    tensor ops per layer. On CUDA the attention function uses the split Triton kernel and
    :func:`merge_attention_states` instead; both equal dense attention over the dequantized cache.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, Lq, D)``.
    k_packed, v_packed : QuantizedTensor or None
        ``(B, Hkv, P, D)`` / ``(B, Hkv, P, Dv)``, or None when nothing is packed yet.
    k_residual, v_residual : torch.Tensor
        ``(B, Hkv, R, D)`` / ``(B, Hkv, R, Dv)``, the tokens after the packed ones.
    scale : float
        Softmax scale.
    keep : torch.Tensor, optional
        bool, broadcastable to ``(B, Hq, Lq, P + R)``; False drops a token for that query.
    sinks : torch.Tensor, optional
        ``(Hq,)`` per-head sink logits joining the softmax with no value (GPT-OSS).

    Returns
    -------
    torch.Tensor
        ``(B, Hq, Lq, Dv)`` float32; 0 for a query that keeps no token.
    """
    b, hq, lq, d = q.shape
    hkv = k_residual.shape[1]
    m = (hq // hkv) * lq
    p_len = 0 if k_packed is None else k_packed.shape[2]
    n = p_len + k_residual.shape[2]
    qf = q.float().reshape(b, hkv, m, d)
    logits = torch.matmul(qf, k_residual.float().transpose(-1, -2))
    if p_len:
        logits = torch.cat([torch.matmul(qf, _dequantize_f32(k_packed).transpose(-1, -2)), logits], dim=-1)
    logits = logits.mul_(scale).view(b, hq, lq, n)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.float().view(1, hq, 1, 1).expand(b, hq, lq, 1)], dim=-1)
    p = torch.softmax(logits, dim=-1)
    if keep is not None:
        p = p.nan_to_num_(0.0)  # a query that keeps nothing
    p = p[..., :n].reshape(b, hkv, m, n)
    out = torch.matmul(p[..., p_len:], v_residual.float())
    if p_len:
        out = out.add_(_weighted_values(p[..., :p_len], v_packed))
    return out.view(b, hq, lq, -1)


def packed_decode_attention_partial_reference(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`packed_decode_attention_partial` (dequantizes the whole cache
    once to float32, then float32 attention)."""
    _check_packed(q, k_packed, v_packed, scale)
    _check_kv_mask(kv_mask, q, k_packed.shape)
    bounds = split_bounds(k_packed.shape[2], num_splits, _token_align(k_packed, v_packed))
    k, v = dequantize_reference(k_packed, torch.float32), dequantize_reference(v_packed, torch.float32)
    return _partial_reference(q, k, v, float(scale), bounds, kv_mask)


def dense_decode_attention_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
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
    kv_mask : torch.Tensor, optional
        bool ``(B, Hkv, T)`` or ``(B, 1, T)``; False drops the token.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(B, Hq, S, Dv)`` float32 and ``lse`` ``(B, Hq, S)`` float32.
    """
    _check_q_scale(q, scale)
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    _check_shapes(q, tuple(k.shape), tuple(v.shape), "k", "v")
    _check_kv_mask(kv_mask, q, tuple(k.shape))
    bounds = split_bounds(k.shape[2], num_splits, 1)
    return _partial_reference(q, k, v, float(scale), bounds, kv_mask)


# --------------------------------------------------------------------------------------------------
# Triton kernel
#
# As in quantize.py: the body is a plain function jitted on first use (triton.jit reads
# TRITON_INTERPRET when it decorates), and reductions use tl.reduce with triton.language.standard's
# combine functions, which the interpreter can run after a late switch-on.
# Addressing: q (B*Hq, D), query head h of batch b in row b * Hq + h = (b * Hkv + hk) * GROUP + g
# for kv head hk = h // GROUP and row g = h % GROUP of its group; packed keys (B*Hkv*T, NBK) bytes,
# packed values (B*Hkv*T, NBV) bytes, channel = byte * PER + slot. Stats of an operand with group
# size G over rows R = B*Hkv*T: per channel (R // G, D) (row r in stats row r // G), per token
# (R, D // G) (channel c in column c // G). kv_mask: bytes at b * MSB + hk * MSH + t * MST (MSH = 0
# when broadcast over kv heads).
#
# Grouped-query attention: one program serves a block of BLOCK_G query heads (rows) of ONE kv head,
# all GROUP of them unless the group is larger than the row cap of _block_config, so every packed
# K/V byte and stat of a split is read and dequantized once per (kv head, split, row block), not
# once per query head. The rows share each dequantized tile:
# - logits (BLOCK_G, BLOCK_T): broadcast product (BLOCK_G, BLOCK_T, D) summed over the channels
#   with tl.reduce (the channels spread over the lanes, so no thread holds a whole q or k row);
# - values: tl.dot (BLOCK_G, BLOCK_T) x (BLOCK_T, Dv) with input_precision "ieee", exact float32
#   FMA products like the reference (tensor-core "tf32" would lose ~3 decimal digits). Its
#   reduction axis is the short token tile, which Triton's FMA dot keeps whole in each thread; the
#   same dot for the logits (reduction over D) did so for all of D and spilled at D = 256, while a
#   broadcast product for the values spilled more than the dot (ptxas for sm_90).
# The interpreter runs tl.dot as a numpy float32 matmul.
# --------------------------------------------------------------------------------------------------


def _packed_decode_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    kz_ptr,
    vp_ptr,
    vs_ptr,
    vz_ptr,
    mask_ptr,
    bounds_ptr,
    out_ptr,
    lse_ptr,
    sm_scale,
    HKV,
    T,
    D,
    DV,
    NBK,
    NBV,
    NGK,
    NGV,
    MSB,
    MSH,
    MST,
    NUM_SPLITS,
    N_TILES,
    KV_GROUP,
    ROW_BLOCKS,
    BITS_K: tl.constexpr,
    PER_K: tl.constexpr,
    GK: tl.constexpr,
    K_PER_TOKEN: tl.constexpr,
    BITS_V: tl.constexpr,
    PER_V: tl.constexpr,
    GV: tl.constexpr,
    V_PER_CHANNEL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NBK: tl.constexpr,
    BLOCK_NBV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (batch, kv head, row block, split); grid ``(B * HKV * ROW_BLOCKS, NUM_SPLITS)``.

    Row block ``rb`` holds the query heads ``rb * BLOCK_G ..`` of the kv head's group (rows past
    ``KV_GROUP`` are masked: query 0, never stored).
    """
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rb = pid % ROW_BLOCKS
    bhk = pid // ROW_BLOCKS  # b * HKV + hk
    b = bhk // HKV
    hk = bhk % HKV
    MASK_K: tl.constexpr = (1 << BITS_K) - 1
    MASK_V: tl.constexpr = (1 << BITS_V) - 1
    BLOCK_D: tl.constexpr = BLOCK_NBK * PER_K
    BLOCK_DV: tl.constexpr = BLOCK_NBV * PER_V

    start = tl.load(bounds_ptr + sp).to(tl.int64)
    end = tl.load(bounds_ptr + sp + 1).to(tl.int64)
    kv_row0 = bhk * T  # first token row of this kv head
    mask_row = mask_ptr + b * MSB + hk * MSH  # this kv head's kv_mask row (unused without a mask)

    g = rb * BLOCK_G + tl.arange(0, BLOCK_G)  # rows of the group
    gmask = g < KV_GROUP
    qrow = bhk * KV_GROUP + g  # [BLOCK_G] row of q / out / lse, i.e. b * HQ + h

    kbyte = tl.arange(0, BLOCK_NBK)
    kslot = tl.arange(0, PER_K)
    kcol = tl.arange(0, BLOCK_D)  # channel = byte * PER_K + slot, the reshape order of [NBK, PER_K]
    kcmask = kcol < D
    qv = tl.load(q_ptr + qrow[:, None] * D + kcol[None, :], mask=gmask[:, None] & kcmask[None, :], other=0.0)
    qv = qv.to(tl.float32)  # [BLOCK_G, BLOCK_D]

    vbyte = tl.arange(0, BLOCK_NBV)
    vslot = tl.arange(0, PER_V)
    vcol = tl.arange(0, BLOCK_DV)
    vcmask = vcol < DV
    # stats: per token, the channel groups of each token; per channel, the stats rows a tile covers.
    # Split starts are multiples of every per-channel G and BLOCK_T, G are powers of two, so a tile
    # starts at a multiple of GT = min(G, BLOCK_T) and covers BLOCK_T // GT rows, one per GT tokens.
    GKT: tl.constexpr = GK if GK < BLOCK_T else BLOCK_T  # noqa: FURB136 (constexpr arithmetic, no min())
    GVT: tl.constexpr = GV if GV < BLOCK_T else BLOCK_T  # noqa: FURB136
    kgrp = tl.arange(0, BLOCK_D // GK) if K_PER_TOKEN else tl.arange(0, 1)
    vgrp = tl.arange(0, BLOCK_DV // GV) if not V_PER_CHANNEL else tl.arange(0, 1)
    kstat_t = tl.arange(0, BLOCK_T // GKT) * GKT
    vstat_t = tl.arange(0, BLOCK_T // GVT) * GVT

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for i in range(N_TILES):
        t0 = start + i * BLOCK_T
        t = t0 + offs_t  # [BLOCK_T] token index within the kv head
        tmask = t < end
        if HAS_MASK:  # dropped tokens are treated like tokens past the split: never loaded, p = 0
            keep = tl.load(mask_row + t * MST, mask=tmask, other=0)
            tmask = tmask & (keep != 0)
        rows = kv_row0 + t
        # keys: unpack the tile's bytes once, dequantize in registers, shared by the BLOCK_G rows
        kb = tl.load(
            kp_ptr + rows[:, None] * NBK + kbyte[None, :], mask=tmask[:, None] & (kbyte < NBK)[None, :], other=0
        ).to(tl.int32)
        kq = tl.reshape((kb[:, :, None] >> (kslot * BITS_K)[None, None, :]) & MASK_K, (BLOCK_T, BLOCK_D))
        # key stats: each distinct stat loaded once and broadcast over its group in registers
        if K_PER_TOKEN:  # (BLOCK_T, NG) -> (BLOCK_T, NG, GK) -> (BLOCK_T, BLOCK_D)
            ksoff = rows[:, None] * NGK + kgrp[None, :]
            ksmask = tmask[:, None] & (kgrp < NGK)[None, :]
            ks = tl.load(ks_ptr + ksoff, mask=ksmask, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + ksoff, mask=ksmask, other=0.0).to(tl.float32)
            ks = tl.reshape(tl.broadcast_to(ks[:, :, None], (BLOCK_T, BLOCK_D // GK, GK)), (BLOCK_T, BLOCK_D))
            kz = tl.reshape(tl.broadcast_to(kz[:, :, None], (BLOCK_T, BLOCK_D // GK, GK)), (BLOCK_T, BLOCK_D))
        else:  # the tile's stats rows (BLOCK_T // GKT, BLOCK_D) -> (.., GKT, BLOCK_D) -> (BLOCK_T, BLOCK_D)
            kt0 = t0 + kstat_t  # first token of each stats row of the tile (groups never cross a split)
            ksoff = ((kv_row0 + kt0) // GK)[:, None] * D + kcol[None, :]
            ksmask = (kt0 < end)[:, None] & kcmask[None, :]
            ks = tl.load(ks_ptr + ksoff, mask=ksmask, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + ksoff, mask=ksmask, other=0.0).to(tl.float32)
            ks = tl.reshape(tl.broadcast_to(ks[:, None, :], (BLOCK_T // GKT, GKT, BLOCK_D)), (BLOCK_T, BLOCK_D))
            kz = tl.reshape(tl.broadcast_to(kz[:, None, :], (BLOCK_T // GKT, GKT, BLOCK_D)), (BLOCK_T, BLOCK_D))
        # [BLOCK_T, BLOCK_D]; 0 past the split and the channels; a token dropped by kv_mask inside a
        # per-channel group gets its (finite) zero point, and its logit is -inf below anyway
        kx = kq.to(tl.float32) * ks + kz
        logit = tl.reduce(qv[:, None, :] * kx[None, :, :], 2, tl.standard._sum_combine)  # [BLOCK_G, BLOCK_T]
        logit = tl.where(tmask[None, :], logit * sm_scale, float("-inf"))
        # online softmax per row; a fully masked tile keeps m at -inf, so exponents use a finite stand-in
        m_new = tl.maximum(m_i, tl.reduce(logit, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(tmask[None, :], tl.exp(logit - m_safe[:, None]), 0.0)  # [BLOCK_G, BLOCK_T]
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        # values: unpack and dequantize once in registers
        vb = tl.load(
            vp_ptr + rows[:, None] * NBV + vbyte[None, :], mask=tmask[:, None] & (vbyte < NBV)[None, :], other=0
        ).to(tl.int32)
        vq = tl.reshape((vb[:, :, None] >> (vslot * BITS_V)[None, None, :]) & MASK_V, (BLOCK_T, BLOCK_DV))
        if V_PER_CHANNEL:
            vt0 = t0 + vstat_t
            vsoff = ((kv_row0 + vt0) // GV)[:, None] * DV + vcol[None, :]
            vsmask = (vt0 < end)[:, None] & vcmask[None, :]
            vs = tl.load(vs_ptr + vsoff, mask=vsmask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + vsoff, mask=vsmask, other=0.0).to(tl.float32)
            vs = tl.reshape(tl.broadcast_to(vs[:, None, :], (BLOCK_T // GVT, GVT, BLOCK_DV)), (BLOCK_T, BLOCK_DV))
            vz = tl.reshape(tl.broadcast_to(vz[:, None, :], (BLOCK_T // GVT, GVT, BLOCK_DV)), (BLOCK_T, BLOCK_DV))
        else:
            vsoff = rows[:, None] * NGV + vgrp[None, :]
            vsmask = tmask[:, None] & (vgrp < NGV)[None, :]
            vs = tl.load(vs_ptr + vsoff, mask=vsmask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + vsoff, mask=vsmask, other=0.0).to(tl.float32)
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_T, BLOCK_DV // GV, GV)), (BLOCK_T, BLOCK_DV))
            vz = tl.reshape(tl.broadcast_to(vz[:, :, None], (BLOCK_T, BLOCK_DV // GV, GV)), (BLOCK_T, BLOCK_DV))
        vx = vq.to(tl.float32) * vs + vz  # [BLOCK_T, BLOCK_DV]; p = 0 wherever it is not a kept token
        acc = tl.dot(p, vx, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0  # [BLOCK_G]
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    tl.store(out_ptr + (qrow[:, None] * NUM_SPLITS + sp) * DV + vcol[None, :], o, mask=gmask[:, None] & vcmask[None, :])
    tl.store(lse_ptr + qrow * NUM_SPLITS + sp, lse, mask=gmask)


_KERNEL_FNS = {"packed_decode": _packed_decode_kernel}
_kernel = LazyKernels(_KERNEL_FNS)

#: Number of Triton launches made by this module (tests read it to prove the kernel ran).
LAUNCHES = {"count": 0}

#: input_precision of the kernel's float32 tl.dot ("ieee": exact float32 products).
_DOT_PRECISION = "ieee"

#: Register budget of one program (8 warps): the broadcast logit product BLOCK_G * BLOCK_T * Dmax
#: at most _PRODUCT_BUDGET elements (64 per thread) and a dequantized tile BLOCK_T * Dmax at most
#: _TILE_BUDGET (32 per thread); 4 warps when the product is at most half the budget. Dmax is the
#: larger padded dim.
_PRODUCT_BUDGET = 16384
_TILE_BUDGET = 8192
#: Token tile bounds (the K extent of the float32 value dot must be >= 8; 16 keeps the loop short).
_MIN_BLOCK_T = 16
_MAX_BLOCK_T = 64
_MAX_BLOCK_G = 64


def _block_config(group: int, longest: int, dim: int, value_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_G, row blocks, BLOCK_T, num_warps)`` for a kv-head group of ``group`` query heads,
    a longest split of ``longest`` tokens and key / value dims ``dim`` / ``value_dim``.

    Rows: the whole group in one program (one read of the packed bytes per split) up to
    ``_PRODUCT_BUDGET / (16 * Dmax)`` rows: 8 at D = 128 (GQA groups of 2-8 are one block), 4 at
    256, 16 at 64, never more than 64. A larger group (e.g. 8 heads x 5 flattened query tokens = 40
    at D = 128: five blocks of 8) is cut into ``ceil(group / BLOCK_G)`` row blocks, each its own
    program re-reading the split's bytes (concurrently, so mostly from L2): that many reads, not
    ``group``. Tokens: the largest power of two <= 64 within both budgets (the tile shrinks as the
    rows grow: at D = 128, 64 tokens for 1-2 rows, 32 for 4, 16 for 8), no larger than the longest
    split, at least 16.

    Checked by compiling for sm_90 and reading ptxas's report (D = Dv = 64 / 128 / 256, 2 / 4 / 8
    bits, both layouts, with and without kv_mask): no register spills; twice the product budget
    (16 rows at D = 128) spilled in some layouts, as did the old one-row-per-program kernel at its
    64-token tile.
    """
    dmax = max(next_pow2(dim), next_pow2(value_dim), 8)
    block_g = min(next_pow2(group), _MAX_BLOCK_G, max(1, _PRODUCT_BUDGET // (_MIN_BLOCK_T * dmax)))
    row_blocks = -(-group // block_g)
    fit = min(_PRODUCT_BUDGET // (block_g * dmax), _TILE_BUDGET // dmax)
    fit = 1 << max(0, fit.bit_length() - 1)  # largest power of two <= fit
    block_t = max(_MIN_BLOCK_T, min(_MAX_BLOCK_T, fit, next_pow2(max(1, longest))))
    num_warps = 4 if 2 * block_g * block_t * dmax <= _PRODUCT_BUDGET else 8
    return block_g, row_blocks, block_t, num_warps


def programs_per_split(batch: int, q_heads: int, kv_heads: int, dim: int, value_dim: int) -> int:
    """Programs the kernel launches per split, ``batch * kv_heads * row blocks`` (callers sizing
    ``num_splits`` to fill a GPU should count these, not query heads)."""
    return batch * kv_heads * _block_config(q_heads // kv_heads, 1, dim, value_dim)[1]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace this to poison outputs before each launch)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _partial_triton(
    q: torch.Tensor,
    kq: QuantizedTensor,
    vq: QuantizedTensor,
    scale: float,
    bounds: list[int],
    group: int,
    kv_mask: torch.Tensor | None,
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
    block_g, row_blocks, block_t, num_warps = _block_config(group, longest, d, dv)
    n_tiles = -(-longest // block_t)
    bounds_t = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    if kv_mask is None:
        mask_arg, msb, msh, mst = bounds_t, 0, 0, 0  # never read (HAS_MASK=False)
    else:  # the bool bytes in place, strided; a broadcast head axis gets stride 0
        mask_arg = kv_mask.view(torch.uint8)
        msb, mst = kv_mask.stride(0), kv_mask.stride(2)
        msh = 0 if kv_mask.shape[1] == 1 else kv_mask.stride(1)
    _kernel("packed_decode")[(b * hkv * row_blocks, ns)](
        q.contiguous(),
        kq.packed.contiguous(),
        kq.scale.contiguous(),
        kq.zero.contiguous(),
        vq.packed.contiguous(),
        vq.scale.contiguous(),
        vq.zero.contiguous(),
        mask_arg,
        bounds_t,
        out,
        lse,
        float(scale),
        hkv,
        t,
        d,
        dv,
        nbk,
        nbv,
        d // kq.group_size if kq.layout == "per_token" else 0,
        dv // vq.group_size if vq.layout == "per_token" else 0,
        msb,
        msh,
        mst,
        ns,
        n_tiles,
        group,
        row_blocks,
        BITS_K=kq.bits,
        PER_K=per_k,
        GK=kq.group_size,
        K_PER_TOKEN=kq.layout == "per_token",
        BITS_V=vq.bits,
        PER_V=per_v,
        GV=vq.group_size,
        V_PER_CHANNEL=vq.layout == "per_channel",
        HAS_MASK=kv_mask is not None,
        BLOCK_G=block_g,
        BLOCK_T=block_t,
        BLOCK_NBK=next_pow2(nbk),
        BLOCK_NBV=next_pow2(nbv),
        DOT_PRECISION=_DOT_PRECISION,
        num_warps=num_warps,
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
    *,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split decode attention over packed K/V: (output, log-sum-exp) per split.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, D)``, one decode query per head; float16, bfloat16 or float32.
    k_packed : QuantizedTensor
        Keys, layout ``"per_channel"`` (KIVI, :func:`~pikvpress.kernels.quantize.quantize_keys`) or
        ``"per_token"``, shape ``(B, Hkv, T, D)``; ``Hq % Hkv == 0``.
    v_packed : QuantizedTensor
        Values, layout ``"per_token"`` (KIVI, :func:`~pikvpress.kernels.quantize.quantize_values`)
        or ``"per_channel"``, shape ``(B, Hkv, T, Dv)``.
    scale : float
        Softmax scale applied to ``q . k``.
    num_splits : int or sequence of int
        Splits of the T axis, aligned to the largest token-group size of the per-channel operands
        (1 if none); see :func:`split_bounds`.
    kv_mask : torch.Tensor, optional
        bool ``(B, Hkv, T)``, or ``(B, 1, T)`` broadcast over kv heads, on ``q``'s device; True
        attends to the token, False drops it (logit ``-inf``). Any strides; it is read in place.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(B, Hq, S, Dv)`` float32, each split's softmax-normalised output (0 for an empty
        split), and ``lse`` ``(B, Hq, S)`` float32, natural-log log-sum-exp of the split's scaled
        logits (``-inf`` for an empty split). A split whose tokens are all dropped by ``kv_mask``
        is empty.
    """
    group = _check_packed(q, k_packed, v_packed, scale)
    _check_kv_mask(kv_mask, q, k_packed.shape)
    bounds = split_bounds(k_packed.shape[2], num_splits, _token_align(k_packed, v_packed))
    if _use_triton(q):
        return _partial_triton(q, k_packed, v_packed, float(scale), bounds, group, kv_mask)
    return _partial_cpu(q, k_packed, v_packed, float(scale), bounds, kv_mask)


def packed_decode_attention(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over packed K/V: :func:`packed_decode_attention_partial`, then
    :func:`merge_attention_states`. Returns ``(B, Hq, Dv)`` in ``q``'s dtype (0 for a query whose
    tokens are all dropped by ``kv_mask``)."""
    out, lse = packed_decode_attention_partial(q, k_packed, v_packed, scale, num_splits, kv_mask=kv_mask)
    merged, _ = merge_attention_states(out, lse, dim=2)
    return merged.to(q.dtype)


def dense_attention_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (output, log-sum-exp) of ``q`` ``(B, Hq, Lq, D)`` over dense ``k`` ``(B, Hkv, R, D)`` and ``v``
    ``(B, Hkv, R, Dv)`` (grouped-query: query head ``h`` reads kv head ``h // (Hq // Hkv)``), any device.

    ``keep`` is a bool mask broadcastable to ``(B, Hq, Lq, R)`` (False drops the token). Returns ``out``
    ``(B, Hq, Lq, Dv)`` and ``lse`` ``(B, Hq, Lq)``; a query that keeps no token gets ``out = 0``,
    ``lse = -inf`` (an empty partial for :func:`merge_attention_states`).
    """
    b, hq, lq, d = q.shape
    hkv, r, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    logits = torch.matmul(q.float().reshape(b, hkv, g * lq, d), k.float().transpose(-1, -2)) * scale
    logits = logits.view(b, hq, lq, r)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    out = torch.matmul(p.view(b, hkv, g * lq, r), v.float()).view(b, hq, lq, dv)
    return out, lse


def packed_attention_partial(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Dv), lse (B, Hq))`` float32: :func:`packed_decode_attention_partial` of ``q`` ``(B, Hq, D)``
    over every packed token, split along the sequence as :func:`choose_num_splits` says, the splits merged."""
    b, hq, _ = q.shape
    programs = programs_per_split(b, hq, k_packed.shape[1], k_packed.shape[3], v_packed.shape[3])
    splits = choose_num_splits(q, programs, k_packed.shape[2])
    out, lse = packed_decode_attention_partial(q, k_packed, v_packed, scale, splits, kv_mask=kv_mask)
    return merge_attention_states(out, lse, dim=2)


def choose_num_splits(q: torch.Tensor, programs: int, packed_len: int) -> int:
    """Sequence splits for the packed kernel: enough programs (``programs`` per split) to fill the GPU twice
    over, >= 256 tokens each; 1 off CUDA."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = math.ceil(2 * sms / max(1, programs))
    return max(1, min(want, math.ceil(packed_len / 256)))
