"""Attention over ragged heads, in pure torch: every (batch row, KV head) holds its own number of tokens.

The layout is the varlen layout of FlashAttention's ``cu_seqlens``: the tokens of all heads are stored flat,
``keys`` ``(N, Dk)`` and ``values`` ``(N, Dv)``, head after head in row-major (batch row, KV head) order, and
``offsets`` ``(B * Hkv + 1,)`` (int64, increasing, ``offsets[0] = 0``, ``offsets[-1] = N``) gives where each head's
tokens start: head ``r = b * Hkv + h`` holds ``keys[offsets[r]:offsets[r + 1]]``. A head may hold no token.

The CPU path (:func:`ragged_attention_partial`) gathers the heads into a transient ``(B, Hkv, Lmax, D)`` stack, zero
padded and masked, for one batched matmul per KV head group: no Python loop over heads, and nothing padded outlives
the call. The Triton decode kernel that reads each head's own length is the CUDA twin of this function.
"""

from __future__ import annotations

import torch

from pikvpress.kernels.attention_reference import attention_partial


def ragged_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``offsets`` ``(R + 1,)`` int64 of heads holding ``lengths`` tokens (any shape, flattened row-major)."""
    lengths = lengths.reshape(-1).to(torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def ragged_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """Tokens of each head ``(R,)`` int64 from ``offsets`` ``(R + 1,)``."""
    return (offsets[1:] - offsets[:-1]).to(torch.int64)


def ragged_rows(offsets: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The flat rows ``(M,)`` holding the tokens of ``heads`` ``(R',)`` (head indices, in the order given), each
    head's tokens in their stored order: the gather that selects, repeats or reorders heads."""
    heads = heads.to(offsets.device, torch.int64)
    starts = offsets[:-1][heads]
    lengths = ragged_lengths(offsets)[heads]
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=offsets.device)
    new_starts = ragged_offsets(lengths)[:-1]
    return torch.repeat_interleave(starts - new_starts, lengths, output_size=total) + torch.arange(
        total, device=offsets.device
    )


def ragged_padded(
    flat: torch.Tensor, offsets: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads of ``flat`` ``(N, D)`` as a zero-padded stack ``(R, W, D)`` and its validity mask ``(R, W)``
    (True where a head holds a token), heads left-aligned; ``W`` is ``width`` or the longest head."""
    lengths = ragged_lengths(offsets)
    r = lengths.shape[0]
    w = int(lengths.max()) if width is None and r else (width or 0)
    positions = torch.arange(w, device=flat.device)
    valid = positions[None, :] < lengths[:, None].to(flat.device)
    if flat.shape[0] == 0 or w == 0:
        return flat.new_zeros((r, w, flat.shape[-1])), valid
    rows = torch.where(valid, offsets[:-1, None].to(flat.device) + positions[None, :], 0)
    padded = flat[rows]
    return padded.masked_fill(~valid[..., None], 0), valid


def ragged_attention_partial(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (output, log-sum-exp) of ``q`` ``(B, Hq, Lq, D)`` over ragged heads (grouped-query: query head
    ``h`` reads KV head ``h // (Hq // Hkv)``).

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, Lq, D)`` queries; every stored token precedes every query (no causal mask is applied).
    keys, values : torch.Tensor
        ``(N, D)`` and ``(N, Dv)``: the heads' tokens, flat (see the module's docstring).
    offsets : torch.Tensor
        ``(B * Hkv + 1,)`` int64: where each (batch row, KV head) starts in ``keys`` / ``values``.
    scale : float
        The logits' scale.
    keep : torch.Tensor, optional
        ``(N,)`` bool, one per stored token: False drops it as well (a padding mask, a press's pruning).

    Returns
    -------
    out, lse : torch.Tensor
        ``(B, Hq, Lq, Dv)`` float32 and ``(B, Hq, Lq)``; a query over heads with no token kept gets ``out = 0``
        and ``lse = -inf`` (an empty partial for :func:`~pikvpress.kernels.attention.merge_partials`).
    """
    b, hq, _, _ = q.shape
    r = offsets.shape[0] - 1
    hkv = r // b if b else 0
    if hkv == 0 or r != b * hkv or hq % hkv:
        raise ValueError(f"offsets describe {r} heads, which is not batch {b} x a divisor of {hq} query heads")
    if keep is not None and keep.shape != keys.shape[:1]:
        raise ValueError(f"keep must be one bool per stored token, shape ({keys.shape[0]},), got {tuple(keep.shape)}")
    k, valid = ragged_padded(keys, offsets)
    v, _ = ragged_padded(values, offsets, width=k.shape[1])
    w = k.shape[1]
    k = k.view(b, hkv, w, keys.shape[-1])
    v = v.view(b, hkv, w, values.shape[-1])
    valid = valid.view(b, hkv, w)
    if keep is not None:
        kept, _ = ragged_padded(keep[:, None].to(keys.device), offsets, width=w)
        valid = valid & kept.view(b, hkv, w)
    g = hq // hkv
    head_keep = valid.repeat_interleave(g, dim=1)[:, :, None, :]  # (B, Hq, 1, W)
    return attention_partial(q, k, v, scale, head_keep)


def ragged_split_partials(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    chunk: int,
    num_splits: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 per-split partials over ragged heads, the Triton kernel's twin: split ``s`` of a head is its tokens
    ``s * chunk .. (s + 1) * chunk - 1`` (``num_splits * chunk`` must cover the longest head). Returns ``out``
    ``(B, Hq, Lq, S, Dv)`` and ``lse`` ``(B, Hq, Lq, S)`` (0 and -inf for an empty split)."""
    b, hq, lq, d = q.shape
    r = offsets.shape[0] - 1
    hkv = r // b
    g = hq // hkv
    w = chunk * num_splits
    k, valid = ragged_padded(keys, offsets, width=w)
    v, _ = ragged_padded(values, offsets, width=w)
    if keep is not None:
        kept, _ = ragged_padded(keep[:, None].to(keys.device), offsets, width=w)
        valid = valid & kept[..., 0]
    k = k.view(b, hkv, w, d).float()
    v = v.view(b, hkv, num_splits, chunk, values.shape[-1]).float()
    logits = torch.matmul(q.float().reshape(b, hkv, g * lq, d), k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~valid.view(b, hkv, 1, w), float("-inf")).view(b, hkv, g * lq, num_splits, chunk)
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    out = torch.einsum("bhrsc,bhscv->bhrsv", p, v)
    return out.reshape(b, hq, lq, num_splits, -1), lse.reshape(b, hq, lq, num_splits)
