"""QuantizationPress on tiny models: packing after the prefill, exact packed attention in the model,
composition after pruning, the attention switch, bad input, and the harness registry."""

from __future__ import annotations

import pytest
import torch
from conftest import dequantized_copy, get_tiny_model
from kvpress import ComposedPress, SnapKVPress
from transformers import DynamicCache, QuantizedCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from pikvpress import PackedKVLayer, QuantizationPress, cache_nbytes, disable_packed_attention
from pikvpress.models import get_adapter

FAMILIES = ("llama", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
SMALL = {"group_size": 4, "key_group_size": 8, "residual_length": 4}


def ids_(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def packed_prefill(model, press, ids, attention_mask=None):
    cache = DynamicCache(config=model.config)
    with press(model):
        out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache)
    return cache, out.logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_prefill_packs_full_attention_layers(family, bits):
    # (the prefill's own logits cannot tell: a press edits the cache after the layer's attention ran, so what it
    # changes shows in the bytes it holds and in the steps that decode from it)
    model = get_tiny_model(family)
    cache, _ = packed_prefill(model, QuantizationPress(bits=bits, **SMALL), ids_(40))
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids_(40), past_key_values=ref)
    for layer in get_adapter(model).layers:
        stored = cache.layers[layer.layer_idx]
        if layer.is_sliding:
            assert not isinstance(stored, PackedKVLayer)
            continue
        assert isinstance(stored, PackedKVLayer) and stored.bits == bits
        assert stored.packed_length == 32 and stored.residual_length_now == 8
        assert stored.keys.shape == (1, layer.num_kv_heads, 40, layer.key_dim)
        assert stored.values.shape == (1, layer.num_kv_heads, 40, layer.value_dim)
        # the 32 packed tokens are held as bits-wide codes, nothing at full precision beside them
        for codes, dim in ((stored.packed_keys.packed, layer.key_dim), (stored.packed_values.packed, layer.value_dim)):
            assert codes.dtype == torch.uint8 and codes.shape == (1, layer.num_kv_heads, 32, dim * bits // 8)
        assert stored.residual_keys.shape[2] == 8 and stored.residual_values.shape[2] == 8
    assert cache_nbytes(cache) < cache_nbytes(ref)
    # decoding reads the packed values: dense attention over the dequantized cache, not over the full-precision one
    dequantized = dequantized_copy(model, cache)
    steps = ids_(3, seed=5)
    with torch.no_grad():
        for i in range(3):
            step = steps[:, i : i + 1]
            got = model(input_ids=step, past_key_values=cache).logits
            want = model(input_ids=step, past_key_values=dequantized).logits
            full = model(input_ids=step, past_key_values=ref).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert float((got - full).abs().max()) > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_equals_dense_attention_over_the_dequantized_cache(family):
    """One decode step and a 3-token question through the model: packed attention == dense attention
    over the same dequantized KV (float32 tolerance), and the attention switch is undone afterwards."""
    model = get_tiny_model(family)
    base = model.config._attn_implementation
    for new in (torch.tensor([[7]]), torch.tensor([[9, 10, 11]])):
        cache, _ = packed_prefill(model, QuantizationPress(bits=4, **SMALL), ids_(45, seed=1))
        dense = dequantized_copy(model, cache)
        with torch.no_grad():
            got = model(input_ids=new, past_key_values=cache).logits
            assert model.config._attn_implementation == base
            want = model(input_ids=new, past_key_values=dense).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packing_continues_while_generating():
    model = get_tiny_model("llama")
    press = QuantizationPress(bits=4, **SMALL)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.generate(
            ids_(40, seed=2), max_new_tokens=20, min_new_tokens=20, do_sample=False, past_key_values=cache
        )
    assert out.shape[1] == 60
    layer = cache.layers[0]
    assert isinstance(layer, PackedKVLayer)
    assert layer.get_seq_length() == 59  # the last generated token is never fed back
    assert layer.packed_length == 48 and layer.residual_length_now == 11


def test_generate_outside_the_press_context_uses_packed_attention(monkeypatch):
    """kvpress's pipeline decodes after leaving the press context; packed attention must still run."""
    from pikvpress import attention

    calls = []
    real = attention.packed_layer_attention
    monkeypatch.setattr(attention, "packed_layer_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = get_tiny_model("qwen3_moe")
    cache, _logits = packed_prefill(model, QuantizationPress(bits=4, **SMALL), ids_(40))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), past_key_values=cache)
    assert len(calls) == model.config.num_hidden_layers


def test_without_the_attention_switch_layers_dequantize_and_agree():
    model = get_tiny_model("llama")
    cache, _ = packed_prefill(model, QuantizationPress(bits=4, **SMALL), ids_(40))
    cache2, _ = packed_prefill(model, QuantizationPress(bits=4, **SMALL), ids_(40))
    step = torch.tensor([[5]])
    with torch.no_grad():
        fast = model(input_ids=step, past_key_values=cache).logits
        disable_packed_attention(model)
        try:
            slow = model(input_ids=step, past_key_values=cache2).logits
        finally:
            QuantizationPress(bits=4, **SMALL).post_init_from_model(model)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_no_packed_layer_means_no_change():
    """With the hook installed, a plain cache runs the base attention bit for bit."""
    model = get_tiny_model("llama")
    QuantizationPress(bits=4, **SMALL).post_init_from_model(model)
    ids = ids_(30, seed=3)
    with torch.no_grad():
        a = model(input_ids=ids, past_key_values=DynamicCache()).logits
        disable_packed_attention(model)
        b = model(input_ids=ids, past_key_values=DynamicCache()).logits
    assert torch.equal(a, b)


def test_composes_after_a_pruning_press():
    model = get_tiny_model("qwen3_moe")
    press = ComposedPress([SnapKVPress(compression_ratio=0.5, window_size=4), QuantizationPress(bits=4, **SMALL)])
    cache, _ = packed_prefill(model, press, ids_(48))
    pruned, _ = packed_prefill(model, SnapKVPress(compression_ratio=0.5, window_size=4), ids_(48))
    assert press.compression_ratio == 0.5
    for packed, dense in zip(cache.layers, pruned.layers):
        assert isinstance(packed, PackedKVLayer)
        assert packed.get_seq_length() == dense.get_seq_length() == 24
        k, _ = packed.dequantized()
        p = packed.packed_length
        assert torch.equal(k[:, :, p:], dense.keys[:, :, p:])  # same tokens kept, then packed
    assert cache_nbytes(cache) < cache_nbytes(pruned)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"group_size": 3}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"key_group_size": 6}, "key_group_size"),
        ({"residual_length": -1}, "residual_length"),
        ({"stats_dtype": torch.float32}, "stats_dtype"),
        ({"layout": "per_channel"}, "layout"),
    ],
)
def test_bad_arguments_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantizationPress(**bad)


def test_group_size_not_dividing_the_head_dim_fails_before_any_forward():
    model = get_tiny_model("deepseek_v3")  # key dim 24, value dim 12
    press = QuantizationPress(bits=4, group_size=8, key_group_size=8)
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="group_size=8 does not divide the value head dim 12"), press(model):
        model(input_ids=ids_(20), past_key_values=cache)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("make_cache", ["static", "quantized"])
def test_unsupported_cache_types_are_rejected_without_conversion(make_cache):
    model = get_tiny_model("llama")
    if make_cache == "static":
        cache = StaticCache(config=model.config, max_cache_len=64)
        layer_type = StaticLayer
    else:
        pytest.importorskip("optimum.quanto")
        cache = QuantizedCache(backend="quanto", config=model.config)
        layer_type = type(cache.layers[0])
    with (
        pytest.raises(ValueError, match="past_key_values|cannot pack"),
        torch.no_grad(),
        QuantizationPress(bits=4, **SMALL)(model),
    ):
        model(input_ids=ids_(20), past_key_values=cache)
    assert all(isinstance(layer, layer_type) for layer in cache.layers)


def test_harness_registry_runs_quantization_once_per_sweep():
    from pikvpress_eval.config import EvalConfig
    from pikvpress_eval.presses import build_press, takes_ratio

    assert not takes_ratio("quantization") and takes_ratio("snapkv")
    press = build_press("quantization", 0.0, bits=8)
    assert isinstance(press, QuantizationPress) and press.bits == 8
    with pytest.raises(ValueError, match="removes no tokens"):
        build_press("quantization", 0.5)
    config = EvalConfig(
        dataset="needle",
        press_name=["no_press", "quantization", "snapkv", "snapkv_int4"],
        compression_ratio=[0.5, 0.75],
        composed_presses={"snapkv_int4": [{"press": "snapkv"}, {"press": "quantization", "bits": 4}]},
    ).validate()
    assert config.sweep() == [
        ("no_press", 0.0),
        ("quantization", 0.0),
        ("snapkv", 0.5),
        ("snapkv", 0.75),
        ("snapkv_int4", 0.5),
        ("snapkv_int4", 0.75),
    ]
    composed = config.build_press("snapkv_int4", 0.75)
    assert composed.presses[0].compression_ratio == 0.75 and composed.presses[1].bits == 4


def test_dynamic_layer_type_is_what_gets_replaced():
    model = get_tiny_model("llama")
    cache = DynamicCache(config=model.config)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    cache, _ = packed_prefill(model, QuantizationPress(bits=8, **SMALL), ids_(16))
    assert all(isinstance(layer, PackedKVLayer) for layer in cache.layers)
