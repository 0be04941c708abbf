"""One test per kvpress defect the compatibility layer fixes, each with its twin showing the defect
reproduces on plain kvpress 0.5.5 (the ``unpatched`` fixture), so none of these tests can pass vacuously."""

from __future__ import annotations

import pytest
import torch
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    PerLayerCompressionPress,
    PyramidKVPress,
    SnapKVPress,
    TOVAPress,
)
from transformers import DynamicCache

from conftest import get_tiny_model
from pikvpress.compat import KVPRESS_FIXES, kvpress_fixes, kvpress_fixes_applied
from pikvpress.models import get_adapter, tiny_model

L = 48


def ids(length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def capture_layers(model, input_ids):
    """Per full-attention layer: (module, hidden_states, keys, values, eager attention weights, kwargs)."""
    captured = {}

    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        captured[module.layer_idx] = (module, kwargs["hidden_states"], layer.keys, layer.values, output[1], kwargs)

    lm = model.model
    hooks = []
    for layer in get_adapter(model).layers:
        layer.attention.rotary_emb = lm.rotary_emb
        if layer.family.mla:
            layer.attention.head_dim = layer.key_dim
        if not layer.is_sliding:
            hooks.append(layer.attention.register_forward_hook(hook, with_kwargs=True))
    model(input_ids, past_key_values=DynamicCache())
    for h in hooks:
        h.remove()
    return captured


def kept_sets_match_eager_formula(family: str, press) -> bool:
    """The press's kept set from its own window attention equals the one from the model's eager attention weights."""
    model = get_tiny_model(family, "eager")
    n_kept = L // 2
    for module, hidden, keys, values, attentions, kwargs in capture_layers(model, ids()).values():
        reference = press.score(module, hidden, keys, values, attentions, kwargs)
        computed = press.score(module, hidden, keys, values, None, kwargs)
        ref_set = reference.topk(n_kept, dim=-1).indices.sort(-1).values
        got_set = computed.topk(n_kept, dim=-1).indices.sort(-1).values
        if not torch.equal(ref_set, got_set):
            return False
    return True


QUERY_PRESSES = [lambda: SnapKVPress(0.5, window_size=8), lambda: TOVAPress(0.5)]


# --- qk-norm: Qwen3-MoE and OLMoE queries go through q_norm ---------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("make_press", QUERY_PRESSES, ids=["snapkv", "tova"])
def test_query_presses_apply_q_norm(family, make_press):
    assert kept_sets_match_eager_formula(family, make_press())


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_without_fix_query_presses_skip_q_norm(family, unpatched):
    assert not kept_sets_match_eager_formula(family, SnapKVPress(0.5, window_size=8))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_prerope_projections_match_model_queries_and_keys(family):
    """kvpress's get_prerope_* (as patched) give exactly what the model caches, once rotated."""
    from kvpress.presses import snapkv_press  # the name kvpress presses call
    from kvpress import utils

    model = get_tiny_model(family)
    for module, hidden, keys, _, _, kwargs in capture_layers(model, ids()).values():
        layer = get_adapter(model).layers[module.layer_idx]
        k = utils.get_prerope_key_states(module, hidden)
        torch.testing.assert_close(layer.apply_rope(k, kwargs["position_embeddings"]), keys)
        q = snapkv_press.get_prerope_query_states(module, hidden)
        assert q.shape == (1, layer.num_heads, L, layer.key_dim)


# --- model-rope: GPT-OSS (half-dim cos/sin + sinks) and DeepSeek (partial / complex RoPE) ---------


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("make_press", QUERY_PRESSES, ids=["snapkv", "tova"])
def test_window_attention_uses_model_rope_scale_and_sinks(family, make_press):
    assert kept_sets_match_eager_formula(family, make_press())


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2"])
def test_without_fix_window_attention_crashes(family, unpatched):
    with pytest.raises((RuntimeError, NotImplementedError, ValueError, AttributeError)):
        kept_sets_match_eager_formula(family, SnapKVPress(0.5, window_size=8))


def averaged_rope_reference(model, module, mu, q_len, n_future):
    """mean_p rope_p(mu), with the modeling file's own rotary function applied position by position."""
    import sys

    modeling = sys.modules[type(module).__module__]
    positions = torch.arange(q_len, q_len + n_future)[None]
    cos, sin = model.model.rotary_emb(mu, positions)
    x = mu[:, :, None, :].expand(-1, -1, n_future, -1)
    rotated = modeling.apply_rotary_pos_emb(x, x, cos, sin)[0]
    return rotated.mean(dim=2)


@pytest.mark.parametrize("family", ["gpt_oss", "llama"])
def test_expected_attention_rotation_is_the_models(family):
    model = get_tiny_model(family)
    press = ExpectedAttentionPress(0.5, n_future_positions=16)
    module = model.model.layers[1].self_attn
    module.rotary_emb = model.model.rotary_emb
    mu = torch.randn(1, model.config.num_attention_heads, module.head_dim)
    got, _ = press.apply_avg_rope(module, mu, None, q_len=L)
    torch.testing.assert_close(got, averaged_rope_reference(model, module, mu, L, 16))


def test_expected_attention_unchanged_on_llama():
    """On Llama the fix computes kvpress's own rotation (same numbers, up to float rounding)."""
    model = get_tiny_model("llama")
    module = model.model.layers[1].self_attn
    module.rotary_emb = model.model.rotary_emb
    press = ExpectedAttentionPress(0.5, n_future_positions=32)
    mu, cov = torch.randn(1, 4, 16), torch.randn(1, 4, 16, 16)
    fixed = press.apply_avg_rope(module, mu, cov, q_len=L)
    with kvpress_fixes(False):
        original = press.apply_avg_rope(module, mu, cov, q_len=L)
    for a, b in zip(fixed, original):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_fix_expected_attention_crashes_on_gpt_oss(unpatched):
    model = get_tiny_model("gpt_oss")
    module = model.model.layers[1].self_attn
    module.rotary_emb = model.model.rotary_emb
    with pytest.raises(RuntimeError):
        ExpectedAttentionPress(0.5).apply_avg_rope(module, torch.randn(1, 4, 16), None, q_len=L)


# --- sliding-window layers are left alone ---------------------------------------------------------


def sliding_layers_in_step(press) -> bool:
    model = get_tiny_model("gpt_oss")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids(), past_key_values=cache)
    for layer in get_adapter(model).layers:
        stored = cache.layers[layer.layer_idx]
        if layer.is_sliding:
            kv_length, _ = stored.get_mask_sizes(torch.arange(1))
            if stored.keys.shape[2] + 1 != kv_length:
                return False
    return True


def test_sliding_window_layers_keep_their_length():
    assert sliding_layers_in_step(KnormPress(0.5))
    model = get_tiny_model("gpt_oss")
    with torch.no_grad(), KnormPress(0.5)(model):
        out = model.generate(ids(), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > L


def test_without_fix_knorm_desynchronises_sliding_layers(unpatched):
    assert not sliding_layers_in_step(KnormPress(0.5))


# --- MLA: different key and value head dims -------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_pruning_keeps_matching_keys_and_values(family):
    model = tiny_model(family)  # fresh: no head_dim attached by earlier tests
    full = DynamicCache()
    with torch.no_grad():
        model(ids(), past_key_values=full)
    cache = DynamicCache()
    with torch.no_grad(), KnormPress(0.5)(model):
        model(ids(), past_key_values=cache)
    for layer in get_adapter(model).layers:
        keys, values = full.layers[layer.layer_idx].keys, full.layers[layer.layer_idx].values
        kept = (-keys.norm(dim=-1)).topk(L // 2, dim=-1).indices
        got_k, got_v = cache.layers[layer.layer_idx].keys, cache.layers[layer.layer_idx].values
        assert got_k.shape[-1] == layer.key_dim and got_v.shape[-1] == layer.value_dim != layer.key_dim
        torch.testing.assert_close(got_k, keys.gather(2, kept[..., None].expand(-1, -1, -1, layer.key_dim)))
        torch.testing.assert_close(got_v, values.gather(2, kept[..., None].expand(-1, -1, -1, layer.value_dim)))


def test_without_fix_every_press_fails_on_deepseek_v3(unpatched):
    model = tiny_model("deepseek_v3")
    with pytest.raises(AttributeError, match="head_dim"):
        with torch.no_grad(), KnormPress(0.5)(model):
            model(ids(), past_key_values=DynamicCache())


# --- layers of different lengths with SDPA --------------------------------------------------------

UNEVEN_PRESSES = [
    lambda: PyramidKVPress(0.5, window_size=4),
    lambda: PerLayerCompressionPress(KnormPress(), compression_ratios=[0.2, 0.5, 0.7, 0.4]),
]


@torch.no_grad()
def question_logits(press, one_at_a_time: bool) -> torch.Tensor:
    model = get_tiny_model("llama")  # SDPA
    cache = DynamicCache()
    with press(model):
        model(ids(), past_key_values=cache)
    assert len({layer.keys.shape[2] for layer in cache.layers}) > 1  # layers really differ in length
    question = ids(6, seed=9)
    positions = torch.arange(L, L + 6)[None]
    if not one_at_a_time:
        return model(question, past_key_values=cache, position_ids=positions).logits[:, -1]
    for t in range(6):  # one token at a time: SDPA needs no mask, so this is the mask-free reference
        logits = model(question[:, t : t + 1], past_key_values=cache, position_ids=positions[:, t : t + 1]).logits
    return logits[:, -1]


@pytest.mark.parametrize("make_press", UNEVEN_PRESSES, ids=["pyramidkv", "per_layer_compression"])
def test_uneven_layer_lengths_with_sdpa_are_exact(make_press):
    torch.testing.assert_close(question_logits(make_press(), False), question_logits(make_press(), True))


@pytest.mark.parametrize("make_press", UNEVEN_PRESSES, ids=["pyramidkv", "per_layer_compression"])
def test_without_fix_uneven_layer_lengths_fail_with_sdpa(make_press, unpatched):
    with pytest.raises(RuntimeError):
        question_logits(make_press(), False)


# --- AdaKV: pruned keys masked exactly -------------------------------------------------------------


@torch.no_grad()
def adakv_question_logits(question_len: int) -> torch.Tensor:
    model = get_tiny_model("llama")
    cache = DynamicCache()
    with AdaKVPress(ExpectedAttentionPress(0.5, n_sink=2))(model):
        model(ids(), past_key_values=cache)
    question = ids(question_len, seed=5)
    positions = torch.arange(L, L + question_len)[None]
    return model(question, past_key_values=cache, position_ids=positions).logits[:, -1]


def test_adakv_mask_equals_kvpress_fake_keys_where_those_exist():
    # one query per group always admits a fake key: both ways must agree
    fixed = adakv_question_logits(1)
    with kvpress_fixes(False):
        original = adakv_question_logits(1)
    torch.testing.assert_close(fixed, original, rtol=1e-4, atol=1e-4)


def test_adakv_multi_token_question():
    assert torch.isfinite(adakv_question_logits(24)).all()


def test_without_fix_adakv_multi_token_question_fails(unpatched):
    with pytest.raises(ValueError, match="fake keys"):
        adakv_question_logits(24)


# --- the layer itself -------------------------------------------------------------------------------


def test_fixes_are_applied_on_import_and_reversible():
    assert kvpress_fixes_applied()
    with kvpress_fixes(False):
        assert not kvpress_fixes_applied()
        assert SnapKVPress.compute_window_attention.__module__ == "kvpress.presses.snapkv_press"
    assert kvpress_fixes_applied()
    assert {fix.name for fix in KVPRESS_FIXES} == {
        "qk-norm", "model-rope", "sliding-window", "mla-head-dims", "uneven-layer-lengths", "adakv-fake-keys"
    }
