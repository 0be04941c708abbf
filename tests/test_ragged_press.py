"""RaggedPress: kvpress's head-wise presses hold exactly their kept tokens, and answer as their masked versions do."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny_model
from kvpress import (
    AdaKVPress,
    CriticalAdaKVPress,
    KnormPress,
    KVzipPress,
    PerLayerCompressionPress,
    PyramidKVPress,
    SnapKVPress,
)
from kvpress.utils import compute_n_kept
from transformers import DynamicCache, pipeline

from pikvpress.cache import cache_nbytes
from pikvpress.cache.ragged_layer import RaggedKVLayer
from pikvpress.models import get_adapter, tiny_model, tiny_tokenizer
from pikvpress.presses import ExpertRoutingPress, PiKVPress
from pikvpress.presses.ragged_press import RaggedPress

CONTEXT = 48
QUESTION = 5
STEPS = 4
# families with full attention in every layer on sdpa (kvpress's AdaKV refuses eager attention)
FAMILIES = ["llama", "qwen3", "mixtral", "qwen2_moe", "deepseek_v2"]
HEADWISE = {
    "adakv_snapkv": lambda r: AdaKVPress(SnapKVPress(r, window_size=8)),
    "adakv_knorm": lambda r: AdaKVPress(KnormPress(r)),
    "critical_adakv_snapkv": lambda r: CriticalAdaKVPress(SnapKVPress(r, window_size=8)),
    "routing_heads": lambda r: ExpertRoutingPress(
        r, router="keys", num_experts=4, window_size=8, n_recent=4, head_budget="adaptive_masked"
    ),
}


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 259, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(model, press):
    """Prefill under ``press``, then a multi-token question and greedy steps; the question's logits, the tokens,
    the cache after the prefill's bytes and the cache."""
    cache = DynamicCache(config=model.config)
    with press(model):
        model(_ids(CONTEXT, 0), past_key_values=cache)
    held = cache_nbytes(cache)
    out = model(_ids(QUESTION, 1), past_key_values=cache, position_ids=torch.arange(CONTEXT, CONTEXT + QUESTION)[None])
    logits, tokens = out.logits[0], [int(out.logits[0, -1].argmax())]
    for step in range(STEPS):
        position = torch.tensor([[CONTEXT + QUESTION + step]])
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=position)
        tokens.append(int(out.logits[0, -1].argmax()))
    return logits, tokens, held, cache


# kvpress 0.5.5's CriticalKV reads config.head_dim, which the tiny MoE and MLA configs leave unset
CASES = [(n, f) for n in HEADWISE for f in FAMILIES if not (n.startswith("critical") and f not in ("llama", "qwen3"))]


@pytest.mark.parametrize(("name", "family"), CASES)
def test_ragged_answers_as_the_masked_press_and_holds_only_the_kept_tokens(name, family):
    model = get_tiny_model(family, attn_implementation="sdpa")
    masked_logits, masked_tokens, masked_held, masked_cache = _run(model, HEADWISE[name](0.5))
    kept = {}
    for layer in get_adapter(model).layers:
        indices = layer.attention.masked_key_indices
        if indices is not None:
            kept[layer.layer_idx] = CONTEXT * layer.num_kv_heads - indices[0].numel()
    assert kept, "the masked press marked no token"
    ragged_logits, ragged_tokens, ragged_held, cache = _run(model, RaggedPress(HEADWISE[name](0.5)))
    torch.testing.assert_close(ragged_logits, masked_logits, atol=1e-4, rtol=1e-4)
    assert ragged_tokens == masked_tokens
    for layer in get_adapter(model).layers:
        stored = cache.layers[layer.layer_idx]
        assert layer.attention.masked_key_indices is None  # nothing left on the module
        if layer.layer_idx not in kept:
            continue
        assert isinstance(stored, RaggedKVLayer)
        assert int(stored.head_lengths.sum()) == kept[layer.layer_idx]
        assert stored.get_seq_length() == masked_cache.layers[layer.layer_idx].get_seq_length()
    assert ragged_held < masked_held


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.875])
def test_bytes_held_are_the_kept_tokens_and_their_indices(ratio):
    model = get_tiny_model("llama", attn_implementation="sdpa")
    cache = DynamicCache(config=model.config)
    with RaggedPress(AdaKVPress(SnapKVPress(ratio, window_size=8)))(model):
        model(_ids(CONTEXT, 0), past_key_values=cache)
    kept_bytes = index_bytes = 0
    for layer, adapter in zip(cache.layers, get_adapter(model).layers, strict=True):
        assert isinstance(layer, RaggedKVLayer)
        # AdaKV removes (T - n_kept) tokens per head on average: the layer holds H * n_kept tokens in all
        assert int(layer.head_lengths.sum()) == adapter.num_kv_heads * compute_n_kept(CONTEXT, ratio)
        per_token = (adapter.key_dim + adapter.value_dim) * layer.body_keys.element_size()
        kept_bytes += int(layer.head_lengths.sum()) * per_token
        index_bytes += layer.offsets.numel() * 8 + layer.positions.numel() * 2
    assert cache_nbytes(cache) == kept_bytes + index_bytes
    # the offsets and int16 positions cost 2 bytes per kept token and 8 per head; against a bf16 token of the
    # default model's head dims (64 + 64 channels, 256 bytes) that is under 1%
    assert index_bytes / kept_bytes < 2.5 * 2 / ((adapter.key_dim + adapter.value_dim) * 4)


def test_a_press_that_masks_nothing_leaves_dense_layers():
    model = get_tiny_model("llama", attn_implementation="sdpa")
    cache = DynamicCache(config=model.config)
    with RaggedPress(SnapKVPress(0.5, window_size=8))(model):
        model(_ids(CONTEXT, 0), past_key_values=cache)
    assert not any(isinstance(layer, RaggedKVLayer) for layer in cache.layers)
    assert cache.layers[0].keys.shape[2] == CONTEXT // 2


def test_refuses_what_is_not_a_press():
    with pytest.raises(TypeError, match="BasePress"):
        RaggedPress("adakv")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kvpress_pipeline_answers_as_with_the_masked_press(family, tokenizer):
    """kvpress's pipeline crops the answer off between questions (``layer.keys = layer.keys[:, :, :n]``): the
    ragged cache answers every question as the masked one does, and holds only the kept tokens throughout."""
    model = get_tiny_model(family, attn_implementation="sdpa")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    context = "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat. " * 3
    questions = ["Who jumps?", "Where does the cat sleep?", "What is lazy?"]

    def answers(press):
        cache = DynamicCache(config=model.config)
        out = pipe(context, questions=questions, press=press, max_new_tokens=6, cache=cache)
        return out["answers"], cache

    masked, _ = answers(AdaKVPress(SnapKVPress(0.6, window_size=8)))
    ragged, cache = answers(RaggedPress(AdaKVPress(SnapKVPress(0.6, window_size=8))))
    assert ragged == masked
    layers = [layer for layer in cache.layers if isinstance(layer, RaggedKVLayer)]
    assert len(layers) == len(cache.layers)
    assert all(layer.tail_length == 0 for layer in layers)  # every answer cropped off again


@pytest.fixture(scope="module")
def kvzip_llama(tmp_path_factory):
    """A tiny llama whose ``name_or_path`` holds its tokenizer: KVzip loads it from there, as from a checkpoint."""
    path = tmp_path_factory.mktemp("kvzip_llama")
    tiny_tokenizer().save_pretrained(path)
    model = tiny_model("llama", attn_implementation="sdpa")
    model.config.name_or_path = str(path)
    return model


@pytest.mark.parametrize("layerwise", [False, True], ids=["headwise", "layerwise"])
def test_kvzip_held_ragged_answers_as_masked_kvzip(kvzip_llama, layerwise):
    """KVzip marks its tokens when its own context ends (after its reconstruction pass): the layers become ragged
    then, hold KVzip's kept tokens, and answer as kvpress's masked KVzip."""
    pipe = pipeline("kv-press-text-generation", model=kvzip_llama, tokenizer=tiny_tokenizer(), device="cpu")
    context = "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat. " * 3
    questions = ["Who jumps?", "Where does the cat sleep?"]
    masked_cache, ragged_cache = DynamicCache(), DynamicCache()
    masked = pipe(context, questions=questions, press=KVzipPress(0.5, layerwise=layerwise), cache=masked_cache)
    n_masked = [layer.self_attn.masked_key_indices[0].numel() for layer in kvzip_llama.model.layers]
    press = RaggedPress(KVzipPress(0.5, layerwise=layerwise))
    assert not press.replays_with_hooks
    ragged = pipe(context, questions=questions, press=press, cache=ragged_cache)
    assert all(layer.self_attn.masked_key_indices is None for layer in kvzip_llama.model.layers)
    assert ragged["answers"] == masked["answers"]
    for layer, dense, masked_here in zip(ragged_cache.layers, masked_cache.layers, n_masked, strict=True):
        assert isinstance(layer, RaggedKVLayer)
        heads, length = dense.keys.shape[1], dense.keys.shape[2]
        assert int(layer.head_lengths.sum()) == heads * length - masked_here


def test_the_registrys_ragged_presses_wrap_their_masked_baselines(kvzip_llama):
    from pikvpress_eval.prefill import can_reuse_prefill
    from pikvpress_eval.presses import MASKS_ONLY, RAGGED, build_press, takes_ratio

    baselines = [name for name in RAGGED if name != "ragged_routing_heads"]
    assert baselines and all(name.removeprefix("ragged_") in MASKS_ONLY for name in baselines)
    routing = build_press("ragged_routing_heads", 0.25, router="keys")  # fields go to the wrapped press
    assert isinstance(routing.press, ExpertRoutingPress) and routing.press.head_budget == "adaptive_masked"
    assert routing.press.router == "keys" and routing.compression_ratio == 0.25
    for name in baselines:
        press = build_press(name, 0.25)
        masked = build_press(name.removeprefix("ragged_"), 0.25)
        assert isinstance(press, RaggedPress) and type(press.press) is type(masked) and takes_ratio(name)
        assert press.compression_ratio == masked.compression_ratio == 0.25
        assert can_reuse_prefill(press, kvzip_llama) == can_reuse_prefill(masked, kvzip_llama), name


def test_routing_heads_held_ragged_keep_each_heads_own_share():
    """ExpertRoutingPress's adaptive head budgets: filled (every head as long as the largest share), masked (each
    head its share, the cache full) and ragged (each head its share, nothing else held)."""
    model = get_tiny_model("llama", attn_implementation="sdpa")

    def make(head_budget):
        return ExpertRoutingPress(0.5, router="keys", num_experts=4, window_size=8, n_recent=4, head_budget=head_budget)

    caches = {}
    for name, press in [
        ("filled", make("adaptive")),
        ("masked", make("adaptive_masked")),
        ("ragged", RaggedPress(make("adaptive_masked"))),
    ]:
        caches[name] = DynamicCache(config=model.config)
        with press(model):
            model(_ids(CONTEXT, 0), past_key_values=caches[name])
    uneven = 0
    for filled, ragged in zip(caches["filled"].layers, caches["ragged"].layers, strict=True):
        shares = ragged.head_lengths
        assert int(shares.sum()) == shares.numel() * compute_n_kept(CONTEXT, 0.5)  # the layer's budget, spread
        assert filled.keys.shape[2] == int(shares.max())  # filled: every head as long as the largest share
        uneven += int(shares.max()) > int(shares.min())
    assert uneven  # the heads' shares differ somewhere
    assert cache_nbytes(caches["ragged"]) < cache_nbytes(caches["filled"]) < cache_nbytes(caches["masked"])
    with pytest.raises(ValueError, match="adaptive_masked"):
        PiKVPress(routing=make("adaptive_masked"))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_the_scheduler_evicts_per_head_from_ragged_layers(family):
    """AdaKV's head-wise choice held ragged at the prefill, then AdaptiveSchedulingPress while decoding: every head
    keeps at most ``budget + interval`` of the tokens it holds, the layers stay ragged, and the steps' statistics
    count only held tokens."""
    from kvpress import PrefillDecodingPress

    from pikvpress import AdaptiveSchedulingPress

    model = get_tiny_model(family, attn_implementation="sdpa")
    budget, interval = 12, 2
    press = PrefillDecodingPress(
        prefilling_press=RaggedPress(AdaKVPress(SnapKVPress(0.5, window_size=8))),
        decoding_press=AdaptiveSchedulingPress(budget=budget, interval=interval, sink_tokens=2, recent_window=2),
    )
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.generate(_ids(CONTEXT, 0), max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert out.shape[1] > CONTEXT
    full = [layer for layer in get_adapter(model).layers if not layer.is_sliding]
    for adapter in full:
        layer = cache.layers[adapter.layer_idx]
        assert isinstance(layer, RaggedKVLayer)
        lengths = layer.head_lengths + layer.tail_length
        assert int(lengths.max()) <= budget + interval
    assert all(adapter.attention.masked_key_indices is None for adapter in full)


def test_ragged_press_packs_the_kept_tokens():
    """RaggedPress(..., compression=QuantizationPress(layout="per_token")): the kept tokens packed per token; the
    answer follows the unpacked ragged cache closely at int8; the KIVI layout is refused."""
    from pikvpress import QuantizationPress

    model = get_tiny_model("llama", attn_implementation="sdpa")

    def ragged(compression=None):
        return RaggedPress(AdaKVPress(SnapKVPress(0.5, window_size=8)), compression=compression)

    plain_logits, _, plain_held, _ = _run(model, ragged())
    int8 = QuantizationPress(bits=8, layout="per_token")
    packed_logits, _, packed_held, cache = _run(model, ragged(int8))
    assert all(layer.packing is not None and layer.packing["bits"] == 8 for layer in cache.layers)
    assert packed_held < 0.6 * plain_held  # 1 byte a channel plus stats, against 4 (float32)
    torch.testing.assert_close(packed_logits, plain_logits, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="per_token"):
        ragged(QuantizationPress(bits=4))
    with pytest.raises(TypeError, match="QuantizationPress"):
        ragged("int4")


@pytest.mark.parametrize(
    "make",
    [
        lambda: PyramidKVPress(0.5, window_size=8),
        lambda: PerLayerCompressionPress(KnormPress(), compression_ratios=[0.2, 0.5, 0.7, 0.4]),
        lambda: ExpertRoutingPress(0.5, router="keys", num_experts=4, window_size=8, n_recent=4),
    ],
    ids=["pyramidkv", "per_layer_compression", "routing"],
)
def test_per_layer_budgets_hold_each_layers_tokens_and_no_more(make):
    """Per-layer budgets (PyramidKV's schedule, PerLayerCompressionPress, routing's layer budgets) need no ragged
    layer: each layer is a dense cache of its own length, and the bytes are exactly its kept tokens'."""
    model = get_tiny_model("llama", attn_implementation="sdpa")
    cache = DynamicCache(config=model.config)
    with make()(model):
        model(_ids(CONTEXT, 0), past_key_values=cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    expected = sum(
        n * adapter.num_kv_heads * (adapter.key_dim + adapter.value_dim) * 4
        for n, adapter in zip(lengths, get_adapter(model).layers, strict=True)
    )
    assert cache_nbytes(cache) == expected
    assert sum(lengths) < len(lengths) * CONTEXT * 0.9
