"""How the model reads a :class:`~pikvpress.cache.RaggedKVLayer`: each head's own tokens, then the dense tail.

The body's partial attention comes from :func:`~pikvpress.kernels.ragged.ragged_attention_partial` (each
(batch row, KV head) over its own kept tokens), the tail's from a dense partial (causal among the new tokens), and
the two merge exactly by log-sum-exp, with attention sinks as one more partial. The model's mask is read at the body
tokens' own positions, so a padding mask or kvpress's head-wise ``masked_key_indices`` apply as they do to the dense
masked cache this layer stands for.
"""

from __future__ import annotations

import torch
from torch import nn

from pikvpress.attention import READERS, _keep, _prefix_kv_mask, _sinks_partial
from pikvpress.cache.ragged_layer import RaggedKVLayer
from pikvpress.kernels.attention import attention_partial, merge_partials
from pikvpress.kernels.ragged import ragged_attention_partial


def ragged_layer_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: RaggedKVLayer,
    scaling: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``(B, Hq, Lq, D)`` over ``layer``'s ragged body followed by its tail ``key`` /
    ``value`` ``(B, Hkv, R, D|Dv)`` (the new tokens last); returns ``(B, Lq, Hq, Dv)`` in ``query``'s dtype."""
    b, hq, lq, d = query.shape
    hkv, r = key.shape[1], key.shape[2]
    p = layer.body_length
    scale = float(scaling) if scaling is not None else d**-0.5
    keep = _keep(attention_mask, module, b, hq, hkv, lq, p, p + r, query.device)
    partials = []
    if layer.positions.shape[0] > 0:
        token_keep = None
        body_keep = _prefix_kv_mask(keep, b, hq, hkv, p)  # (B, 1|Hkv, P): the body precedes every query
        if body_keep is not None:
            heads = layer._head_of_token().to(query.device)
            head = heads % hkv if body_keep.shape[1] > 1 else torch.zeros_like(heads)
            token_keep = body_keep[heads // hkv, head, layer.positions.to(query.device, torch.int64)]
        partials.append(
            ragged_attention_partial(query, layer.body_keys, layer.body_values, layer.offsets, scale, token_keep)
        )
    if r > 0:
        partials.append(attention_partial(query, key, value, scale, None if keep is None else keep[..., p:]))
    if s_aux is not None:
        partials.append(_sinks_partial(s_aux, b, hq, lq, value.shape[-1], query.device))
    if not partials:
        return torch.zeros((b, lq, hq, value.shape[-1]), dtype=query.dtype, device=query.device)
    out, _ = merge_partials(
        torch.stack([o for o, _ in partials], dim=3), torch.stack([s for _, s in partials], dim=3), dim=3
    )
    return out.transpose(1, 2).to(query.dtype).contiguous()


READERS[RaggedKVLayer] = ragged_layer_attention
