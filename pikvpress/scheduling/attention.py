"""Attention of several buffered decode steps over the cache they saw, in one batched computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: logits elements computed at once; more steps are split into chunks of steps
_CHUNK_ELEMENTS = 1 << 25


def step_probs(
    queries: torch.Tensor, keys: torch.Tensor, start: int, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, H, n, start + n)`` float32 attention of ``n`` decode steps, averaged over each KV head's queries.

    Parameters
    ----------
    queries : torch.Tensor
        ``(B, Hq, n, D)`` post-RoPE queries of ``n`` consecutive one-token decode steps, already multiplied
        by the softmax scale; query head ``j`` reads KV head ``j // (Hq // H)``.
    keys : torch.Tensor
        ``(B, H, start + n, D)`` cached keys; step ``s`` appended key ``start + s`` and saw keys ``0 .. start + s``.
    start : int
        Tokens cached before the first of the steps.
    sinks : torch.Tensor, optional
        ``(Hq,)`` attention-sink logits (GPT-OSS), counted in the softmax denominator.
    """
    b, h, t, _ = keys.shape
    hq, n = queries.shape[1], queries.shape[2]
    if t != start + n or hq % h:
        raise ValueError(f"{n} steps after {start} tokens need {start + n} keys and Hq a multiple of H, got {t} / {hq}")
    groups = hq // h
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * t))
    out = []
    for first in range(0, n, step):
        chunk = queries[:, :, first : first + step]
        m = chunk.shape[2]
        logits = torch.matmul(chunk.reshape(b, h, groups * m, -1), keys.transpose(-1, -2)).float()
        logits = logits.view(b, h, groups, m, t)
        visible = start + first + torch.arange(m, device=keys.device)  # last key each step saw
        future = torch.arange(t, device=keys.device).view(1, t) > visible.view(m, 1)
        logits.masked_fill_(future, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, h, groups, 1, 1).expand(b, h, groups, m, 1)
            probs = F.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = F.softmax(logits, dim=-1)
        out.append(probs.mean(dim=2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)
