"""Adapters reproduce each family's own queries, keys, RoPE and MoE routing exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import get_tiny_model
from pikvpress.models import (
    MOE_FAMILIES,
    SUPPORTED_FAMILIES,
    TINY_FAMILIES,
    UnsupportedModelError,
    get_adapter,
    tiny_model,
)

L = 24
_captured: dict = {}


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    _captured[module.layer_idx] = query.detach().clone()
    if getattr(module, "sinks", None) is not None:  # GPT-OSS has eager only
        import sys

        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("pikvpress_capture", _capturing_attention)


@torch.no_grad()
def run_and_capture(family: str):
    model = tiny_model(family)
    model.config._attn_implementation = "pikvpress_capture"
    inputs, mlp_inputs, expert_calls = {}, {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: inputs.__setitem__(m.layer_idx, (kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True,
        ))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlp_inputs.__setitem__(i, a[0])))
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.experts.register_forward_pre_hook(
                lambda m, a, i=i: expert_calls.__setitem__(i, a), with_kwargs=False
            ))
    cache = DynamicCache(config=model.config)
    model(torch.randint(3, 259, (2, L), generator=torch.Generator().manual_seed(0)), past_key_values=cache)
    for h in hooks:
        h.remove()
    return model, cache, inputs, mlp_inputs, expert_calls


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_queries_and_keys_are_the_models(family):
    model, cache, inputs, _, _ = run_and_capture(family)
    for layer in get_adapter(model).layers:
        hidden, pe = inputs[layer.layer_idx]
        keys = layer.keys(hidden, pe)
        stored = cache.layers[layer.layer_idx].keys
        assert keys.shape == (2, layer.num_kv_heads, L, layer.key_dim)
        torch.testing.assert_close(keys[:, :, -stored.shape[2]:], stored, rtol=0, atol=0)
        torch.testing.assert_close(layer.queries(hidden, pe), _captured[layer.layer_idx], rtol=0, atol=0)
        assert cache.layers[layer.layer_idx].values.shape[-1] == layer.value_dim


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rope_matrices_rotate_like_the_model(family):
    model = get_tiny_model(family)
    layer = get_adapter(model).layers[-1]
    positions = torch.tensor([0, 5, 17, 300])
    matrices = layer.rope_matrices(positions)
    x = torch.randn(1, 2, len(positions), layer.key_dim)
    expected = layer.apply_rope(x, layer.position_embeddings(positions[None], x))
    got = torch.einsum("pij,bhpj->bhpi", matrices, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_matches_the_experts_the_model_uses(family):
    model, _, _, mlp_inputs, expert_calls = run_and_capture(family)
    adapter = get_adapter(model)
    assert adapter.is_moe
    routed_layers = 0
    for layer in adapter.layers:
        router = layer.router
        if router is None:
            assert layer.layer_idx not in expert_calls  # a dense layer of a MoE model (DeepSeek's first)
            continue
        routed_layers += 1
        result = router(mlp_inputs[layer.layer_idx])
        used_indices = expert_calls[layer.layer_idx][1]
        assert result.probs.shape == (2, L, router.num_experts)
        torch.testing.assert_close(result.probs.sum(-1), torch.ones(2, L))
        assert result.topk_indices.shape == (2, L, router.top_k)
        assert torch.equal(result.topk_indices.reshape(used_indices.shape).sort(-1).values,
                           used_indices.sort(-1).values)
    assert routed_layers >= 1


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_dense_models_have_no_router(family):
    adapter = get_adapter(get_tiny_model(family))
    assert not adapter.is_moe and all(layer.router is None for layer in adapter.layers)


def test_layer_kinds():
    gpt_oss = get_adapter(get_tiny_model("gpt_oss"))
    assert [layer.sliding_window for layer in gpt_oss.layers] == [8, None, 8, None]
    assert all(layer.sinks is not None and layer.sinks.shape == (4,) for layer in gpt_oss.layers)
    deepseek = get_adapter(get_tiny_model("deepseek_v3"))
    layer = deepseek.layers[0]
    assert (layer.key_dim, layer.value_dim, layer.num_kv_heads) == (24, 12, 4)
    assert layer.sinks is None and layer.sliding_window is None
    qwen2_moe = get_adapter(get_tiny_model("qwen2_moe"))
    assert hasattr(qwen2_moe.layers[0].router.mlp, "shared_expert")


def test_unsupported_model_names_class_and_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(model)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_tiny_models_are_deterministic():
    a, b = tiny_model("qwen3_moe", seed=3), tiny_model("qwen3_moe", seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_model("gpt2")
