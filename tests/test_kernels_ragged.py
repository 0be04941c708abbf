"""Split decode attention over ragged heads: the Triton kernel (under TRITON_INTERPRET=1) against its torch reference,
and both against dense attention over each head's own tokens.

Fresh random inputs every run; kernel outputs are poisoned with NaN before each launch, so an element the kernel
fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from pikvpress.kernels import ragged as R
from pikvpress.kernels.ragged_reference import ragged_offsets

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # both sides read the same rounded inputs


@pytest.fixture
def triton_mode(monkeypatch):
    """Run the Triton kernel on CPU under the interpreter; yields a counter of kernel launches."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PIKVPRESS_FORCE_TRITON", "1")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(R._kernel("ragged_attention_split_partials"), InterpretedFunction)
    start = R.LAUNCHES["count"]
    yield lambda: R.LAUNCHES["count"] - start


@pytest.fixture
def poison(monkeypatch):
    """Fill every kernel output with NaN before the launch."""

    def _empty(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(R, "_empty", _empty)


def _ragged(b, hkv, hq, lq, d, dv, max_len, dtype):
    lengths = torch.randint(0, max_len + 1, (b, hkv))
    lengths[0, 0] = 0  # an empty head
    lengths[-1, -1] = max_len  # the longest
    n = int(lengths.sum())
    q = torch.randn(b, hq, lq, d).to(dtype)
    keys = (torch.randn(n, d) * 2).to(dtype)
    values = torch.randn(n, dv).to(dtype)
    return q, keys, values, ragged_offsets(lengths), lengths


def _dense(q, keys, values, offsets, scale, keep=None):
    """float64 attention of each query row over its own head's kept tokens, head by head."""
    b, hq, lq, _ = q.shape
    hkv = (offsets.shape[0] - 1) // b
    out = torch.zeros(b, hq, lq, values.shape[-1], dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            r = i * hkv + h // (hq // hkv)
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            rows = torch.arange(lo, hi)
            if keep is not None:
                rows = rows[keep[lo:hi]]
            if rows.numel() == 0:
                continue
            k, v = keys[rows].double(), values[rows].double()
            for j in range(lq):
                out[i, h, j] = torch.softmax(k @ q[i, h, j].double() * scale, 0) @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("shape", [(2, 2, 4, 1, 32, 32), (1, 2, 8, 3, 64, 16), (2, 1, 1, 1, 16, 48)])
def test_kernel_matches_reference_split_by_split(triton_mode, poison, dtype, num_splits, shape):
    b, hkv, hq, lq, d, dv = shape
    q, keys, values, offsets, _ = _ragged(b, hkv, hq, lq, d, dv, 37, dtype)
    out_k, lse_k = R.ragged_attention_split_partials(q, keys, values, offsets, 0.2, num_splits)
    assert triton_mode() == 1
    chunk = R.ragged_chunk(offsets, num_splits)
    out_r, lse_r = R.ragged_split_partials(q, keys, values, offsets, 0.2, chunk, num_splits)
    assert out_k.shape == (b, hq, lq, num_splits, dv) and lse_k.shape == (b, hq, lq, num_splits)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(lse_k, lse_r, atol=tol, rtol=tol)
    torch.testing.assert_close(out_k, out_r, atol=tol, rtol=tol)
    assert (out_k[0, : hq // hkv] == 0).all() and torch.isneginf(lse_k[0, : hq // hkv]).all()  # the empty head


@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_merged_kernel_partial_equals_dense_attention_over_each_heads_tokens(triton_mode, poison, num_splits):
    q, keys, values, offsets, _ = _ragged(2, 2, 4, 2, 32, 32, 45, torch.float32)
    keep = torch.rand(keys.shape[0]) < 0.7
    out, lse = R.ragged_attention_partial(q, keys, values, offsets, 0.2, keep=keep, num_splits=num_splits)
    assert triton_mode() == 1
    torch.testing.assert_close(out.double(), _dense(q, keys, values, offsets, 0.2, keep), atol=2e-5, rtol=2e-5)
    _, ref_lse = R._partial_reference(q, keys, values, offsets, 0.2, keep)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_reference_split_partials_merge_to_dense_attention():
    q, keys, values, offsets, _ = _ragged(2, 2, 4, 1, 16, 8, 30, torch.float32)
    out, lse = R.ragged_attention_split_partials(q, keys, values, offsets, 0.3, 4)
    merged, _ = R.merge_partials(out, lse, dim=3)
    torch.testing.assert_close(merged.double(), _dense(q, keys, values, offsets, 0.3), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    q, keys, values, offsets, _ = _ragged(2, 2, 4, 1, 16, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        R.ragged_attention_split_partials(q, keys, values, offsets, 0.3, 0)
    with pytest.raises(ValueError, match="offsets describe"):
        R.ragged_attention_split_partials(q, keys, values, offsets[:-1], 0.3)
    with pytest.raises(ValueError, match="flat"):
        R.ragged_attention_split_partials(q, keys[:, :8], values, offsets, 0.3)
    with pytest.raises(ValueError, match="keep"):
        R.ragged_attention_partial(q, keys, values, offsets, 0.3, keep=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_packed_kernel_matches_the_reference_over_the_dequantized_body(triton_mode, poison, bits, num_splits):
    """A packed ragged body (per-token codes and stats): the kernel reads the codes; the reference dequantizes."""
    from pikvpress.kernels.quantize import dequantize, quantize_values

    q, keys, values, offsets, _ = _ragged(2, 2, 4, 2, 32, 16, 37, torch.float32)
    n = keys.shape[0]
    kq = quantize_values(keys.view(1, 1, n, 32), bits, 8, torch.float16)
    vq = quantize_values(values.view(1, 1, n, 16), bits, 8, torch.float16)
    keep = torch.rand(n) < 0.8
    out_k, lse_k = R.ragged_attention_split_partials(q, kq, vq, offsets, 0.2, num_splits, keep=keep)
    assert triton_mode() == 1
    dk, dv = dequantize(kq, torch.float32).view(n, 32), dequantize(vq, torch.float32).view(n, 16)
    chunk = R.ragged_chunk(offsets, num_splits)
    out_r, lse_r = R.ragged_split_partials(q, dk, dv, offsets, 0.2, chunk, num_splits, keep)
    torch.testing.assert_close(lse_k, lse_r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out_k, out_r, atol=2e-5, rtol=2e-5)
    merged, _ = R.ragged_attention_partial(q, kq, vq, offsets, 0.2, keep=keep, num_splits=num_splits)
    torch.testing.assert_close(merged.double(), _dense(q, dk, dv, offsets, 0.2, keep), atol=2e-5, rtol=2e-5)


def test_packed_and_dense_operands_are_not_mixed():
    from pikvpress.kernels.quantize import quantize_values

    q, keys, values, offsets, _ = _ragged(1, 2, 4, 1, 16, 16, 10, torch.float32)
    kq = quantize_values(keys.view(1, 1, -1, 16), 4, 8, torch.float16)
    with pytest.raises(ValueError, match="both be packed"):
        R.ragged_attention_split_partials(q, kq, values, offsets, 0.3)
