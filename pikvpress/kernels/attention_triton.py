"""The Triton code of split attention over packed (quantized) K/V: one kernel and its device helpers.

Only Triton-language functions live here; arguments, block sizes and the launch are in
:mod:`pikvpress.kernels.attention`, the pure-torch reference in :mod:`pikvpress.kernels.attention_reference`.
The functions are plain Python, jitted on first use by :class:`~pikvpress.kernels.lazy_jit.LazyKernels`
(``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates), so this module imports without Triton.
Reductions use ``tl.reduce`` with ``triton.language.standard``'s combine functions, which the
interpreter can run after a late switch-on.

Addressing: q ``(B*Hq, D)``, query head h of batch b in row ``b * Hq + h = (b * Hkv + hk) * GROUP + g``
for kv head ``hk = h // GROUP`` and row ``g = h % GROUP`` of its group; packed keys ``(B*Hkv*T, NBK)``
bytes, packed values ``(B*Hkv*T, NBV)`` bytes, channel = ``byte * PER + slot``. Stats of an operand
with group size G over rows ``R = B*Hkv*T``: per channel ``(R // G, D)`` (row r in stats row r // G),
per token ``(R, D // G)`` (channel c in column c // G). kv_mask: bytes at ``b * MSB + hk * MSH + t * MST``
(``MSH = 0`` when broadcast over kv heads).

Grouped-query attention: one program serves a block of BLOCK_G query heads (rows) of ONE kv head,
all GROUP of them unless the group is larger than the row cap of the launcher's block config, so every
packed K/V byte and stat of a split is read and dequantized once per (kv head, split, row block), not
once per query head. The rows share each dequantized tile:

- logits ``(BLOCK_G, BLOCK_T)``: broadcast product ``(BLOCK_G, BLOCK_T, D)`` summed over the channels
  with ``tl.reduce`` (the channels spread over the lanes, so no thread holds a whole q or k row);
- values: ``tl.dot`` ``(BLOCK_G, BLOCK_T) x (BLOCK_T, Dv)`` with input_precision ``"ieee"``, exact
  float32 FMA products like the reference (tensor-core ``"tf32"`` would lose ~3 decimal digits). Its
  reduction axis is the short token tile, which Triton's FMA dot keeps whole in each thread; the same
  dot for the logits (reduction over D) did so for all of D and spilled at D = 256, while a broadcast
  product for the values spilled more than the dot (ptxas for sm_90).

The interpreter runs ``tl.dot`` as a numpy float32 matmul.
"""

from __future__ import annotations

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    tl = None

__all__ = [
    "HELPERS",
    "KERNELS",
    "packed_attention_split_partials_kernel",
    "ragged_packed_attention_split_partials_kernel",
]


def _unpack_codes(
    packed_ptr,
    rows,
    tmask,
    ROW_BYTES,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """int32 codes ``[BLOCK_T, BLOCK_NB * 8 // BITS]`` of the packed ``rows`` (0 where ``tmask`` is False
    and past the row's ``ROW_BYTES`` bytes): each byte loaded once, its ``8 // BITS`` slots unpacked in
    registers in channel order (channel = byte * PER + slot)."""
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    byte = tl.arange(0, BLOCK_NB)
    slot = tl.arange(0, PER)
    packed = tl.load(
        packed_ptr + rows[:, None] * ROW_BYTES + byte[None, :],
        mask=tmask[:, None] & (byte < ROW_BYTES)[None, :],
        other=0,
    ).to(tl.int32)
    return tl.reshape((packed[:, :, None] >> (slot * BITS)[None, None, :]) & MASK, (BLOCK_T, BLOCK_NB * PER))


def _load_stats(
    scale_ptr,
    zero_ptr,
    rows,
    tmask,
    t0,
    end,
    kv_row0,
    DIM,
    ROW_GROUPS,
    G: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """float32 ``(scale, zero)``, each ``[BLOCK_T, BLOCK_D]``, of the tile of tokens ``t0 + [0, BLOCK_T)``
    (rows ``rows`` of the kv head starting at row ``kv_row0``): every stored stat loaded once and
    broadcast over its group in registers; 0 past the split (``end``) and the ``DIM`` channels.

    Per token (``ROW_GROUPS = DIM // G`` stats per row): the tile's ``(BLOCK_T, BLOCK_D // G)`` stats
    -> ``(BLOCK_T, BLOCK_D // G, G)``. Per channel: the tile's stats rows, one per ``GT = min(G, BLOCK_T)``
    tokens, ``(BLOCK_T // GT, BLOCK_D)`` -> ``(BLOCK_T // GT, GT, BLOCK_D)``; split starts are multiples
    of every per-channel G and of BLOCK_T (all powers of two), so a tile starts at a multiple of GT and
    no group crosses a split.
    """
    if PER_TOKEN:
        grp = tl.arange(0, BLOCK_D // G)
        off = rows[:, None] * ROW_GROUPS + grp[None, :]
        mask = tmask[:, None] & (grp < ROW_GROUPS)[None, :]
        scale = tl.load(scale_ptr + off, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + off, mask=mask, other=0.0).to(tl.float32)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_T, BLOCK_D // G, G)), (BLOCK_T, BLOCK_D))
        zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (BLOCK_T, BLOCK_D // G, G)), (BLOCK_T, BLOCK_D))
    else:
        GT: tl.constexpr = G if G < BLOCK_T else BLOCK_T  # noqa: FURB136 (constexpr arithmetic, no min())
        st0 = t0 + tl.arange(0, BLOCK_T // GT) * GT  # first token of each stats row of the tile
        col = tl.arange(0, BLOCK_D)
        off = ((kv_row0 + st0) // G)[:, None] * DIM + col[None, :]
        mask = (st0 < end)[:, None] & (col < DIM)[None, :]
        scale = tl.load(scale_ptr + off, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + off, mask=mask, other=0.0).to(tl.float32)
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (BLOCK_T // GT, GT, BLOCK_D)), (BLOCK_T, BLOCK_D))
        zero = tl.reshape(tl.broadcast_to(zero[:, None, :], (BLOCK_T // GT, GT, BLOCK_D)), (BLOCK_T, BLOCK_D))
    return scale, zero


def packed_attention_split_partials_kernel(
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
    GK: tl.constexpr,
    K_PER_TOKEN: tl.constexpr,
    BITS_V: tl.constexpr,
    GV: tl.constexpr,
    V_PER_TOKEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NBK: tl.constexpr,
    BLOCK_NBV: tl.constexpr,
):
    """(output, log-sum-exp) of every split; one program per (batch, kv head, row block, split), grid
    ``(B * HKV * ROW_BLOCKS, NUM_SPLITS)``.

    Keys: ``BITS_K``-bit codes, ``NBK`` bytes and (per token) ``NGK`` stats per token, group size ``GK``;
    values likewise (``V``). Split ``s`` is tokens ``[bounds[s], bounds[s + 1])`` walked in ``N_TILES``
    tiles of ``BLOCK_T``. Row block ``rb`` holds the query heads ``rb * BLOCK_G ..`` of the kv head's
    group (rows past ``KV_GROUP`` are masked: query 0, never stored). Writes ``out`` ``(B*Hq, NUM_SPLITS,
    DV)`` (0 for an empty split) and ``lse`` ``(B*Hq, NUM_SPLITS)`` (-inf for an empty split).
    """
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rb = pid % ROW_BLOCKS
    bhk = pid // ROW_BLOCKS  # b * HKV + hk
    b = bhk // HKV
    hk = bhk % HKV
    BLOCK_D: tl.constexpr = BLOCK_NBK * (8 // BITS_K)
    BLOCK_DV: tl.constexpr = BLOCK_NBV * (8 // BITS_V)

    start = tl.load(bounds_ptr + sp).to(tl.int64)
    end = tl.load(bounds_ptr + sp + 1).to(tl.int64)
    kv_row0 = bhk * T  # first token row of this kv head
    mask_row = mask_ptr + b * MSB + hk * MSH  # this kv head's kv_mask row (unused without a mask)

    g = rb * BLOCK_G + tl.arange(0, BLOCK_G)  # rows of the group
    gmask = g < KV_GROUP
    qrow = bhk * KV_GROUP + g  # [BLOCK_G] row of q / out / lse, i.e. b * HQ + h
    kcol = tl.arange(0, BLOCK_D)
    qv = tl.load(q_ptr + qrow[:, None] * D + kcol[None, :], mask=gmask[:, None] & (kcol < D)[None, :], other=0.0)
    qv = qv.to(tl.float32)  # [BLOCK_G, BLOCK_D]

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
        # keys: the tile unpacked and dequantized once in registers, shared by the BLOCK_G rows; 0 past the
        # split and the channels; a token dropped by kv_mask inside a per-channel group gets its (finite)
        # zero point, and its logit is -inf below anyway
        kcodes = _unpack_codes(kp_ptr, rows, tmask, NBK, BITS_K, BLOCK_T, BLOCK_NBK)
        ks, kz = _load_stats(ks_ptr, kz_ptr, rows, tmask, t0, end, kv_row0, D, NGK, GK, K_PER_TOKEN, BLOCK_T, BLOCK_D)
        kx = kcodes.to(tl.float32) * ks + kz  # [BLOCK_T, BLOCK_D]
        logit = tl.reduce(qv[:, None, :] * kx[None, :, :], 2, tl.standard._sum_combine)  # [BLOCK_G, BLOCK_T]
        logit = tl.where(tmask[None, :], logit * sm_scale, float("-inf"))
        # online softmax per row; a fully masked tile keeps m at -inf, so exponents use a finite stand-in
        m_new = tl.maximum(m_i, tl.reduce(logit, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(tmask[None, :], tl.exp(logit - m_safe[:, None]), 0.0)  # [BLOCK_G, BLOCK_T]
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        # values: likewise; p = 0 wherever it is not a kept token
        vcodes = _unpack_codes(vp_ptr, rows, tmask, NBV, BITS_V, BLOCK_T, BLOCK_NBV)
        vs, vz = _load_stats(vs_ptr, vz_ptr, rows, tmask, t0, end, kv_row0, DV, NGV, GV, V_PER_TOKEN, BLOCK_T, BLOCK_DV)
        vx = vcodes.to(tl.float32) * vs + vz  # [BLOCK_T, BLOCK_DV]
        acc = tl.dot(p, vx, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0  # [BLOCK_G]
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    vcol = tl.arange(0, BLOCK_DV)
    omask = gmask[:, None] & (vcol < DV)[None, :]
    tl.store(out_ptr + (qrow[:, None] * NUM_SPLITS + sp) * DV + vcol[None, :], o, mask=omask)
    tl.store(lse_ptr + qrow * NUM_SPLITS + sp, lse, mask=gmask)


def ragged_packed_attention_split_partials_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    kz_ptr,
    vp_ptr,
    vs_ptr,
    vz_ptr,
    offsets_ptr,
    keep_ptr,
    out_ptr,
    lse_ptr,
    sm_scale,
    D,
    DV,
    NBK,
    NBV,
    NGK,
    NGV,
    CHUNK,
    NUM_SPLITS,
    N_TILES,
    KV_GROUP,
    ROW_BLOCKS,
    BITS_K: tl.constexpr,
    GK: tl.constexpr,
    BITS_V: tl.constexpr,
    GV: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NBK: tl.constexpr,
    BLOCK_NBV: tl.constexpr,
):
    """The ragged split kernel (:mod:`pikvpress.kernels.ragged_triton`, whose addressing it shares) over a packed
    body: keys and values packed per token (``NBK`` / ``NBV`` bytes and ``NGK`` / ``NGV`` stats per flat row, channel
    groups ``GK`` / ``GV``), unpacked and dequantized tile by tile in registers as in
    :func:`packed_attention_split_partials_kernel`. Grid ``(R * ROW_BLOCKS, NUM_SPLITS)``."""
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rb = pid % ROW_BLOCKS
    head = pid // ROW_BLOCKS
    first = tl.load(offsets_ptr + head).to(tl.int64)
    last = tl.load(offsets_ptr + head + 1).to(tl.int64)
    start = first + sp * CHUNK
    end = tl.minimum(start + CHUNK, last)  # this head's own length bounds the split
    BLOCK_D: tl.constexpr = BLOCK_NBK * (8 // BITS_K)
    BLOCK_DV: tl.constexpr = BLOCK_NBV * (8 // BITS_V)

    g = rb * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < KV_GROUP
    qrow = head * KV_GROUP + g
    kcol = tl.arange(0, BLOCK_D)
    qv = tl.load(q_ptr + qrow[:, None] * D + kcol[None, :], mask=gmask[:, None] & (kcol < D)[None, :], other=0.0)
    qv = qv.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for i in range(N_TILES):
        t0 = start + i * BLOCK_T
        t = t0 + offs_t  # flat rows
        tmask = t < end
        if HAS_KEEP:
            keep = tl.load(keep_ptr + t, mask=tmask, other=0)
            tmask = tmask & (keep != 0)
        kcodes = _unpack_codes(kp_ptr, t, tmask, NBK, BITS_K, BLOCK_T, BLOCK_NBK)
        ks, kz = _load_stats(ks_ptr, kz_ptr, t, tmask, t0, end, 0, D, NGK, GK, True, BLOCK_T, BLOCK_D)
        kx = kcodes.to(tl.float32) * ks + kz
        logit = tl.reduce(qv[:, None, :] * kx[None, :, :], 2, tl.standard._sum_combine)
        logit = tl.where(tmask[None, :], logit * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(logit, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(tmask[None, :], tl.exp(logit - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        vcodes = _unpack_codes(vp_ptr, t, tmask, NBV, BITS_V, BLOCK_T, BLOCK_NBV)
        vs, vz = _load_stats(vs_ptr, vz_ptr, t, tmask, t0, end, 0, DV, NGV, GV, True, BLOCK_T, BLOCK_DV)
        vx = vcodes.to(tl.float32) * vs + vz
        acc = tl.dot(p, vx, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    vcol = tl.arange(0, BLOCK_DV)
    omask = gmask[:, None] & (vcol < DV)[None, :]
    tl.store(out_ptr + (qrow[:, None] * NUM_SPLITS + sp) * DV + vcol[None, :], o, mask=omask)
    tl.store(lse_ptr + qrow * NUM_SPLITS + sp, lse, mask=gmask)


#: Kernel name -> kernel, and the device helpers they call (jitted with them, see LazyKernels).
KERNELS = {
    "packed_attention_split_partials": packed_attention_split_partials_kernel,
    "ragged_packed_attention_split_partials": ragged_packed_attention_split_partials_kernel,
}
HELPERS = (_unpack_codes, _load_stats)
