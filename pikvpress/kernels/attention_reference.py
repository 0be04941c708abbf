"""Pure-torch attention over packed and dense K/V: the reference of the Triton kernel and the CPU path.

The functions here take arguments that :mod:`pikvpress.kernels.attention` has already checked (split
boundaries as a list, see :func:`~pikvpress.kernels.attention.split_bounds`), except
:func:`attention_partial` and :func:`packed_attention_with_residual`, which the attention function
calls directly and :mod:`pikvpress.kernels.attention` re-exports.

- :func:`split_partials`: float32 (output, log-sum-exp) of every split over float32 K/V, what the
  kernel computes; the reference dequantizes the whole cache first.
- :func:`packed_split_partials`: the CPU path of
  :func:`~pikvpress.kernels.attention.packed_attention_split_partials`: the same math, with the codes
  unpacked by shifts and, with one split, the value stats folded into the weights.
- :func:`attention_partial`: (output, log-sum-exp) over dense K/V for queries ``(B, Hq, Lq, D)``, any device.
- :func:`packed_attention_with_residual`: one softmax over packed then full-precision tokens (the
  attention function's path off CUDA).
"""

from __future__ import annotations

import itertools

import torch

from pikvpress.kernels.quantize import QuantizedTensor

__all__ = ["attention_partial", "packed_attention_with_residual", "packed_split_partials", "split_partials"]


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


def split_partials(
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


def packed_split_partials(
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
    return split_partials(q, _dequantize_f32(kq), v, scale, bounds, kv_mask)


def attention_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (output, log-sum-exp) of ``q`` ``(B, Hq, Lq, D)`` over dense ``k`` ``(B, Hkv, R, D)`` and ``v``
    ``(B, Hkv, R, Dv)`` (grouped-query: query head ``h`` reads kv head ``h // (Hq // Hkv)``), any device.

    ``keep`` is a bool mask broadcastable to ``(B, Hq, Lq, R)`` (False drops the token). Returns ``out``
    ``(B, Hq, Lq, Dv)`` and ``lse`` ``(B, Hq, Lq)``; a query that keeps no token gets ``out = 0``,
    ``lse = -inf`` (an empty partial for :func:`~pikvpress.kernels.attention.merge_partials`).
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
    :func:`~pikvpress.kernels.attention.merge_partials` instead; both equal dense attention over the dequantized cache.

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
