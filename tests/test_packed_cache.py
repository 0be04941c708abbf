"""PackedKVLayer (storage, lengths, bytes, crops) and the packed attention function against dense attention."""

from __future__ import annotations

import pytest
import torch

from pikvpress.attention import packed_layer_attention
from pikvpress.cache import PackedKVLayer, PackedKVView, cache_nbytes
from pikvpress.kernels.quantize import dequantize

STATS_BYTES = 2  # float16 scales and zero points


def rand(*shape, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=gen)


def make_layer(t=37, b=2, h=3, dk=16, dv=8, bits=4, gs=4, kgs=8, res=5, layout="kivi", dtype=torch.float32):
    k, v = rand(b, h, t, dk).to(dtype), rand(b, h, t, dv).to(dtype)
    layer = PackedKVLayer.from_dense(
        k, v, bits=bits, group_size=gs, key_group_size=kgs, residual_length=res, layout=layout
    )
    return layer, k, v


def expected_split(t: int, res: int, kgs: int) -> int:
    return (t - res) // kgs * kgs if t >= res + kgs else 0


@pytest.mark.parametrize("t", [0, 3, 12, 13, 20, 21, 64])
@pytest.mark.parametrize("res", [0, 5])
def test_prefill_split_between_packed_and_residual(t, res):
    layer, k, v = make_layer(t=t, res=res)
    p = expected_split(t, res, 8)
    assert layer.packed_length == p
    assert layer.residual_length_now == t - p
    assert layer.get_seq_length() == t
    assert layer.keys.shape == (2, 3, t, 16) and layer.values.shape == (2, 3, t, 8)
    if t >= res:
        assert res <= layer.residual_length_now < res + 8
    keys, values = layer.dequantized()
    # the residual is stored as given; the packed part is within quantization error
    torch.testing.assert_close(keys[:, :, p:], k[:, :, p:], rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, p:], v[:, :, p:], rtol=0, atol=0)
    if p:
        assert (keys[:, :, :p] - k[:, :, :p]).abs().max() < 0.5
        assert (values[:, :, :p] - v[:, :, :p]).abs().max() < 0.5


@pytest.mark.parametrize("layout", ["kivi", "per_token"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bytes_equal_the_formula(bits, layout):
    b, h, t, dk, dv, gs, kgs, res = 2, 3, 70, 16, 8, 4, 8, 5
    layer, _, _ = make_layer(t=t, b=b, h=h, dk=dk, dv=dv, bits=bits, gs=gs, kgs=kgs, res=res, layout=layout)
    p = expected_split(t, res, kgs)
    r = t - p
    codes = b * h * p * (dk + dv) * bits // 8
    if layout == "kivi":
        key_stats = b * h * (p // kgs) * dk * 2 * STATS_BYTES
    else:
        key_stats = b * h * p * (dk // gs) * 2 * STATS_BYTES
    value_stats = b * h * p * (dv // gs) * 2 * STATS_BYTES
    residual = b * h * r * (dk + dv) * 4  # float32
    assert layer.nbytes == codes + key_stats + value_stats + residual


def test_int4_bytes_per_element_below_target_for_long_contexts():
    """The README's targets, overheads included, for the default group sizes (64 channels, 128 tokens)."""
    for bits, target in ((8, 0.53), (4, 0.28), (2, 0.16)):
        k = torch.randn(1, 1, 32768 + 128, 128, dtype=torch.bfloat16)
        layer = PackedKVLayer.from_dense(
            k, k.clone(), bits=bits, group_size=64, key_group_size=128, residual_length=128, stats_dtype=torch.bfloat16
        )
        dense = 2 * k.numel() * k.element_size()
        assert layer.nbytes / dense <= target, (bits, layer.nbytes / dense)


def test_appending_keeps_residual_bounded_and_contents_exact():
    layer, k, v = make_layer(t=10, b=1, h=2, res=3)
    keys_all, values_all = [k], [v]
    for step in range(30):
        nk, nv = rand(1, 2, 1, 16), rand(1, 2, 1, 8)
        keys_all.append(nk)
        values_all.append(nv)
        layer.update(nk, nv)
        n = 11 + step
        assert layer.get_seq_length() == n
        assert 3 <= layer.residual_length_now < 3 + 8
        assert layer.packed_length % 8 == 0
        p = layer.packed_length
        full_k = torch.cat(keys_all, dim=2)
        dk, _ = layer.dequantized()
        torch.testing.assert_close(dk[:, :, p:], full_k[:, :, p:], rtol=0, atol=0)
    # packed groups are quantized once, from the tokens as they were appended
    kg = full_k[:, :, :8]
    expected = dequantize(layer.packed_keys, torch.float32)[:, :, :8]
    assert (expected - kg).abs().max() < 0.3


def test_update_returns_dense_when_pikv_attention_is_off():
    layer, _k, _v = make_layer(t=30)
    nk, nv = rand(2, 3, 1, 16), rand(2, 3, 1, 8)
    keys, values = layer.update(nk, nv)
    assert keys.shape == (2, 3, 31, 16) and values.shape == (2, 3, 31, 8)
    dk, dv = layer.dequantized()
    assert torch.equal(keys, dk) and torch.equal(values, dv)


def test_update_returns_tagged_residual_when_pikv_attention_is_on():
    from conftest import get_tiny_model

    from pikvpress import enable_packed_attention

    model = get_tiny_model("llama")
    enable_packed_attention(model)
    layer, _k, _v = make_layer(t=30)
    layer.config = model.config
    keys, values = layer.update(rand(2, 3, 1, 16), rand(2, 3, 1, 8))
    assert keys.shape[2] == layer.residual_length_now
    assert keys._pikv_packed_layer is layer and values._pikv_packed_layer is layer


@pytest.mark.parametrize("n", [30, 21, 16, 13, 3, 0])
def test_pipeline_style_crop_through_views(n):
    layer, _k, _v = make_layer(t=30, res=4)
    before_k, before_v = layer.dequantized()
    view = layer.keys[:, :, :n]
    assert isinstance(view, PackedKVView) and view.shape[2] == n
    layer.keys = view
    layer.values = layer.values[:, :, :n]
    assert layer.get_seq_length() == n
    assert layer.packed_length % 8 == 0 and layer.packed_length <= n
    after_k, after_v = layer.dequantized()
    torch.testing.assert_close(after_k, before_k[:, :, :n], rtol=0, atol=0)
    torch.testing.assert_close(after_v, before_v[:, :, :n], rtol=0, atol=0)
    layer.update(rand(2, 3, 1, 16), rand(2, 3, 1, 8))
    assert layer.get_seq_length() == n + 1


def test_crop_negative_and_ellipsis_slices():
    layer, _, _ = make_layer(t=30)
    assert layer.keys[..., :7, :].shape[2] == 7
    layer.crop(-5)
    assert layer.get_seq_length() == 25
    layer.crop(40)
    assert layer.get_seq_length() == 25


def test_views_refuse_tensor_use_and_foreign_assignment():
    layer, k, _ = make_layer(t=30)
    with pytest.raises(TypeError, match="QuantizationPress"):
        torch.cat([layer.keys, layer.keys], dim=2)
    with pytest.raises(TypeError, match="token axis"):
        layer.keys[:, :1]
    with pytest.raises(TypeError, match="cropped"):
        layer.keys = k
    assert torch.equal(layer.keys.dequantize(), layer.dequantized()[0])


def test_batch_operations():
    layer, _, _ = make_layer(t=30, b=3)
    dk, dv = layer.dequantized()
    layer.batch_select_indices(torch.tensor([2, 0]))
    nk, nv = layer.dequantized()
    assert torch.equal(nk, dk[[2, 0]]) and torch.equal(nv, dv[[2, 0]])
    layer.batch_repeat_interleave(2)
    assert layer.dequantized()[0].shape[0] == 4
    layer.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert torch.equal(layer.dequantized()[0][3], nk[0])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes == 0


def test_cache_nbytes_mixes_dense_and_packed_layers():
    from transformers import DynamicCache

    cache = DynamicCache()
    k, v = rand(1, 2, 20, 16), rand(1, 2, 20, 16)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    packed = PackedKVLayer.from_dense(k, v, bits=4, group_size=4, key_group_size=8, residual_length=0)
    cache.layers[1] = packed
    assert cache_nbytes(cache) == 2 * k.numel() * 4 + packed.nbytes


@pytest.mark.parametrize(
    "bad",
    [
        {"bits": 3},
        {"bits": True},
        {"group_size": 6},
        {"group_size": 0},
        {"key_group_size": 12},
        {"residual_length": -1},
        {"stats_dtype": torch.float32},
        {"layout": "kiwi"},
    ],
)
def test_bad_layer_arguments(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        PackedKVLayer(**bad)


def test_group_size_must_divide_head_dims():
    with pytest.raises(ValueError, match="group_size=8 does not divide the value head dim 12"):
        PackedKVLayer.from_dense(rand(1, 1, 8, 16), rand(1, 1, 8, 12), group_size=8, key_group_size=4)


# --------------------------------------------------------------------------------------------------
# packed attention vs dense attention over the dequantized cache
# --------------------------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    training = False


@pytest.fixture(params=["cpu", "triton"])
def path(request, monkeypatch):
    """The pure-torch CPU path, or the CUDA path (split Triton kernel + merge) under the interpreter."""
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("PIKVPRESS_FORCE_TRITON", "1")
    return request.param


def dense_attention(q, k, v, scale, keep=None, sinks=None):
    """float64 reference: q (B,Hq,L,D), k/v (B,Hkv,N,D) with keep (B,Hq|1,L,N) bool."""
    b, hq, lq, _ = q.shape
    g = hq // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    logits = q.double() @ k.transpose(-1, -2) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.double().view(1, hq, 1, 1).expand(b, hq, lq, 1)], dim=-1)
    p = torch.softmax(logits, dim=-1)
    p = torch.nan_to_num(p)[..., : k.shape[2]]
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("layout", ["kivi", "per_token"])
def test_packed_attention_equals_dense_attention_over_dequantized(bits, lq, layout, path):
    b, hkv, hq, dk, dv = 2, 2, 6, 16, 8
    layer, _, _ = make_layer(t=45, b=b, h=hkv, dk=dk, dv=dv, bits=bits, layout=layout)
    q = rand(b, hq, lq, dk)
    new_k, new_v = rand(b, hkv, lq, dk), rand(b, hkv, lq, dv)
    # what update() hands attention under pikv: the residual including the new tokens
    full_k, full_v = layer.dequantized()
    res_k = torch.cat([layer.residual_keys, new_k], dim=2)
    res_v = torch.cat([layer.residual_values, new_v], dim=2)
    n = full_k.shape[2] + lq
    keep = torch.ones(b, 1, lq, n, dtype=torch.bool)
    keep[..., n - lq :] = torch.ones(lq, lq, dtype=torch.bool).tril()  # causal among the new tokens
    ref = dense_attention(q, torch.cat([full_k, new_k], 2), torch.cat([full_v, new_v], 2), 0.3, keep)
    out = packed_layer_attention(_Module(), q, res_k, res_v, None, layer, scaling=0.3)
    assert out.shape == (b, lq, hq, dv)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool4d", "float4d", "2d"])
def test_packed_attention_with_padding_mask_and_sinks(mask_kind, path):
    b, hkv, hq, dk, dv, lq = 2, 2, 4, 16, 8, 3
    layer, _, _ = make_layer(t=40, b=b, h=hkv, dk=dk, dv=dv, bits=4)
    q = rand(b, hq, lq, dk)
    new_k, new_v = rand(b, hkv, lq, dk), rand(b, hkv, lq, dv)
    full_k, full_v = layer.dequantized()
    n = full_k.shape[2] + lq
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, :11] = False  # row 1 is left-padded over packed tokens
    causal = torch.ones(lq, n, dtype=torch.bool).tril(n - lq)
    keep = pad[:, None, None, :] & causal[None, None]
    if mask_kind == "bool4d":
        mask = keep
    elif mask_kind == "float4d":
        mask = torch.zeros(b, 1, lq, n).masked_fill(~keep, torch.finfo(torch.float32).min)
    else:
        mask = pad.long()
    sinks = rand(hq)
    res_k = torch.cat([layer.residual_keys, new_k], dim=2)
    res_v = torch.cat([layer.residual_values, new_v], dim=2)
    ref = dense_attention(q, torch.cat([full_k, new_k], 2), torch.cat([full_v, new_v], 2), 0.25, keep, sinks)
    out = packed_layer_attention(_Module(), q, res_k, res_v, mask, layer, scaling=0.25, s_aux=sinks)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_packed_attention_honours_headwise_pruned_keys(path):
    """kvpress's AdaKV marks pruned keys per head in module.masked_key_indices."""
    b, hkv, hq, dk, dv = 1, 2, 4, 16, 8
    layer, _, _ = make_layer(t=40, b=b, h=hkv, dk=dk, dv=dv, bits=8)
    q = rand(b, hq, 1, dk)
    new_k, new_v = rand(b, hkv, 1, dk), rand(b, hkv, 1, dv)
    full_k, full_v = layer.dequantized()
    n = full_k.shape[2] + 1
    module = _Module()
    seq = torch.tensor([0, 5, 9, 33, 38])  # packed and residual positions
    module.masked_key_indices = (torch.zeros(5, dtype=torch.long), torch.tensor([0, 0, 1, 1, 0]), seq)
    keep_kv = torch.ones(b, hkv, n, dtype=torch.bool)
    keep_kv[module.masked_key_indices] = False
    keep = keep_kv.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
    res_k = torch.cat([layer.residual_keys, new_k], dim=2)
    res_v = torch.cat([layer.residual_values, new_v], dim=2)
    ref = dense_attention(q, torch.cat([full_k, new_k], 2), torch.cat([full_v, new_v], 2), 0.25, keep)
    out = packed_layer_attention(module, q, res_k, res_v, None, layer, scaling=0.25)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
