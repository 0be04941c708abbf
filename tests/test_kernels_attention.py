"""Split attention over packed KV: Triton kernel (under TRITON_INTERPRET=1) against the torch
reference, and the exact log-sum-exp merge of partials against dense attention.

Fresh random inputs every run; kernel outputs are poisoned with NaN before each launch so an element
the kernel never writes cannot pass.
"""

import dataclasses
import itertools
import random
import subprocess
import sys

import pytest
import torch

from pikvpress.kernels import attention as A
from pikvpress.kernels import attention_reference as R
from pikvpress.kernels import attention_triton as K
from pikvpress.kernels import quantize as Q

KEY_GROUP = 16
VALUE_GROUP = 8


@pytest.fixture
def triton_mode(monkeypatch):
    """Run the Triton kernel on CPU under the interpreter; yields a counter of kernel launches."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PIKVPRESS_FORCE_TRITON", "1")
    from triton.runtime.interpreter import InterpretedFunction

    for name in K.KERNELS:  # jitted on first use, so they see TRITON_INTERPRET=1, with their helpers
        assert isinstance(A._kernel(name), InterpretedFunction)
        scope = A._kernel(name).fn.__globals__
        assert all(isinstance(scope[helper.__name__], InterpretedFunction) for helper in K.HELPERS)
    start = A.LAUNCHES["count"]
    yield lambda: A.LAUNCHES["count"] - start


@pytest.fixture
def poison(monkeypatch):
    """Fill every kernel output with NaN before the launch."""

    def _empty(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(A, "_empty", _empty)


def _inputs(b, hq, hkv, t, d, dv, dtype=torch.float32):
    q = torch.randn(b, hq, d).to(dtype)
    k = (torch.randn(b, hkv, t, d) * (0.5 + 2 * torch.rand(d)) + torch.randn(d)).to(dtype)
    v = torch.randn(b, hkv, t, dv).to(dtype)
    return q, k, v


def _pack(k, v, kbits, vbits):
    return Q.quantize_keys_reference(k, kbits, KEY_GROUP), Q.quantize_values_reference(v, vbits, VALUE_GROUP)


def _dense_attention(q, k, v, scale):
    """Plain softmax attention of one query per head, GQA by repeating kv heads; float32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", q.float(), k) * scale, dim=-1)
    lse = torch.logsumexp(torch.einsum("bhd,bhtd->bht", q.float(), k) * scale, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, v), lse


SPLITS = [1, 2, 3, [32, 0, 32], [0, 64]]


# --------------------------------------------------------------------------------------------------
# kernel vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits", ((2, 2), (4, 4), (8, 8), (4, 2)))
@pytest.mark.parametrize("num_splits", (1, 3, [16, 0, 48, 32]), ids=str)
def test_kernel_matches_reference(triton_mode, poison, bits, dtype, num_splits):
    b, t, d = random.randint(1, 2), 96, random.choice((16, 32))
    dv = random.choice((16, 32))
    q, k, v = _inputs(b, 4, 2, t, d, dv, dtype)
    kq, vq = _pack(k, v, *bits)
    scale = d**-0.5
    ref_out, ref_lse = A.packed_attention_split_partials_reference(q, kq, vq, scale, num_splits)

    out, lse = A.packed_attention_split_partials(q, kq, vq, scale, num_splits)
    assert triton_mode() == 1
    ns = len(ref_lse[0, 0])
    assert out.shape == (b, 4, ns, dv) and out.dtype == torch.float32
    assert lse.shape == (b, 4, ns) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # -inf == -inf for empty splits

    merged = A.packed_attention(q, kq, vq, scale, num_splits)
    assert triton_mode() == 2
    assert merged.dtype == dtype and merged.shape == (b, 4, dv)


def test_kernel_empty_split_is_zero_and_minus_inf(triton_mode, poison):
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 4, 4)
    out, lse = A.packed_attention_split_partials(q, kq, vq, 0.25, [0, 32, 0, 32, 0])
    assert triton_mode() == 1
    for s in (0, 2, 4):
        assert torch.equal(lse[:, :, s], torch.full_like(lse[:, :, s], float("-inf")))
        assert torch.equal(out[:, :, s], torch.zeros_like(out[:, :, s]))
    assert torch.isfinite(lse[:, :, [1, 3]]).all()


def test_kernel_gqa_mapping(triton_mode, poison):
    """Query head h must read kv head h // (Hq // Hkv): compare with separate single-head calls."""
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 8, 8)
    out, lse = A.packed_attention_split_partials(q, kq, vq, 0.25, 2)
    for h in range(4):
        kh, vh = _pack(k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], 8, 8)
        o1, l1 = A.packed_attention_split_partials(q[:, h : h + 1], kh, vh, 0.25, 2)
        torch.testing.assert_close(out[:, h : h + 1], o1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, h : h + 1], l1, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# merge exactness (reference path on CPU; the kernel path is tied to it above)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", SPLITS, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_partial_merge_equals_dense_over_dequantized(bits, num_splits):
    b, d = random.randint(1, 2), random.choice((16, 32))
    q, k, v = _inputs(b, 4, 2, 64, d, d)
    kq, vq = _pack(k, v, bits, bits)
    scale = d**-0.5
    out, lse = A.packed_attention_split_partials(q, kq, vq, scale, num_splits)
    merged, merged_lse = A.merge_partials(out, lse, dim=2)
    expect, expect_lse = _dense_attention(
        q, Q.dequantize_reference(kq, torch.float32), Q.dequantize_reference(vq, torch.float32), scale
    )
    torch.testing.assert_close(merged, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, expect_lse, rtol=1e-5, atol=1e-5)
    full = A.packed_attention(q, kq, vq, scale, num_splits)
    torch.testing.assert_close(full, expect, rtol=1e-5, atol=1e-5)


def test_merge_invariant_to_split_count():
    q, k, v = _inputs(2, 4, 2, 96, 32, 32)
    kq, vq = _pack(k, v, 4, 4)
    results = [A.packed_attention(q, kq, vq, 0.2, s) for s in (1, 2, 3, 4, 6, 8)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)


def test_dense_partial_merge_equals_dense_attention():
    q, k, v = _inputs(2, 4, 2, 37, 16, 24)
    for s in (1, 2, 5, [10, 0, 27]):
        out, lse = A.attention_split_partials(q, k, v, 0.3, s)
        merged, merged_lse = A.merge_partials(out, lse, dim=-1)
        expect, expect_lse = _dense_attention(q, k, v, 0.3)
        torch.testing.assert_close(merged, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_lse, expect_lse, rtol=1e-5, atol=1e-5)


def test_merge_all_empty_and_sequence_inputs():
    outs = torch.randn(3, 2, 5)
    lses = torch.full((3, 2), float("-inf"))
    o, l = A.merge_partials(outs, lses, dim=1)
    assert torch.equal(o, torch.zeros(3, 5)) and torch.equal(l, torch.full((3,), float("-inf")))
    # mixing an empty split (NaN output, -inf lse) with a real one returns the real one
    a_o, a_l = torch.randn(4, 8), torch.randn(4)
    e_o, e_l = torch.full((4, 8), float("nan")), torch.full((4,), float("-inf"))
    o, l = A.merge_partials([a_o, e_o], [a_l, e_l], dim=-1)
    torch.testing.assert_close(o, a_o)
    torch.testing.assert_close(l, a_l)
    # merging two halves with sequence inputs along a leading axis
    o, l = A.merge_partials([a_o, a_o], [a_l, a_l], dim=0)
    torch.testing.assert_close(o, a_o)
    torch.testing.assert_close(l, a_l + torch.log(torch.tensor(2.0)))


# --------------------------------------------------------------------------------------------------
# quantization error against the original K/V
# --------------------------------------------------------------------------------------------------


def test_error_vs_unquantized_shrinks_with_bits():
    q, k, v = _inputs(2, 4, 2, 96, 32, 32)
    scale = 32**-0.5
    exact, _ = _dense_attention(q, k, v, scale)
    errs = []
    for bits in (2, 4, 8):
        kq, vq = _pack(k, v, bits, bits)
        got = A.packed_attention(q, kq, vq, scale, 3)
        errs.append((got - exact).abs().mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def test_bad_arguments():
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 4, 4)
    f = A.packed_attention_split_partials
    with pytest.raises(ValueError, match="num_splits sizes must be multiples of the token group size 16"):
        f(q, kq, vq, 0.25, [8, 56])
    with pytest.raises(ValueError, match="num_splits sizes must sum"):
        f(q, kq, vq, 0.25, [16, 16])
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        f(q, kq, vq, 0.25, 0)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k_packed heads \(2\)"):
        f(q[:, :3], kq, vq, 0.25, 1)
    with pytest.raises(ValueError, match="k_packed.layout must be 'per_channel' or 'per_token'"):
        f(q, dataclasses.replace(kq, layout="per_head"), vq, 0.25, 1)
    with pytest.raises(ValueError, match=r"k_packed.scale must be floating point of shape \(1, 2, 64, 4\)"):
        f(q, dataclasses.replace(kq, layout="per_token", group_size=4), vq, 0.25, 1)  # per-channel stats
    with pytest.raises(ValueError, match="v_packed.packed must be uint8 of shape"):
        f(q, kq, dataclasses.replace(vq, packed=vq.packed[:, :, :, :4]), 0.25, 1)
    with pytest.raises(ValueError, match="v_packed.group_size 32 must divide the dim 16"):
        f(q, kq, dataclasses.replace(vq, group_size=32), 0.25, 1)
    with pytest.raises(ValueError, match="k_packed must be a QuantizedTensor"):
        f(q, k, vq, 0.25, 1)
    with pytest.raises(ValueError, match="q must be a 3-d tensor"):
        f(q[0], kq, vq, 0.25, 1)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        f(q, kq, vq, float("nan"), 1)
    with pytest.raises(ValueError, match="k_packed shape"):
        f(q[..., :8], kq, vq, 0.25, 1)
    with pytest.raises(ValueError, match="v_packed shape"):
        f(q, kq, Q.quantize_values_reference(v[:, :, :32], 4, 16), 0.25, 1)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k heads \(3\)"):
        A.attention_split_partials(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), 0.25, 1)
    with pytest.raises(ValueError, match="outs shape"):
        A.merge_partials(torch.randn(2, 3), torch.randn(2, 3), dim=1)


# --------------------------------------------------------------------------------------------------
# kv_mask and key/value layouts
# --------------------------------------------------------------------------------------------------

#: (key layout, value layout); the first is KIVI's.
LAYOUTS = [
    ("per_channel", "per_token"),
    ("per_token", "per_token"),
    ("per_channel", "per_channel"),
    ("per_token", "per_channel"),
]
#: group size per (operand, layout): per-channel values get a larger token group than keys, so the
#: split alignment must take the larger one.
GROUPS = {("k", "per_channel"): 16, ("k", "per_token"): 8, ("v", "per_channel"): 32, ("v", "per_token"): 8}


def _quantize(x, operand, layout, bits):
    """Per-channel packing is what quantize_keys does, per-token what quantize_values does, for
    either operand."""
    g = GROUPS[(operand, layout)]
    if layout == "per_channel":
        return Q.quantize_keys_reference(x, bits, g)
    return Q.quantize_values_reference(x, bits, g)


def _pack_layouts(k, v, layouts, bits=None):
    kbits, vbits = bits or (random.choice((2, 4, 8)), random.choice((2, 4, 8)))
    return _quantize(k, "k", layouts[0], kbits), _quantize(v, "v", layouts[1], vbits)


def _splits_for(layouts):
    """Explicit split sizes (with an empty split) aligned as the layouts require, for T = 96."""
    if "per_channel" in layouts:
        return [32, 0, 64]
    return [5, 0, 52, 39]  # no per-channel operand: any boundaries, tiles cut mid-way


def _mask(kind, b, hkv, t):
    """Random kv_mask of the given kind, about 30% dropped."""
    if kind == "none":
        return None
    if kind == "per_head":
        return torch.rand(b, hkv, t) > 0.3
    if kind == "broadcast":
        return torch.rand(b, 1, t) > 0.3
    if kind == "strided":  # non-contiguous view: token stride 2, head stride 4T
        return (torch.rand(b, 2 * hkv, 2 * t) > 0.3)[:, ::2, ::2]
    if kind == "left_pad":  # batch left padding, broadcast over heads
        m = torch.ones(b, 1, t, dtype=torch.bool)
        for i in range(b):
            m[i, :, : random.randint(0, t // 2)] = False
        return m
    raise AssertionError(kind)


def _align(layouts):
    """Split alignment: the largest token group of the per-channel operands, 1 if none."""
    return max((GROUPS[(o, lay)] for o, lay in zip("kv", layouts) if lay == "per_channel"), default=1)


def _bounds(t, num_splits, align):
    if isinstance(num_splits, int):
        return A.split_bounds(t, num_splits, align)
    return [0, *itertools.accumulate(num_splits)]


def _expected_partial(q, k, v, scale, bounds, kv_mask):
    """Independent float32 per-split attention over dense K/V with the mask applied: repeat kv heads
    per query head, drop masked logits, softmax; a split with no kept token gives (0, -inf)."""
    b, hq, _ = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = hq // hkv
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    keep = torch.ones(b, hkv, t, dtype=torch.bool) if kv_mask is None else kv_mask.expand(b, hkv, t)
    keep = keep.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    outs, lses = [], []
    for lo, hi in itertools.pairwise(bounds):
        lg = logits[..., lo:hi].masked_fill(~keep[..., lo:hi], float("-inf"))
        lses.append(torch.logsumexp(lg, dim=-1))
        p = torch.nan_to_num(torch.softmax(lg, dim=-1), nan=0.0)  # all-dropped rows: NaN -> 0
        outs.append(torch.einsum("bht,bhtd->bhd", p, v[:, :, lo:hi]))
    return torch.stack(outs, dim=2), torch.stack(lses, dim=2)


@pytest.mark.parametrize("mask_kind", ("none", "per_head", "broadcast"))
@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
def test_kernel_layouts_and_mask_match_reference(triton_mode, poison, layouts, mask_kind):
    """Each key/value layout pair, with and without kv_mask; Hq/Hkv = 3, D != Dv, odd split sizes or
    T not a multiple of the tile; one split of one head fully dropped must be exactly (0, -inf)."""
    b, hq, hkv, t, d, dv = 1, 6, 2, 96, 24, 40
    dtype = random.choice((torch.float32, torch.float16, torch.bfloat16))
    q, k, v = _inputs(b, hq, hkv, t, d, dv, dtype)
    kq, vq = _pack_layouts(k, v, layouts)
    kv_mask = _mask(mask_kind, b, hkv, t)
    # one split: 2 tiles of 64, the last half full; with a per-head mask its dropped split is a whole row
    num_splits = 1 if mask_kind == "per_head" else _splits_for(layouts)
    bounds = _bounds(t, num_splits, _align(layouts))
    dropped = None
    if kv_mask is not None:
        s = max(range(len(bounds) - 1), key=lambda i: bounds[i + 1] - bounds[i])  # the longest split
        mh = random.randrange(kv_mask.shape[1])
        kv_mask[0, mh, bounds[s] : bounds[s + 1]] = False
        # query heads reading the dropped mask row: one kv head's group, or all of them if broadcast
        heads = range(hq) if kv_mask.shape[1] == 1 else range(mh * 3, mh * 3 + 3)
        dropped = (s, list(heads))
    scale = d**-0.5
    ref_out, ref_lse = A.packed_attention_split_partials_reference(q, kq, vq, scale, num_splits, kv_mask=kv_mask)

    out, lse = A.packed_attention_split_partials(q, kq, vq, scale, num_splits, kv_mask=kv_mask)
    assert triton_mode() == 1
    ns = len(bounds) - 1
    assert out.shape == (b, hq, ns, dv) and out.dtype == torch.float32
    assert lse.shape == (b, hq, ns) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if dropped is not None:
        s, heads = dropped
        assert torch.equal(lse[0, heads, s], torch.full((len(heads),), float("-inf")))
        assert torch.equal(out[0, heads, s], torch.zeros(len(heads), dv))
    for lo, hi in itertools.pairwise(bounds):  # empty splits stay empty
        if hi == lo:
            assert torch.isneginf(lse[:, :, bounds.index(lo)]).all()


@pytest.mark.parametrize("mask_kind", ("strided", "left_pad"))
def test_kernel_mask_strides_and_fully_masked_rows(triton_mode, poison, mask_kind):
    """A non-contiguous mask is read through its strides; a kv head (or, broadcast, a batch row) with
    every token dropped gives lse -inf / out 0 in every split and a merged output of 0."""
    b, hq, hkv, t, d, dv = 2, 6, 2, 48, 16, 24
    q, k, v = _inputs(b, hq, hkv, t, d, dv)
    kq, vq = _pack_layouts(k, v, LAYOUTS[0], (4, 4))
    kv_mask = _mask(mask_kind, b, hkv, t)
    kv_mask[1, -1] = False  # batch 1: last mask row fully dropped
    heads = range(3, 6) if kv_mask.shape[1] == hkv else range(hq)
    out, lse = A.packed_attention_split_partials(q, kq, vq, 0.3, [16, 32], kv_mask=kv_mask)
    assert triton_mode() == 1
    ref_out, ref_lse = A.packed_attention_split_partials_reference(q, kq, vq, 0.3, [16, 32], kv_mask=kv_mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[1, heads]).all() and torch.equal(out[1, heads], torch.zeros_like(out[1, heads]))
    merged = A.packed_attention(q, kq, vq, 0.3, [16, 32], kv_mask=kv_mask)
    assert triton_mode() == 2
    assert torch.equal(merged[1, heads], torch.zeros_like(merged[1, heads]))
    assert torch.isfinite(merged).all()


def test_kernel_broadcast_mask_equals_expanded_mask(triton_mode, poison):
    """(B, 1, T) gives the same result as the same mask expanded to (B, Hkv, T)."""
    q, k, v = _inputs(1, 6, 2, 48, 16, 16)
    kq, vq = _pack_layouts(k, v, LAYOUTS[0], (8, 8))
    m = torch.rand(1, 1, 48) > 0.5
    o1, l1 = A.packed_attention_split_partials(q, kq, vq, 0.25, 2, kv_mask=m)
    o2, l2 = A.packed_attention_split_partials(q, kq, vq, 0.25, 2, kv_mask=m.expand(1, 2, 48).clone())
    assert triton_mode() == 2
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


# reference path (CPU) against independent dense attention --------------------------------------------


@pytest.mark.parametrize("mask_kind", ("none", "per_head", "broadcast", "strided", "left_pad"))
@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
def test_reference_matches_dense_over_dequantized_with_mask(layouts, mask_kind):
    b, hq, hkv, t = 2, 6, 2, 96
    d, dv = random.choice(((32, 16), (24, 40)))
    q, k, v = _inputs(b, hq, hkv, t, d, dv, random.choice((torch.float32, torch.bfloat16)))
    kq, vq = _pack_layouts(k, v, layouts)
    kd, vd = Q.dequantize_reference(kq, torch.float32), Q.dequantize_reference(vq, torch.float32)
    kv_mask = _mask(mask_kind, b, hkv, t)
    if kv_mask is not None:
        kv_mask[0, -1, : t // 2] = False  # half a row (a whole split when cut at T / 2)
        kv_mask[1, 0] = False  # a fully dropped row
    scale = d**-0.5
    for num_splits in (1, 2, _splits_for(layouts)):
        bounds = _bounds(t, num_splits, _align(layouts))
        expect_out, expect_lse = _expected_partial(q, kd, vd, scale, bounds, kv_mask)
        for fn in (A.packed_attention_split_partials, A.packed_attention_split_partials_reference):
            out, lse = fn(q, kq, vq, scale, num_splits, kv_mask=kv_mask)
            torch.testing.assert_close(out, expect_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, expect_lse, rtol=1e-5, atol=1e-5)
        # dense K/V have no token groups: an int split count cuts at multiples of 1
        expect_out, expect_lse = _expected_partial(q, kd, vd, scale, _bounds(t, num_splits, 1), kv_mask)
        out, lse = A.attention_split_partials(q, kd, vd, scale, num_splits, kv_mask=kv_mask)
        torch.testing.assert_close(out, expect_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, expect_lse, rtol=1e-5, atol=1e-5)
    # merged over the whole sequence: one split of the expectation
    expect, _ = _expected_partial(q, kd, vd, scale, [0, t], kv_mask)
    full = A.packed_attention(q, kq, vq, scale, _splits_for(layouts), kv_mask=kv_mask)
    torch.testing.assert_close(full.float(), expect[:, :, 0].to(q.dtype).float(), rtol=1e-2, atol=1e-2)
    merged, _ = A.merge_partials(*A.packed_attention_split_partials(q, kq, vq, scale, 3, kv_mask=kv_mask), dim=2)
    torch.testing.assert_close(merged, expect[:, :, 0], rtol=1e-5, atol=1e-5)


def test_mask_all_true_equals_no_mask():
    q, k, v = _inputs(2, 6, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 4, 2)
    for s in (1, 2):
        o1, l1 = A.packed_attention_split_partials(q, kq, vq, 0.3, s)
        o2, l2 = A.packed_attention_split_partials(q, kq, vq, 0.3, s, kv_mask=torch.ones(2, 1, 64, dtype=torch.bool))
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)


@pytest.mark.parametrize("stats_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_reference_dequantize_is_bit_exact(bits, stats_dtype):
    """The reference's own float32 dequantization equals dequantize_reference bit for bit."""
    x = torch.randn(2, 3, 32, 24) * 3 + torch.randn(24)
    for qt in (
        Q.quantize_keys_reference(x, bits, 8, stats_dtype),
        Q.quantize_values_reference(x, bits, 8, stats_dtype),
    ):
        got = R._dequantize_f32(qt)
        assert got.dtype == torch.float32
        assert torch.equal(got, Q.dequantize_reference(qt, torch.float32))


def test_split_alignment_follows_per_channel_operands():
    q, k, v = _inputs(1, 2, 1, 64, 16, 16)
    f = A.packed_attention_split_partials
    kpt, vpt = Q.quantize_values_reference(k, 4, 8), Q.quantize_values_reference(v, 4, 8)
    kpc, vpc = Q.quantize_keys_reference(k, 4, 8), Q.quantize_keys_reference(v, 4, 32)
    f(q, kpt, vpt, 0.3, [3, 61])  # no per-channel operand: any boundaries
    f(q, kpc, vpt, 0.3, [8, 56])
    with pytest.raises(ValueError, match="multiples of the token group size 8"):
        f(q, kpc, vpt, 0.3, [4, 60])
    with pytest.raises(ValueError, match="multiples of the token group size 32"):
        f(q, kpc, vpc, 0.3, [8, 56])  # the larger of the two per-channel groups
    assert A.split_bounds(64, 3, 32) == [0, 32, 64, 64]
    _, lse = f(q, kpt, vpc, 0.3, 3)
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, :2]).all()


def test_bad_kv_mask():
    q, k, v = _inputs(2, 4, 2, 32, 16, 16)
    kq, vq = _pack(k, v, 4, 4)
    good = torch.ones(2, 2, 32, dtype=torch.bool)
    calls = [
        lambda m: A.packed_attention_split_partials(q, kq, vq, 0.25, 1, kv_mask=m),
        lambda m: A.packed_attention_split_partials_reference(q, kq, vq, 0.25, 1, kv_mask=m),
        lambda m: A.packed_attention(q, kq, vq, 0.25, 1, kv_mask=m),
        lambda m: A.attention_split_partials(q, k, v, 0.25, 1, kv_mask=m),
    ]
    bad = [
        (good.to(torch.uint8), "kv_mask must be a bool tensor"),
        (good.float(), "kv_mask must be a bool tensor"),
        (good.tolist(), "kv_mask must be a bool tensor or None, got list"),
        (good[:, :, :31], r"kv_mask must have shape \(B, Hkv, T\) = \(2, 2, 32\) or \(B, 1, T\) = \(2, 1, 32\)"),
        (torch.ones(2, 3, 32, dtype=torch.bool), "kv_mask must have shape"),
        (torch.ones(1, 1, 32, dtype=torch.bool), "kv_mask must have shape"),
        (good[:, 0], "kv_mask must have shape"),
        (good[..., None], "kv_mask must have shape"),
        (torch.ones(2, 2, 32, dtype=torch.bool, device="meta"), "kv_mask must be on q's device"),
    ]
    for call in calls:
        for m, msg in bad:
            with pytest.raises(ValueError, match=msg):
                call(m)
    with pytest.raises(TypeError):  # keyword only
        A.packed_attention_split_partials(q, kq, vq, 0.25, 1, good)


# --------------------------------------------------------------------------------------------------
# the CPU path (plane-order unpacking, folded value scales) against the plain reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("k_layout", ("per_channel", "per_token"))
@pytest.mark.parametrize("v_layout", ("per_token", "per_channel"))
@pytest.mark.parametrize("v_group", (1, 8, 16))  # below a byte's slots / two per token / one per token (folded)
@pytest.mark.parametrize("splits", (1, [16, 32]))
@pytest.mark.parametrize("masked", (False, True))
def test_cpu_path_matches_reference(bits, k_layout, v_layout, v_group, splits, masked):
    q, k, v = _inputs(2, 6, 2, 48, 24, 16)
    kq = Q.quantize_keys_reference(k, bits, 16) if k_layout == "per_channel" else Q.quantize_values_reference(k, bits, 4)
    vq = Q.quantize_values_reference(v, bits, v_group) if v_layout == "per_token" else Q.quantize_keys_reference(v, bits, 16)
    kv_mask = (torch.rand(2, 2, 48) > 0.3) if masked else None
    got = A.packed_attention_split_partials(q, kq, vq, 0.3, splits, kv_mask=kv_mask)
    want = A.packed_attention_split_partials_reference(q, kq, vq, 0.3, splits, kv_mask=kv_mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# grouped-query attention: one program per (batch, kv head, split) serves the whole group
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def grids(monkeypatch):
    """Record the launch grid of every kernel launch."""
    seen = []
    lazy = A._kernel

    class _Recorder:
        def __call__(self, name):
            kernel = lazy(name)

            class _Launch:
                def __getitem__(self, grid):
                    seen.append(tuple(grid))
                    return kernel[grid]

            return _Launch()

    monkeypatch.setattr(A, "_kernel", _Recorder())
    return seen


@pytest.mark.parametrize(
    ("group", "hkv"),
    [(1, 3), (3, 2), (4, 2), (8, 2), (40, 1), (72, 1)],  # 40: 8 query heads x 5 flattened query tokens
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("layouts", [LAYOUTS[0], LAYOUTS[1]], ids="-".join)
def test_kernel_group_sizes_match_reference(triton_mode, poison, grids, group, hkv, layouts):
    """Every group size (a power of two or not, one row block or, above 64, two), with a per-head
    kv_mask that drops a whole split of one kv head and uneven splits: the outputs of every query
    head match the reference, the dropped split is (0, -inf) for the whole group, and the grid has
    one program per (batch, kv head, row block) per split, not one per query head."""
    b, t, d, dv = 2, 96, 24, 40
    hq = group * hkv
    dtype = random.choice((torch.float32, torch.float16, torch.bfloat16))
    q, k, v = _inputs(b, hq, hkv, t, d, dv, dtype)
    kq, vq = _pack_layouts(k, v, layouts)
    kv_mask = _mask("per_head", b, hkv, t)
    num_splits = _splits_for(layouts)  # uneven, with an empty split
    bounds = _bounds(t, num_splits, _align(layouts))
    s = max(range(len(bounds) - 1), key=lambda i: bounds[i + 1] - bounds[i])
    mh = random.randrange(hkv)
    kv_mask[1, mh, bounds[s] : bounds[s + 1]] = False
    scale = d**-0.5
    ref_out, ref_lse = A.packed_attention_split_partials_reference(q, kq, vq, scale, num_splits, kv_mask=kv_mask)

    out, lse = A.packed_attention_split_partials(q, kq, vq, scale, num_splits, kv_mask=kv_mask)
    assert triton_mode() == 1
    ns = len(bounds) - 1
    row_blocks = {40: 3, 72: 5}.get(group, 1)  # at most 16 rows per program for dims 24 / 40
    assert grids == [(b * hkv * row_blocks, ns)]
    assert A.programs_per_split(b, hq, hkv, d, dv) == b * hkv * row_blocks
    assert out.shape == (b, hq, ns, dv) and lse.shape == (b, hq, ns)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    heads = list(range(mh * group, (mh + 1) * group))
    assert torch.equal(lse[1, heads, s], torch.full((group,), float("-inf")))
    assert torch.equal(out[1, heads, s], torch.zeros(group, dv))
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):  # empty splits stay empty
        if hi == lo:
            assert torch.isneginf(lse[:, :, i]).all() and torch.equal(out[:, :, i], torch.zeros_like(out[:, :, i]))


def test_kernel_flattened_query_tokens_match_per_token_calls(triton_mode, poison):
    """8 query heads x 5 query tokens flattened into 40 rows over 1 kv head (what the attention
    function passes) equals 5 separate calls of 8 heads each."""
    b, hq, lq, t, d = 1, 8, 5, 64, 32
    q4 = torch.randn(b, hq, lq, d)
    _, k, v = _inputs(b, 1, 1, t, d, d)
    kq, vq = _pack(k, v, 4, 2)
    kv_mask = torch.rand(b, 1, t) > 0.2
    out, lse = A.packed_attention_split_partials(q4.reshape(b, hq * lq, d), kq, vq, 0.2, 2, kv_mask=kv_mask)
    out, lse = out.view(b, hq, lq, 2, d), lse.view(b, hq, lq, 2)
    for j in range(lq):
        o1, l1 = A.packed_attention_split_partials(q4[:, :, j].contiguous(), kq, vq, 0.2, 2, kv_mask=kv_mask)
        torch.testing.assert_close(out[:, :, j], o1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, :, j], l1, rtol=1e-5, atol=1e-6)
    assert triton_mode() == 1 + lq


def test_block_config_shrinks_tile_with_group():
    """(BLOCK_G, row blocks, BLOCK_T, num_warps): the whole group in one program while it fits the
    register budget (8 rows at D = 128, 4 at 256, 16 at 64), the token tile shrinking as the rows grow."""
    for group, want in [
        (1, (1, 1, 64, 4)),
        (2, (2, 1, 64, 8)),
        (3, (4, 1, 32, 8)),
        (8, (8, 1, 16, 8)),
        (16, (8, 2, 16, 8)),
        (40, (8, 5, 16, 8)),
    ]:
        assert A._block_config(group, 4096, 128, 128) == want
    assert A._block_config(1, 4096, 256, 256) == (1, 1, 32, 4)
    assert A._block_config(8, 4096, 256, 256) == (4, 2, 16, 8)
    assert A._block_config(16, 4096, 64, 64) == (16, 1, 16, 8)
    assert A._block_config(40, 4096, 128, 64) == (8, 5, 16, 8)  # the larger dim decides
    assert A._block_config(200, 4096, 16, 16) == (64, 4, 16, 8)  # never more than 64 rows
    assert A._block_config(1, 20, 128, 128)[2] == 32 and A._block_config(1, 0, 128, 128)[2] == 16  # short splits
    assert A.programs_per_split(2, 32, 8, 128, 128) == 16 and A.programs_per_split(1, 40, 1, 128, 128) == 5


# --------------------------------------------------------------------------------------------------
# jitting: kernel and device helpers in one mode; importable without Triton
# --------------------------------------------------------------------------------------------------


def test_kernel_and_helpers_jit_in_one_mode(monkeypatch):
    """The kernel and the device helpers it calls are jitted in the same mode, once per mode, and the
    compiled and interpreted versions live side by side."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for interpret, cls in (("0", JITFunction), ("1", InterpretedFunction), ("0", JITFunction)):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        for name in K.KERNELS:
            kernel = A._kernel(name)
            assert isinstance(kernel, cls) and A._kernel(name) is kernel
            assert all(isinstance(kernel.fn.__globals__[h.__name__], cls) for h in K.HELPERS)


def test_imports_and_runs_on_cpu_without_triton():
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError(name)
sys.meta_path.insert(0, NoTriton())
import torch
from pikvpress.kernels import attention as A, attention_triton as K, quantize as Q
assert K.tl is None and "triton" not in sys.modules
q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
kq, vq = Q.quantize_keys_reference(k, 4, 16), Q.quantize_values_reference(v, 4, 16)
out, lse = A.packed_attention_split_partials(q, kq, vq, 0.25, 2)
assert out.shape == (1, 4, 2, 16) and lse.shape == (1, 4, 2)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
