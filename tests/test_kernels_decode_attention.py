"""Split decode attention over packed KV: Triton kernel (under TRITON_INTERPRET=1) against the
torch reference, and the exact log-sum-exp merge against dense attention.

Fresh random inputs every run; kernel outputs are poisoned with NaN before each launch so an element
the kernel never writes cannot pass.
"""

import random

import pytest
import torch

from pikvpress.kernels import decode_attention as A
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

    for name in A._KERNEL_FNS:  # jitted on first use, so they see TRITON_INTERPRET=1
        assert isinstance(A._kernel(name), InterpretedFunction)
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
    ref_out, ref_lse = A.packed_decode_attention_partial_reference(q, kq, vq, scale, num_splits)

    out, lse = A.packed_decode_attention_partial(q, kq, vq, scale, num_splits)
    assert triton_mode() == 1
    ns = len(ref_lse[0, 0])
    assert out.shape == (b, 4, ns, dv) and out.dtype == torch.float32
    assert lse.shape == (b, 4, ns) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # -inf == -inf for empty splits

    merged = A.packed_decode_attention(q, kq, vq, scale, num_splits)
    assert triton_mode() == 2
    assert merged.dtype == dtype and merged.shape == (b, 4, dv)


def test_kernel_empty_split_is_zero_and_minus_inf(triton_mode, poison):
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 4, 4)
    out, lse = A.packed_decode_attention_partial(q, kq, vq, 0.25, [0, 32, 0, 32, 0])
    assert triton_mode() == 1
    for s in (0, 2, 4):
        assert torch.equal(lse[:, :, s], torch.full_like(lse[:, :, s], float("-inf")))
        assert torch.equal(out[:, :, s], torch.zeros_like(out[:, :, s]))
    assert torch.isfinite(lse[:, :, [1, 3]]).all()


def test_kernel_gqa_mapping(triton_mode, poison):
    """Query head h must read kv head h // (Hq // Hkv): compare with separate single-head calls."""
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 8, 8)
    out, lse = A.packed_decode_attention_partial(q, kq, vq, 0.25, 2)
    for h in range(4):
        kh, vh = _pack(k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], 8, 8)
        o1, l1 = A.packed_decode_attention_partial(q[:, h : h + 1], kh, vh, 0.25, 2)
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
    out, lse = A.packed_decode_attention_partial(q, kq, vq, scale, num_splits)
    merged, merged_lse = A.merge_attention_states(out, lse, dim=2)
    expect, expect_lse = _dense_attention(
        q, Q.dequantize_reference(kq, torch.float32), Q.dequantize_reference(vq, torch.float32), scale
    )
    torch.testing.assert_close(merged, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, expect_lse, rtol=1e-5, atol=1e-5)
    full = A.packed_decode_attention(q, kq, vq, scale, num_splits)
    torch.testing.assert_close(full, expect, rtol=1e-5, atol=1e-5)


def test_merge_invariant_to_split_count():
    q, k, v = _inputs(2, 4, 2, 96, 32, 32)
    kq, vq = _pack(k, v, 4, 4)
    results = [A.packed_decode_attention(q, kq, vq, 0.2, s) for s in (1, 2, 3, 4, 6, 8)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)


def test_dense_partial_merge_equals_dense_attention():
    q, k, v = _inputs(2, 4, 2, 37, 16, 24)
    for s in (1, 2, 5, [10, 0, 27]):
        out, lse = A.dense_decode_attention_partial(q, k, v, 0.3, s)
        merged, merged_lse = A.merge_attention_states(out, lse, dim=-1)
        expect, expect_lse = _dense_attention(q, k, v, 0.3)
        torch.testing.assert_close(merged, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_lse, expect_lse, rtol=1e-5, atol=1e-5)


def test_merge_all_empty_and_sequence_inputs():
    outs = torch.randn(3, 2, 5)
    lses = torch.full((3, 2), float("-inf"))
    o, l = A.merge_attention_states(outs, lses, dim=1)
    assert torch.equal(o, torch.zeros(3, 5)) and torch.equal(l, torch.full((3,), float("-inf")))
    # mixing an empty split (NaN output, -inf lse) with a real one returns the real one
    a_o, a_l = torch.randn(4, 8), torch.randn(4)
    e_o, e_l = torch.full((4, 8), float("nan")), torch.full((4,), float("-inf"))
    o, l = A.merge_attention_states([a_o, e_o], [a_l, e_l], dim=-1)
    torch.testing.assert_close(o, a_o)
    torch.testing.assert_close(l, a_l)
    # merging two halves with sequence inputs along a leading axis
    o, l = A.merge_attention_states([a_o, a_o], [a_l, a_l], dim=0)
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
        got = A.packed_decode_attention(q, kq, vq, scale, 3)
        errs.append((got - exact).abs().mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def test_bad_arguments():
    q, k, v = _inputs(1, 4, 2, 64, 16, 16)
    kq, vq = _pack(k, v, 4, 4)
    f = A.packed_decode_attention_partial
    with pytest.raises(ValueError, match="num_splits sizes must be multiples of the key group size 16"):
        f(q, kq, vq, 0.25, [8, 56])
    with pytest.raises(ValueError, match="num_splits sizes must sum"):
        f(q, kq, vq, 0.25, [16, 16])
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        f(q, kq, vq, 0.25, 0)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k_packed heads \(2\)"):
        f(q[:, :3], kq, vq, 0.25, 1)
    with pytest.raises(ValueError, match="k_packed.layout must be 'per_channel'"):
        f(q, Q.quantize_values_reference(k, 4, 16), vq, 0.25, 1)
    with pytest.raises(ValueError, match="v_packed.layout must be 'per_token'"):
        f(q, kq, Q.quantize_keys_reference(v, 4, 16), 0.25, 1)
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
        A.dense_decode_attention_partial(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), 0.25, 1)
    with pytest.raises(ValueError, match="outs shape"):
        A.merge_attention_states(torch.randn(2, 3), torch.randn(2, 3), dim=1)
