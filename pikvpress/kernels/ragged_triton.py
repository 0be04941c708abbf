"""The Triton code of split decode attention over ragged heads: every (batch row, KV head) reads its own tokens.

Only Triton-language code lives here; the launch, the checks and the dispatch are in :mod:`pikvpress.kernels.ragged`,
the pure-torch reference in :mod:`pikvpress.kernels.ragged_reference` (which also describes the flat layout).

Addressing: q ``(R * KV_GROUP, D)`` with ``R = B * Hkv`` heads, the rows of head ``r`` being ``r * KV_GROUP + g``
(its query heads, each with its query tokens, flattened); keys ``(N, D)`` and values ``(N, DV)`` flat; head ``r``
holds rows ``offsets[r] .. offsets[r + 1] - 1``; ``keep`` (optional) one byte per flat row. Split ``s`` of a head is
its tokens ``s * CHUNK .. (s + 1) * CHUNK - 1`` (clipped to the head's length), walked in ``N_TILES`` tiles of
``BLOCK_T``; a head shorter than the split's start leaves the split empty. The math is the packed kernel's
(:mod:`pikvpress.kernels.attention_triton`): one online softmax per row over dense tiles, shared by the rows of a
head, ``tl.dot`` for the values in ``"ieee"`` precision.
"""

from __future__ import annotations

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    tl = None

__all__ = ["KERNELS", "ragged_attention_split_partials_kernel"]


def ragged_attention_split_partials_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    offsets_ptr,
    keep_ptr,
    out_ptr,
    lse_ptr,
    sm_scale,
    D,
    DV,
    CHUNK,
    NUM_SPLITS,
    N_TILES,
    KV_GROUP,
    ROW_BLOCKS,
    HAS_KEEP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """(output, log-sum-exp) of every split of every head; one program per (head, row block, split), grid
    ``(R * ROW_BLOCKS, NUM_SPLITS)``. Writes ``out`` ``(R * KV_GROUP, NUM_SPLITS, DV)`` (0 for an empty split) and
    ``lse`` ``(R * KV_GROUP, NUM_SPLITS)`` (-inf for an empty split)."""
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rb = pid % ROW_BLOCKS
    head = pid // ROW_BLOCKS
    first = tl.load(offsets_ptr + head).to(tl.int64)
    last = tl.load(offsets_ptr + head + 1).to(tl.int64)
    start = first + sp * CHUNK
    end = tl.minimum(start + CHUNK, last)  # this head's own length bounds the split

    g = rb * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < KV_GROUP
    qrow = head * KV_GROUP + g
    kcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_DV)
    qv = tl.load(q_ptr + qrow[:, None] * D + kcol[None, :], mask=gmask[:, None] & (kcol < D)[None, :], other=0.0)
    qv = qv.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for i in range(N_TILES):
        t = start + i * BLOCK_T + offs_t  # flat rows
        tmask = t < end
        if HAS_KEEP:
            keep = tl.load(keep_ptr + t, mask=tmask, other=0)
            tmask = tmask & (keep != 0)
        kx = tl.load(k_ptr + t[:, None] * D + kcol[None, :], mask=tmask[:, None] & (kcol < D)[None, :], other=0.0)
        kx = kx.to(tl.float32)
        logit = tl.reduce(qv[:, None, :] * kx[None, :, :], 2, tl.standard._sum_combine)  # [BLOCK_G, BLOCK_T]
        logit = tl.where(tmask[None, :], logit * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(logit, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(tmask[None, :], tl.exp(logit - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        vx = tl.load(v_ptr + t[:, None] * DV + vcol[None, :], mask=tmask[:, None] & (vcol < DV)[None, :], other=0.0)
        acc = tl.dot(p, vx.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    omask = gmask[:, None] & (vcol < DV)[None, :]
    tl.store(out_ptr + (qrow[:, None] * NUM_SPLITS + sp) * DV + vcol[None, :], o, mask=omask)
    tl.store(lse_ptr + qrow * NUM_SPLITS + sp, lse, mask=gmask)


#: Kernel name -> kernel (jitted on first use, see LazyKernels).
KERNELS = {"ragged_attention_split_partials": ragged_attention_split_partials_kernel}
