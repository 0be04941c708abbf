"""Attention partials over packed (quantized) and dense K/V, and their exact merge.

This module checks arguments, sizes and launches the Triton kernel (its code is in
:mod:`pikvpress.kernels.attention_triton`) and dispatches: the kernel on CUDA, the pure-torch code of
:mod:`pikvpress.kernels.attention_reference` elsewhere. The names are explained in :mod:`pikvpress.kernels`.

The unit is the *partial*: an attention output over part of the KV, softmax-normalised over that
part, with the natural-log log-sum-exp ``l`` of its scaled logits. Partials over disjoint parts merge
exactly (FlashInfer's ``merge_state`` identity, :func:`merge_partials`)::

    L = logsumexp_s(l_s)            o = sum_s exp(l_s - L) * o_s

An empty part has ``l_s = -inf`` and ``o_s = 0`` and drops out of the merge.

:func:`packed_attention_split_partials` cuts the sequence axis of a packed cache into contiguous
splits and returns the partial of every split. Keys and values are
:class:`~pikvpress.kernels.quantize.QuantizedTensor` objects of either layout: ``"per_channel"``
(groups of consecutive tokens share a scale and zero per channel, what
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

The Triton kernel (:mod:`pikvpress.kernels.attention_triton`) runs one program per (batch, kv head,
split) serving all ``Hq // Hkv`` query heads of that kv head (a group too large for one program's
registers, more than 8 query heads at head dim 128, is cut into a few row blocks, see
``_block_config``): it walks its chunk in tiles, loads the packed key bytes and key stats of a tile
once, unpacks and dequantizes them in registers, computes the logits of every query head of the
group, keeps one online softmax per query head, and accumulates the unpacked, dequantized values;
each packed byte is read once per split and row block (not once per query head) and the dequantized
cache is never written to memory. The kernel runs when ``q`` is on CUDA or when
``PIKVPRESS_FORCE_TRITON=1``; the pure-torch code runs otherwise (it dequantizes the cache once to
float32, then does float32 attention with one batched matmul per kv head group).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from pikvpress.kernels.attention_reference import (
    attention_partial,
    packed_attention_with_residual,
    packed_split_partials,
    split_partials,
)
from pikvpress.kernels.attention_triton import HELPERS, KERNELS
from pikvpress.kernels.lazy_jit import LazyKernels, next_pow2
from pikvpress.kernels.quantize import ALLOWED_BITS, QuantizedTensor, _use_triton, dequantize_reference

__all__ = [
    "attention_partial",
    "attention_split_partials",
    "choose_num_splits",
    "merge_partials",
    "merge_partials_or_empty",
    "packed_attention",
    "packed_attention_partial",
    "packed_attention_split_partials",
    "packed_attention_split_partials_reference",
    "packed_attention_with_residual",
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


def merge_partials(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    dim: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge partials ``(out, lse)`` along the split axis (FlashInfer's ``merge_states``).

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


def merge_partials_or_empty(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    lse_shape: tuple[int, ...],
    dv: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_partials` of the partials ``lses`` ``lse_shape`` (and ``outs``, ``lse_shape + (dv,)``), stacked
    along a new last axis of ``lses``; with none (every shard empty or unread), the empty partial: ``out = 0``,
    ``lse = -inf``, float32 on ``device``."""
    if outs:
        return merge_partials(torch.stack(list(outs), dim=len(lse_shape)), torch.stack(list(lses), dim=len(lse_shape)))
    return (
        torch.zeros((*lse_shape, dv), dtype=torch.float32, device=device),
        torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=device),
    )


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------

_kernel = LazyKernels(KERNELS, HELPERS)

#: Number of Triton launches made by this module (tests read it to prove the kernel ran).
LAUNCHES = {"count": 0}

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


def _packed_split_partials_triton(
    q: torch.Tensor,
    kq: QuantizedTensor,
    vq: QuantizedTensor,
    scale: float,
    bounds: list[int],
    group: int,
    kv_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split kernel on checked arguments (``bounds`` from :func:`split_bounds`)."""
    b, hq, d = q.shape
    _, hkv, t, _ = kq.shape
    dv = vq.shape[3]
    ns = len(bounds) - 1
    out = _empty((b, hq, ns, dv), torch.float32, q.device)
    lse = _empty((b, hq, ns), torch.float32, q.device)
    if b * hq == 0:
        return out, lse
    nbk, nbv = d * kq.bits // 8, dv * vq.bits // 8  # packed bytes per token
    ngk = d // kq.group_size if kq.layout == "per_token" else 0  # stats per token (per-token layout)
    ngv = dv // vq.group_size if vq.layout == "per_token" else 0
    longest = max(hi - lo for lo, hi in itertools.pairwise(bounds))
    block_g, row_blocks, block_t, num_warps = _block_config(group, longest, d, dv)
    bounds_t = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    if kv_mask is None:
        mask_arg, msb, msh, mst = bounds_t, 0, 0, 0  # never read (HAS_MASK=False)
    else:  # the bool bytes in place, strided; a broadcast head axis gets stride 0
        mask_arg = kv_mask.view(torch.uint8)
        msb, mst = kv_mask.stride(0), kv_mask.stride(2)
        msh = 0 if kv_mask.shape[1] == 1 else kv_mask.stride(1)
    _kernel("packed_attention_split_partials")[(b * hkv * row_blocks, ns)](
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
        ngk,
        ngv,
        msb,
        msh,
        mst,
        ns,
        -(-longest // block_t),  # N_TILES
        group,
        row_blocks,
        BITS_K=kq.bits,
        GK=kq.group_size,
        K_PER_TOKEN=kq.layout == "per_token",
        BITS_V=vq.bits,
        GV=vq.group_size,
        V_PER_TOKEN=vq.layout == "per_token",
        HAS_MASK=kv_mask is not None,
        BLOCK_G=block_g,
        BLOCK_T=block_t,
        BLOCK_NBK=next_pow2(nbk),
        BLOCK_NBV=next_pow2(nbv),
        num_warps=num_warps,
    )
    LAUNCHES["count"] += 1
    return out, lse


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _checked_splits(q, k_packed, v_packed, scale, num_splits, kv_mask) -> tuple[int, list[int]]:
    """Check the operands of a packed split-partials call; return the query heads per kv head and the splits."""
    group = _check_packed(q, k_packed, v_packed, scale)
    _check_kv_mask(kv_mask, q, k_packed.shape)
    return group, split_bounds(k_packed.shape[2], num_splits, _token_align(k_packed, v_packed))


def packed_attention_split_partials(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial (output, log-sum-exp) of every split of the sequence axis over packed K/V.

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
    group, bounds = _checked_splits(q, k_packed, v_packed, scale, num_splits, kv_mask)
    if _use_triton(q):
        return _packed_split_partials_triton(q, k_packed, v_packed, float(scale), bounds, group, kv_mask)
    return packed_split_partials(q, k_packed, v_packed, float(scale), bounds, kv_mask)


def packed_attention_split_partials_reference(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`packed_attention_split_partials` (dequantizes the whole cache
    once to float32, then float32 attention)."""
    _, bounds = _checked_splits(q, k_packed, v_packed, scale, num_splits, kv_mask)
    k, v = dequantize_reference(k_packed, torch.float32), dequantize_reference(v_packed, torch.float32)
    return split_partials(q, k, v, float(scale), bounds, kv_mask)


def packed_attention_partial(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Dv), lse (B, Hq))`` float32: :func:`packed_attention_split_partials` of ``q`` ``(B, Hq, D)``
    over every packed token, split along the sequence as :func:`choose_num_splits` says, the splits merged."""
    b, hq, _ = q.shape
    programs = programs_per_split(b, hq, k_packed.shape[1], k_packed.shape[3], v_packed.shape[3])
    splits = choose_num_splits(q, programs, k_packed.shape[2])
    out, lse = packed_attention_split_partials(q, k_packed, v_packed, scale, splits, kv_mask=kv_mask)
    return merge_partials(out, lse, dim=2)


def packed_attention(
    q: torch.Tensor,
    k_packed: QuantizedTensor,
    v_packed: QuantizedTensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over packed K/V: :func:`packed_attention_split_partials`, then
    :func:`merge_partials`. Returns ``(B, Hq, Dv)`` in ``q``'s dtype (0 for a query whose
    tokens are all dropped by ``kv_mask``)."""
    out, lse = packed_attention_split_partials(q, k_packed, v_packed, scale, num_splits, kv_mask=kv_mask)
    merged, _ = merge_partials(out, lse, dim=2)
    return merged.to(q.dtype)


def attention_split_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_splits: int | Sequence[int] = 1,
    *,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of every split over dense (unpacked) K/V, same contract as
    :func:`packed_attention_split_partials` (pure torch on every device).

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
    return split_partials(q, k, v, float(scale), bounds, kv_mask)


def choose_num_splits(q: torch.Tensor, programs: int, packed_len: int) -> int:
    """Sequence splits for the packed kernel: enough programs (``programs`` per split) to fill the GPU twice
    over, >= 256 tokens each; 1 off CUDA."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = math.ceil(2 * sms / max(1, programs))
    return max(1, min(want, math.ceil(packed_len / 256)))
