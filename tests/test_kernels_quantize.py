"""KIVI-style quantization: Triton kernels (under TRITON_INTERPRET=1) against the torch references.

Fresh random inputs every run; kernel outputs are poisoned before each launch so an element the
kernel never writes cannot pass.
"""

import random

import pytest
import torch

from pikvpress.kernels import quantize as Q

BITS = (2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATS = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def triton_mode(monkeypatch):
    """Run the Triton kernels on CPU under the interpreter; yields a counter of kernel launches."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PIKVPRESS_FORCE_TRITON", "1")
    from triton.runtime.interpreter import InterpretedFunction

    for name in Q._KERNEL_FNS:  # jitted on first use, so they see TRITON_INTERPRET=1
        assert isinstance(Q._kernel(name), InterpretedFunction)
    start = Q.LAUNCHES["count"]
    yield lambda: Q.LAUNCHES["count"] - start


@pytest.fixture
def poison(monkeypatch):
    """Fill every kernel output with garbage before the launch.

    Floating outputs get NaN; uint8 outputs get the bitwise complement of a registered expected
    tensor of that shape (so any unwritten byte differs), or random bytes.
    """
    expected: dict = {}

    def _empty(shape, dtype, device):
        shape = tuple(shape)
        if dtype == torch.uint8:
            if shape in expected:
                return (~expected[shape]).clone().to(device)
            return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(Q, "_empty", _empty)
    return expected


def _shape(layout: str) -> tuple[int, int, int, int]:
    return (random.randint(1, 2), 3, 48, random.choice((24, 40)))


def _kv(shape, dtype) -> torch.Tensor:
    """Random KV with per-channel offsets and scales (key-like outliers)."""
    d = shape[-1]
    x = torch.randn(shape) * (0.5 + 3 * torch.rand(d)) + 2 * torch.randn(d)
    return x.to(dtype)


def _funcs(layout):
    if layout == "per_channel":
        return Q.quantize_keys, Q.quantize_keys_reference
    return Q.quantize_values, Q.quantize_values_reference


def _groups(layout):
    return (4, 16) if layout == "per_channel" else (2, 8)


def _expand(stat: torch.Tensor, qt: Q.QuantizedTensor) -> torch.Tensor:
    dim = 2 if qt.layout == "per_channel" else 3
    return stat.float().repeat_interleave(qt.group_size, dim=dim)


CASES = [(lay, g) for lay in ("per_channel", "per_token") for g in _groups(lay)]


# --------------------------------------------------------------------------------------------------
# kernel vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stats_dtype", STATS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout,group_size", CASES)
def test_kernel_matches_reference(triton_mode, poison, layout, group_size, bits, dtype, stats_dtype):
    shape = _shape(layout)
    x = _kv(shape, dtype)
    quantize, reference = _funcs(layout)
    ref = reference(x, bits, group_size, stats_dtype)
    poison[tuple(ref.packed.shape)] = ref.packed

    got = quantize(x, bits, group_size, stats_dtype)
    assert triton_mode() == 1
    assert got.packed.dtype == torch.uint8 and got.packed.shape == (*shape[:3], shape[3] * bits // 8)
    assert got.scale.dtype == stats_dtype and got.scale.shape == ref.scale.shape
    assert torch.equal(got.packed, ref.packed)  # bit exact: same float32 arithmetic, half-up rounding
    assert torch.equal(got.scale, ref.scale)
    assert torch.equal(got.zero, ref.zero)
    assert (got.bits, got.group_size, got.layout, got.shape) == (bits, group_size, layout, shape)

    for out_dtype in (dtype, torch.float32):
        expect = Q.dequantize_reference(ref, out_dtype)
        deq = Q.dequantize(got, out_dtype)
        assert triton_mode() >= 2
        assert deq.dtype == out_dtype and deq.shape == shape
        assert not deq.isnan().any()
        torch.testing.assert_close(deq, expect, rtol=1e-6, atol=1e-6)


def test_dequantize_kernel_bit_layout(triton_mode, poison):
    """Unpacking alone: scale 1, zero 0 gives back the codes, low bits first in each byte."""
    for bits in BITS:
        per = 8 // bits
        b, h, t, d = 1, 3, 8, 8 * per
        packed = torch.randint(0, 256, (b, h, t, d * bits // 8), dtype=torch.uint8)
        ones = torch.ones(b, h, t, d // 8, dtype=torch.float16)
        qt = Q.QuantizedTensor(packed, ones, torch.zeros_like(ones), bits, 8, "per_token", (b, h, t, d))
        codes = Q.dequantize(qt, torch.float32)
        byte = packed.long().repeat_interleave(per, dim=-1)
        shift = (torch.arange(d) % per) * bits
        assert torch.equal(codes.long(), (byte >> shift) & (2**bits - 1))
        torch.testing.assert_close(Q.dequantize_reference(qt, torch.float32), codes, rtol=0, atol=0)


def test_pack_order_reference():
    q = torch.tensor([[0, 1, 2, 3, 3, 0, 0, 1]], dtype=torch.int32)
    assert Q._pack_reference(q, 2).tolist() == [[0b11100100, 0b01000011]]
    assert Q._pack_reference(q, 4).tolist() == [[0x10, 0x32, 0x03, 0x10]]
    for bits in BITS:
        codes = torch.randint(0, 2**bits, (3, 16), dtype=torch.int32)
        assert torch.equal(Q._unpack_reference(Q._pack_reference(codes, bits), bits), codes)


def test_dispatch(monkeypatch):
    """CPU tensors run the reference unless PIKVPRESS_FORCE_TRITON=1."""
    monkeypatch.delenv("PIKVPRESS_FORCE_TRITON", raising=False)
    start = Q.LAUNCHES["count"]
    qt = Q.quantize_keys(torch.randn(1, 3, 16, 8), 4, 16)
    Q.dequantize(qt, torch.float32)
    assert Q.LAUNCHES["count"] == start


# --------------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("stats_dtype", STATS, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", ["per_channel", "per_token"])
def test_error_bound(request, impl, layout, bits, stats_dtype):
    """|x - x_hat| <= scale / 2, plus what storing scale and zero in ``stats_dtype`` costs."""
    if impl == "triton":
        request.getfixturevalue("triton_mode")
    group_size = _groups(layout)[1]
    x = _kv(_shape(layout), torch.float32)
    quantize, _ = _funcs(layout)
    qt = quantize(x, bits, group_size, stats_dtype)
    x_hat = Q.dequantize(qt, torch.float32)

    qmax = 2**bits - 1
    gdim = 3 if layout == "per_channel" else 4
    b, h, t, d = x.shape
    xg = (
        x.reshape(b, h, t // group_size, group_size, d)
        if layout == "per_channel"
        else x.reshape(b, h, t, d // group_size, group_size)
    )
    mn, mx = xg.amin(dim=gdim), xg.amax(dim=gdim)
    scale, zero = _expand(qt.scale, qt), _expand(qt.zero, qt)
    true_scale = _expand((mx - mn) / qmax, qt)
    stats_err = qmax * (true_scale - scale).abs() + (_expand(mn, qt) - zero).abs()
    bound = scale / 2 + stats_err + 1e-5 * (x.abs() + 1)
    err = (x - x_hat).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    if stats_dtype == torch.float16:  # the stats rounding term stays small next to half a step
        assert (err <= 0.7 * true_scale + 1e-5).all()


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", ["per_channel", "per_token"])
def test_constant_groups_exact(request, impl, layout, bits, dtype):
    """A group of equal values gets scale 0 and dequantizes to exactly that value."""
    if impl == "triton":
        request.getfixturevalue("triton_mode")
    group_size = _groups(layout)[1]
    x = _kv(_shape(layout), dtype)
    if layout == "per_channel":
        x[:, :, :group_size, :] = x[:, :, :1, :]  # first token group constant per channel
        x[:, 1, -group_size:, :] = 0.0
        const = torch.zeros_like(x, dtype=torch.bool)
        const[:, :, :group_size] = True
        const[:, 1, -group_size:] = True
    else:
        x[..., :group_size] = x[..., :1]  # first channel group constant per token
        x[:, 2] = 3.25  # a whole head constant
        const = torch.zeros_like(x, dtype=torch.bool)
        const[..., :group_size] = True
        const[:, 2] = True
    quantize, _ = _funcs(layout)
    qt = quantize(x, bits, group_size, stats_dtype=dtype)
    x_hat = Q.dequantize(qt, dtype)
    assert torch.equal(x_hat[const], x[const])
    stat_const = qt.scale == 0
    assert stat_const.any()
    assert not (qt.scale.isnan().any() or qt.zero.isnan().any())


@pytest.mark.parametrize("layout", ["per_channel", "per_token"])
@pytest.mark.parametrize("bits", BITS)
def test_nbytes(layout, bits):
    b, h, t, d = _shape(layout)
    g = _groups(layout)[1]
    quantize, _ = _funcs(layout)
    qt = quantize(torch.randn(b, h, t, d), bits, g)
    n_stats = b * h * (t // g) * d if layout == "per_channel" else b * h * t * (d // g)
    assert qt.nbytes == b * h * t * d * bits // 8 + 2 * n_stats * 2
    with pytest.raises(AttributeError):  # frozen
        qt.bits = 4


# --------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "public"])
def test_bad_arguments(impl):
    qk = Q.quantize_keys_reference if impl == "reference" else Q.quantize_keys
    qv = Q.quantize_values_reference if impl == "reference" else Q.quantize_values
    x = torch.randn(1, 3, 48, 24)
    for bits in (1, 3, 16, True, 4.0):
        with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\)"):
            qk(x, bits, 16)
    for g in (0, 3, 12, -4):
        with pytest.raises(ValueError, match="group_size must be a positive power of two"):
            qv(x, 4, g)
    with pytest.raises(ValueError, match="group_size must divide the number of tokens"):
        qk(x, 4, 32)
    with pytest.raises(ValueError, match="group_size must divide dim"):
        qv(x, 4, 16)
    with pytest.raises(ValueError, match="must be a 4-d tensor"):
        qk(x[0], 4, 16)
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        qv(torch.ones(1, 3, 48, 24, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="stats_dtype must be one of"):
        qk(x, 4, 16, stats_dtype=torch.float32)
    with pytest.raises(ValueError, match="dim \\* bits must be divisible by 8"):
        qv(torch.randn(1, 3, 48, 6), 2, 2)
    deq = Q.dequantize_reference if impl == "reference" else Q.dequantize
    with pytest.raises(ValueError, match="qt must be a QuantizedTensor"):
        deq(x, torch.float32)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        deq(Q.quantize_keys_reference(x, 4, 16), torch.int8)
