"""AdaptiveSchedulingPress: the cache stays under budget + interval while decoding, statistics stay aligned
with it, evictions free the tensors, it composes with a prefill press, and bad arguments are rejected."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import get_tiny_model
from kvpress import PrefillDecodingPress
from transformers import DynamicCache, pipeline

from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress
from pikvpress.compat.patches import window_probs
from pikvpress.models import get_adapter
from pikvpress.scheduling import POLICIES, kept_indices

T = 40


def ids(batch: int = 1, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, press, input_ids: torch.Tensor, steps: int, watch=None):
    """Prefill then greedy-decode ``steps`` tokens by hand under ``press``; ``watch(cache)`` after each step.

    Positions are passed explicitly, as ``generate`` and kvpress's pipeline do: a pruned cache's length is
    not the sequence position."""
    cache = DynamicCache(config=model.config)
    t = input_ids.shape[1]
    with press(model):
        logits = model(input_ids=input_ids, past_key_values=cache).logits
        for step in range(steps):
            token = logits[:, -1:].argmax(-1)
            position = torch.tensor([t + step])
            logits = model(
                input_ids=token,
                past_key_values=cache,
                cache_position=position,
                position_ids=position.expand(token.shape[0], 1),
            ).logits
            if watch is not None:
                watch(cache)
    return cache


def full_layers(model) -> list[int]:
    return [layer.layer_idx for layer in get_adapter(model).layers if not layer.is_sliding]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_cache_never_exceeds_budget_plus_interval_and_statistics_stay_aligned(family, policy):
    model = get_tiny_model(family)
    press = AdaptiveSchedulingPress(budget=24, policy=policy, interval=5, sink_tokens=2, recent_window=4)
    lengths = []

    def watch(cache):
        for idx in full_layers(model):
            n = cache.layers[idx].keys.shape[2]
            lengths.append(n)
            assert n < 24 + 5
            assert press.stats[idx].length == n == cache.layers[idx].values.shape[2]

    decode(model, press, ids(batch=2), steps=30, watch=watch)
    assert min(lengths) <= 24 and max(lengths) > 24  # it did evict, down to the budget
    for idx in full_layers(model):
        positions = press.stats[idx].position
        assert bool((positions[..., :2].sort(-1).values == torch.tensor([0, 1])).all())  # sinks kept


def test_budget_as_a_ratio_of_tokens_seen():
    model = get_tiny_model("llama")
    press = AdaptiveSchedulingPress(compression_ratio=0.5, interval=1, sink_tokens=2, recent_window=4)
    cache = decode(model, press, ids(), steps=10)
    seen = T + 10
    for idx in full_layers(model):
        assert cache.layers[idx].keys.shape[2] == press.layer_budget(seen) == seen // 2


def test_heavy_hitters_are_the_tokens_with_the_most_attention(monkeypatch):
    import pikvpress.presses.adaptive_scheduling_press as module

    calls = []

    def recording(stats, budget, policy, sink_tokens, recent_window):
        kept = kept_indices(stats, budget, policy, sink_tokens, recent_window)
        calls.append((stats.mass.clone(), stats.position.clone(), kept))
        return kept

    monkeypatch.setattr(module, "kept_indices", recording)
    model = get_tiny_model("llama")
    press = AdaptiveSchedulingPress(budget=20, policy="h2o", interval=6, sink_tokens=0, recent_window=0)
    cache = decode(model, press, ids(batch=2), steps=12)
    assert calls  # evictions ran
    for mass, position, kept in calls:
        # the kept tokens are the 20 with the most accumulated attention, per row and head
        assert torch.equal(kept, mass.topk(20, dim=-1).indices.sort(-1).values)
        # one unit of attention per observed step (rows: tokens seen while the statistics lasted)
        assert bool((mass.sum(-1) <= 12 + 1e-4).all())
    stats = press.stats[0]
    assert stats.length == cache.layers[0].keys.shape[2]


def test_composes_with_a_prefill_press_and_generate():
    model = get_tiny_model("qwen3_moe")
    press = PrefillDecodingPress(
        prefilling_press=ExpertRoutingPress(0.5, router="keys", num_experts=2, window_size=8),
        decoding_press=AdaptiveSchedulingPress(budget=24, interval=4, recent_window=4),
    )
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.generate(ids(), past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == T + 20
    for idx in full_layers(model):
        assert cache.layers[idx].keys.shape[2] < 24 + 4


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_kvpress_pipeline_with_one_question_stays_under_budget(family, tokenizer):
    model = get_tiny_model(family)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 4
    scheduling = AdaptiveSchedulingPress(compression_ratio=0.5, interval=4, sink_tokens=2, recent_window=4)
    press = PrefillDecodingPress(prefilling_press=None, decoding_press=scheduling)
    seen = []

    def watch(module, args, kwargs, output):  # runs after the press's hook on layer 0
        stats = scheduling.stats.get(0)
        seen.append((kwargs["past_key_values"].layers[0].keys.shape[2], stats.seen if stats else None))

    hook = model.model.layers[0].self_attn.register_forward_hook(watch, with_kwargs=True)
    try:
        pipe(context, question="Who jumps?", press=press, max_new_tokens=24, cache=DynamicCache())
    finally:
        hook.remove()
    context_len = len(pipe.preprocess(context, [""], "", 10**6)["context_ids"][0])
    decoded = [(n, s) for n, s in seen if s is not None]
    assert decoded and decoded[0][1] > context_len  # tokens seen counts the context and the question
    steps = [b - a for (_, a), (_, b) in pairwise(decoded)]
    assert steps and set(steps) == {1}  # one more per generated token, evictions or not
    for n, tokens_seen in decoded:  # the ratio budget follows the tokens seen, not the pruned cache's length
        assert n < scheduling.layer_budget(tokens_seen) + 4
    assert min(n for n, _ in decoded) < decoded[-1][1] * 0.75  # it evicted


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe"])
def test_one_query_short_path_equals_the_window_attention(family):
    # the step's attention from the queries the model's attention used (kept from the second decode step on)
    # and from queries projected again both equal window_probs, the harness's reference attention
    model = get_tiny_model(family)
    captured = {}

    def grab(module, args, kwargs, output):  # registered before the press's hook: runs first
        if kwargs["hidden_states"].shape[1] == 1:
            captured[module.layer_idx] = (module, dict(kwargs), module.__dict__.get("pikvpress_decode_query"))

    adapter = get_adapter(model)
    hooks = [layer.attention.register_forward_hook(grab, with_kwargs=True) for layer in adapter.layers]
    try:
        decode(model, AdaptiveSchedulingPress(budget=1000), ids(batch=2), steps=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert captured
    for idx, (module, kwargs, kept_query) in captured.items():
        keys = kwargs["past_key_values"].layers[idx].keys
        layer = adapter.layers[idx]
        reference = window_probs(module, kwargs["hidden_states"], keys, 1, kwargs["position_embeddings"]).mean(dim=2)
        assert kept_query is not None  # the attention wrapper kept the second step's queries
        module.pikvpress_decode_query = kept_query
        from_model = AdaptiveSchedulingPress._step_attention(module, layer, kwargs["hidden_states"], keys, 1, kwargs)
        assert "pikvpress_decode_query" not in module.__dict__  # read once
        projected = AdaptiveSchedulingPress._step_attention(module, layer, kwargs["hidden_states"], keys, 1, kwargs)
        for probs in (from_model, projected):
            torch.testing.assert_close(probs, reference, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


def test_bad_arguments_are_rejected():
    for kwargs, name in (
        ({}, "exactly one"),
        ({"budget": 8, "compression_ratio": 0.5}, "exactly one"),
        ({"budget": 0}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"compression_ratio": 1.0}, "compression_ratio"),
        ({"budget": 8, "policy": "fifo"}, "policy"),
        ({"budget": 8, "interval": 0}, "interval"),
        ({"budget": 8, "sink_tokens": -1}, "sink_tokens"),
        ({"budget": 8, "recent_window": -2}, "recent_window"),
        ({"budget": 8, "decay": 1.0}, "decay"),
        ({"budget": 8, "threshold": -0.1}, "threshold"),
    ):
        with pytest.raises(ValueError, match=name):
            AdaptiveSchedulingPress(**kwargs)


def test_prefill_is_left_alone():
    model = get_tiny_model("llama")
    cache = decode(model, AdaptiveSchedulingPress(budget=8), ids(), steps=0)
    assert {layer.keys.shape[2] for layer in cache.layers} == {T}
