"""Defects of the compat layer that kvpress 0.5.5's own test suite found (scripts/kvpress_suite.sh).

(a) A decode-time press whose buffer is shorter than its base press's ``n_sink`` (kvpress's
    ``DecodingPress(ExpectedAttentionPress(), compression_interval=3)``, n_sink = 4) projects queries of
    0 tokens; the family helpers inferred the head count with ``view(..., -1, head_dim)``, which cannot
    be inferred from 0 elements, and raised.
(b) A layer that keeps 0 tokens (``PerLayerCompressionPress`` with a ratio of 1.0) made ``gather_kept``
    view its 0 kept rows as ``(b, h, 0, -1)``, which raised the same way.
"""

import pytest
import torch
from conftest import get_tiny_model
from kvpress import DecodingPress, ExpectedAttentionPress, KnormPress, PerLayerCompressionPress
from transformers import DynamicCache

from pikvpress.cache.ops import gather_kept
from pikvpress.models import get_adapter
from pikvpress.models.tiny import TINY_FAMILIES

# --- (a) queries and keys of 0 tokens ----------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zero_token_queries_and_keys_keep_their_heads(family):
    model = get_tiny_model(family)
    for layer in get_adapter(model).layers:
        hidden = torch.randn(2, 0, model.config.hidden_size)
        queries, keys = layer.queries(hidden), layer.keys(hidden)
        assert queries.shape == (2, layer.num_heads, 0, layer.key_dim)
        assert keys.shape == (2, layer.num_kv_heads, 0, layer.key_dim)
        # and one token still splits into the same heads as the model's own projection
        one = torch.randn(2, 1, model.config.hidden_size)
        assert layer.queries(one).shape == (2, layer.num_heads, 1, layer.key_dim)
        assert layer.keys(one).shape == (2, layer.num_kv_heads, 1, layer.key_dim)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "olmoe", "deepseek_v3"])
def test_decoding_press_with_buffer_shorter_than_n_sink(family):
    """kvpress's test_all_presses_work_with_decoding_press[ExpectedAttentionPress-*], on a tiny model:
    every compression step scores a 3-token buffer, so ExpectedAttention (n_sink = 4) has 0 queries."""
    model = get_tiny_model(family)
    target_size, interval = 24, 3
    press = DecodingPress(base_press=ExpectedAttentionPress(), compression_interval=interval, target_size=target_size)
    assert interval < press.base_press.n_sink
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=7, do_sample=False)
    assert out.shape[1] == 47
    for layer in cache.layers:
        assert target_size <= layer.keys.shape[2] <= target_size + interval - 1


# --- (b) a layer that keeps 0 tokens ------------------------------------------------------------------


@pytest.mark.parametrize("n_kept", [0, 3])
@pytest.mark.parametrize("tokens", [0, 5])
def test_gather_kept_keeps_each_head_dim(n_kept, tokens):
    """MLA-like: keys and values with different head dims, 0 tokens kept or 0 tokens at all."""
    n_kept = min(n_kept, tokens)
    keys, values = torch.randn(2, 3, tokens, 24), torch.randn(2, 3, tokens, 12)
    scores = torch.randn(2, 3, tokens)
    indices = scores.topk(n_kept, dim=-1).indices
    kept_keys, kept_values = gather_kept(keys, values, indices)
    assert kept_keys.shape == (2, 3, n_kept, 24)
    assert kept_values.shape == (2, 3, n_kept, 12)
    assert torch.equal(kept_keys, keys.gather(2, indices[..., None].expand(-1, -1, -1, 24)))
    assert torch.equal(kept_values, values.gather(2, indices[..., None].expand(-1, -1, -1, 12)))


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_per_layer_ratio_of_one_empties_that_layer(family):
    """kvpress's test_per_layer_compression_press (ratios [0.1, 1]), then decoding on the emptied layer."""
    model = get_tiny_model(family)
    ratios = [0.25, 1.0, 0.5, 0.0][: model.config.num_hidden_layers]
    press = PerLayerCompressionPress(press=KnormPress(), compression_ratios=ratios)
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        logits = model(ids, past_key_values=cache).logits
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [24, 0, 16, 32]
    for layer in cache.layers:  # each keeps its own head dims (MLA: keys 24, values 12)
        assert layer.keys.shape[-1] == get_adapter(model).layers[0].key_dim
        assert layer.values.shape[-1] == get_adapter(model).layers[0].value_dim
    # decode 3 tokens greedily on top (the layers now have different lengths, the emptied one included)
    token = logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for step in range(3):
            positions = torch.full((2, 1), ids.shape[1] + step)
            logits = model(token, past_key_values=cache, position_ids=positions).logits
            assert torch.isfinite(logits).all()
            token = logits[:, -1:].argmax(-1)
    assert [layer.keys.shape[2] for layer in cache.layers] == [27, 3, 19, 35]
