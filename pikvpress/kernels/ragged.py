"""Attention over ragged heads: argument checks, the Triton launch and the dispatch (kernel on CUDA, reference
elsewhere). The layout is described in :mod:`pikvpress.kernels.ragged_reference`, the kernel in
:mod:`pikvpress.kernels.ragged_triton`.

- :func:`ragged_attention_split_partials`: the partial of every split of every head's own tokens,
  ``(B, Hq, Lq, S, Dv)`` and ``(B, Hq, Lq, S)``;
- :func:`ragged_attention_partial`: the partial over every head's tokens (the splits merged on CUDA; one softmax in
  pure torch elsewhere).
"""

from __future__ import annotations

import math

import torch

from pikvpress.kernels.attention import _block_config, choose_num_splits, merge_partials
from pikvpress.kernels.attention import _kernel as _packed_kernel
from pikvpress.kernels.lazy_jit import LazyKernels, next_pow2
from pikvpress.kernels.quantize import QuantizedTensor, _use_triton, dequantize
from pikvpress.kernels.ragged_reference import ragged_attention_partial as _partial_reference
from pikvpress.kernels.ragged_reference import ragged_lengths, ragged_split_partials
from pikvpress.kernels.ragged_triton import KERNELS

__all__ = ["ragged_attention_partial", "ragged_attention_split_partials", "ragged_chunk"]

_kernel = LazyKernels(KERNELS)

#: Number of Triton launches made by this module (tests read it to prove the kernel ran).
LAUNCHES = {"count": 0}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace this to poison outputs before each launch)."""
    return torch.empty(shape, dtype=dtype, device=device)


Body = torch.Tensor | QuantizedTensor


def _flat_shape(x: Body) -> tuple[int, ...]:
    """``(N, D)`` of flat rows, dense or packed (a packed body is ``(1, 1, N, D)``, per token)."""
    return tuple(x.shape[2:]) if isinstance(x, QuantizedTensor) else tuple(x.shape)


def _dense(x: Body, dtype: torch.dtype) -> torch.Tensor:
    """Flat rows ``(N, D)``, a packed body dequantized (the CPU path: transient)."""
    if isinstance(x, QuantizedTensor):
        return dequantize(x, dtype).view(x.shape[2], x.shape[3])
    return x


def _check(q: torch.Tensor, keys: Body, values: Body, offsets: torch.Tensor, keep) -> int:
    """Check the operands; return the KV heads per batch row."""
    if q.ndim != 4:
        raise ValueError(f"q must be (batch, q_heads, q_tokens, dim), got {tuple(q.shape)}")
    if isinstance(keys, QuantizedTensor) != isinstance(values, QuantizedTensor):
        raise ValueError("keys and values must both be packed or both be dense")
    packed = isinstance(keys, QuantizedTensor)
    if packed and (keys.layout != "per_token" or values.layout != "per_token" or keys.shape[:2] != (1, 1)):
        raise ValueError("packed keys and values must be per-token QuantizedTensors of shape (1, 1, N, D)")
    kshape, vshape = _flat_shape(keys), _flat_shape(values)
    if len(kshape) != 2 or len(vshape) != 2 or kshape[0] != vshape[0] or kshape[1] != q.shape[-1]:
        raise ValueError(
            f"keys and values must be flat (tokens, dim) with dim {q.shape[-1]} for keys, got {kshape} and {vshape}"
        )
    b, hq = q.shape[:2]
    r = offsets.shape[0] - 1
    hkv = r // b if b else 0
    if offsets.ndim != 1 or hkv == 0 or r != b * hkv or hq % hkv:
        raise ValueError(f"offsets describe {r} heads, which is not batch {b} x a divisor of {hq} query heads")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != kshape[:1]):
        raise ValueError(f"keep must be one bool per stored token, shape ({kshape[0]},), got {tuple(keep.shape)}")
    return hkv


def ragged_chunk(offsets: torch.Tensor, num_splits: int) -> int:
    """Tokens per split: the longest head cut into ``num_splits`` (at least 1)."""
    lengths = ragged_lengths(offsets)
    longest = int(lengths.max()) if lengths.numel() else 0
    return max(1, math.ceil(longest / max(1, num_splits)))


def _split_partials_triton(q, keys, values, offsets, scale, chunk, num_splits, keep, hkv):
    if isinstance(keys, QuantizedTensor):
        return _packed_split_partials_triton(q, keys, values, offsets, scale, chunk, num_splits, keep, hkv)
    b, hq, lq, d = q.shape
    dv = values.shape[-1]
    group = (hq // hkv) * lq  # rows of a KV head: its query heads x their query tokens
    out = _empty((b, hq, lq, num_splits, dv), torch.float32, q.device)
    lse = _empty((b, hq, lq, num_splits), torch.float32, q.device)
    if b * hq * lq == 0:
        return out, lse
    block_g, row_blocks, block_t, num_warps = _block_config(group, chunk, d, dv)
    _kernel("ragged_attention_split_partials")[(b * hkv * row_blocks, num_splits)](
        q.contiguous().view(b * hkv * group, d),
        keys.contiguous(),
        values.contiguous(),
        offsets.to(q.device, torch.int64).contiguous(),
        offsets if keep is None else keep.view(torch.uint8),  # never read without HAS_KEEP
        out,
        lse,
        float(scale),
        d,
        dv,
        chunk,
        num_splits,
        -(-chunk // block_t),
        group,
        row_blocks,
        HAS_KEEP=keep is not None,
        BLOCK_G=block_g,
        BLOCK_T=block_t,
        BLOCK_D=max(next_pow2(d), 16),
        BLOCK_DV=max(next_pow2(dv), 16),
        num_warps=num_warps,
    )
    LAUNCHES["count"] += 1
    return out, lse


def _packed_split_partials_triton(q, kq, vq, offsets, scale, chunk, num_splits, keep, hkv):
    """The packed body's launch: codes and per-token stats read in place (never dequantized to memory)."""
    b, hq, lq, d = q.shape
    dv = vq.shape[3]
    group = (hq // hkv) * lq
    out = _empty((b, hq, lq, num_splits, dv), torch.float32, q.device)
    lse = _empty((b, hq, lq, num_splits), torch.float32, q.device)
    if b * hq * lq == 0:
        return out, lse
    nbk, nbv = d * kq.bits // 8, dv * vq.bits // 8
    block_g, row_blocks, block_t, num_warps = _block_config(group, chunk, d, dv)
    _packed_kernel("ragged_packed_attention_split_partials")[(b * hkv * row_blocks, num_splits)](
        q.contiguous().view(b * hkv * group, d),
        kq.packed.contiguous(),
        kq.scale.contiguous(),
        kq.zero.contiguous(),
        vq.packed.contiguous(),
        vq.scale.contiguous(),
        vq.zero.contiguous(),
        offsets.to(q.device, torch.int64).contiguous(),
        offsets if keep is None else keep.view(torch.uint8),
        out,
        lse,
        float(scale),
        d,
        dv,
        nbk,
        nbv,
        d // kq.group_size,
        dv // vq.group_size,
        chunk,
        num_splits,
        -(-chunk // block_t),
        group,
        row_blocks,
        BITS_K=kq.bits,
        GK=kq.group_size,
        BITS_V=vq.bits,
        GV=vq.group_size,
        HAS_KEEP=keep is not None,
        BLOCK_G=block_g,
        BLOCK_T=block_t,
        BLOCK_NBK=next_pow2(nbk),
        BLOCK_NBV=next_pow2(nbv),
        num_warps=num_warps,
    )
    LAUNCHES["count"] += 1
    return out, lse


def ragged_attention_split_partials(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    *,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial (output, log-sum-exp) of every split of every head's own tokens.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, Lq, D)``; every stored token precedes every query.
    keys, values : torch.Tensor or QuantizedTensor
        ``(N, D)`` and ``(N, Dv)``, flat (:mod:`pikvpress.kernels.ragged_reference`); or both packed per token,
        ``QuantizedTensor`` of shape ``(1, 1, N, D)`` (a packed ragged body: the kernel reads the codes).
    offsets : torch.Tensor
        ``(B * Hkv + 1,)`` int64, where each (batch row, KV head) starts.
    scale : float
        Softmax scale.
    num_splits : int
        Splits of each head: split ``s`` holds its tokens ``s * C .. (s + 1) * C - 1``, ``C`` =
        :func:`ragged_chunk` (the longest head over ``num_splits``).
    keep : torch.Tensor, optional
        ``(N,)`` bool, False drops a token.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``out`` ``(B, Hq, Lq, S, Dv)`` float32 (0 for an empty split) and ``lse`` ``(B, Hq, Lq, S)`` (-inf).
    """
    hkv = _check(q, keys, values, offsets, keep)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    chunk = ragged_chunk(offsets, num_splits)
    if _use_triton(q):
        return _split_partials_triton(q, keys, values, offsets, float(scale), chunk, num_splits, keep, hkv)
    keys, values = _dense(keys, q.dtype), _dense(values, q.dtype)
    return ragged_split_partials(q, keys, values, offsets, float(scale), chunk, num_splits, keep)


def ragged_attention_partial(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (output, log-sum-exp) of ``q`` ``(B, Hq, Lq, D)`` over every head's own tokens: on CUDA (or with
    ``PIKVPRESS_FORCE_TRITON=1``) the split kernel and an exact merge (``num_splits``: chosen to fill the GPU when
    None), elsewhere one pure-torch softmax over a transient padded stack
    (:func:`~pikvpress.kernels.ragged_reference.ragged_attention_partial`)."""
    hkv = _check(q, keys, values, offsets, keep)
    if not _use_triton(q):
        return _partial_reference(q, _dense(keys, q.dtype), _dense(values, q.dtype), offsets, scale, keep)
    if num_splits is None:
        group = (q.shape[1] // hkv) * q.shape[2]
        programs = q.shape[0] * hkv * _block_config(group, 1, q.shape[-1], _flat_shape(values)[-1])[1]
        num_splits = choose_num_splits(q, programs, ragged_chunk(offsets, 1))
    out, lse = ragged_attention_split_partials(q, keys, values, offsets, scale, num_splits, keep=keep)
    return merge_partials(out, lse, dim=3)
