"""AdaptiveSchedulingPress: the cache stays under budget + interval while decoding, statistics stay aligned
with it, evictions free the tensors, it composes with a prefill press, and bad arguments are rejected."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import dequantized_copy, get_tiny_model
from kvpress import ComposedPress, KnormPress, PrefillDecodingPress
from transformers import DynamicCache, pipeline

from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress, QuantizationPress
from pikvpress.cache import PackedKVLayer, evict
from pikvpress.models import get_adapter
from pikvpress.scheduling import (
    POLICIES,
    DecodeStatistics,
    priority_order,
    scores_to_prior,
    step_probs,
)
from pikvpress.scheduling.attention import window_probs

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

    calls, seen = [], []

    def recording_order(stats, policy, sink_tokens, recent_window):
        seen.append((stats.mass.clone(), stats.position.clone()))
        return priority_order(stats, policy, sink_tokens, recent_window)

    def recording_evict(cache, layer_idx, order, budget):
        kept = evict(cache, layer_idx, order, budget)
        calls.append((*seen[-1], kept))
        return kept

    monkeypatch.setattr(module, "priority_order", recording_order)
    monkeypatch.setattr(module, "evict", recording_evict)
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


def test_kvpress_pipeline_keeps_the_prefill_prior_across_its_two_press_contexts(tokenizer):
    # the pipeline prefills under the press, leaves its context (PrefillDecodingPress resets the scheduler),
    # then decodes under it again: the first decode step must still start from the prefill's attention
    model = get_tiny_model("llama")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    scheduling = AdaptiveSchedulingPress(compression_ratio=0.5, interval=4, prior_window=4)
    started = []
    start = scheduling._start

    def recording(module, cache, idx, position):
        stats = start(module, cache, idx, position)
        started.append(stats.ema.clone())  # before any decode step is recorded
        return stats

    scheduling._start = recording
    context = "The quick brown fox jumps over the lazy dog. " * 4
    pipe(context, question="Who jumps?", press=PrefillDecodingPress(decoding_press=scheduling), max_new_tokens=4)
    assert len(started) == len(full_layers(model))
    for ema in started:  # the last 4 prefill queries' attention, not a uniform 1 / T
        assert not torch.allclose(ema, torch.full_like(ema, 1 / ema.shape[-1]), rtol=0.05)
        torch.testing.assert_close(ema.sum(-1), torch.ones(ema.shape[:2]))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_adaptive_prior_is_the_prefill_press_scores_of_the_kept_tokens(family):
    model = get_tiny_model(family)
    routing = ExpertRoutingPress(0.5, router="keys", num_experts=2, window_size=8)
    scheduling = AdaptiveSchedulingPress(budget=1000, interval=8, prior_from=routing)
    press = PrefillDecodingPress(prefilling_press=routing, decoding_press=scheduling)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=ids(), past_key_values=cache)
        published = {idx: routing.kept_scores(cache, idx) for idx in full_layers(model)}
        assert routing.kept_scores(DynamicCache(config=model.config), full_layers(model)[0]) is None  # that cache only
        position = torch.tensor([T])
        model(input_ids=ids(length=1), past_key_values=cache, cache_position=position, position_ids=position[None])
        for idx, scores in published.items():
            assert scores.shape == (1, cache.layers[idx].keys.shape[1], T // 2)
            # the first step is not recorded yet (interval 8): the moving average is still the prior
            torch.testing.assert_close(scheduling._stats[idx].ema[..., : T // 2], scores_to_prior(scores))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss"])
def test_decode_query_attention_equals_the_window_attention(family):
    # the step's attention from the query the model's attention used (kept from the second decode step on)
    # and from the query projected again both equal window_probs, the harness's reference attention
    model = get_tiny_model(family)
    captured = {}
    press = AdaptiveSchedulingPress(budget=1000)

    def grab(module, args, kwargs, output):  # registered before the press's hook: runs first
        if kwargs["hidden_states"].shape[1] == 1:
            captured[module.layer_idx] = (module, dict(kwargs), press._tap._queries.get(module))

    adapter = get_adapter(model)
    hooks = [layer.attention.register_forward_hook(grab, with_kwargs=True) for layer in adapter.layers]
    try:
        decode(model, press, ids(batch=2), steps=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert captured
    for idx in full_layers(model):  # sliding-window layers are left alone
        module, kwargs, kept_query = captured[idx]
        keys = kwargs["past_key_values"].layers[idx].keys
        layer = adapter.layers[idx]
        reference = window_probs(module, kwargs["hidden_states"], keys, 1, kwargs["position_embeddings"]).mean(dim=2)
        assert kept_query is not None  # the attention handed the step's queries to the press's tap
        press._tap.open([module])
        press._tap.offer(module, kept_query)
        from_model = press._decode_query(module, layer, kwargs["hidden_states"], kwargs)
        assert from_model is kept_query  # taken once: the next call projects the query again
        projected = press._decode_query(module, layer, kwargs["hidden_states"], kwargs)
        press._tap.close()
        for query in (from_model, projected):
            probs = step_probs(query * layer.scaling, keys, keys.shape[2] - 1, layer.sinks)[:, :, 0]
            torch.testing.assert_close(probs, reference, rtol=1e-5, atol=1e-6)
            total = probs.sum(-1)  # the attention sinks take their share
            assert (total <= 1 + 1e-6).all() and (
                layer.sinks is not None or torch.allclose(total, torch.ones_like(total))
            )


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("interval", [1, 5])
def test_batched_statistics_equal_step_by_step_statistics(family, interval):
    # the press records decode steps in batches; a reference built step by step from window_probs (with the
    # model's sinks) and DecodeStatistics.append/observe must agree on every statistic of every full layer
    model = get_tiny_model(family)
    press = AdaptiveSchedulingPress(budget=1000, interval=interval, prior_window=8)
    reference: dict[int, DecodeStatistics] = {}
    priors = {}

    def follow(module, args, kwargs, output):
        idx = module.layer_idx
        keys = kwargs["past_key_values"].layers[idx].keys
        q_len = kwargs["hidden_states"].shape[1]
        if q_len > 1:  # the prefill: the prior is the attention of its last 8 queries
            priors[idx] = window_probs(module, kwargs["hidden_states"], keys, 8, kwargs["position_embeddings"])
            return
        if idx not in reference:
            b, h, t = keys.shape[:3]
            start = torch.arange(t - 1).expand(b, h, t - 1)
            reference[idx] = DecodeStatistics.start(start, prior=priors[idx].mean(dim=2))
        stats = reference[idx]
        stats.append(kwargs["position_ids"].view(-1, 1, 1).expand(keys.shape[0], keys.shape[1], 1))
        probs = window_probs(module, kwargs["hidden_states"], keys, 1, kwargs["position_embeddings"])
        stats.observe(probs.mean(dim=2))

    adapter = get_adapter(model)
    full = [layer for layer in adapter.layers if not layer.is_sliding]
    with press(model):  # the press's hook first, so its statistics exist when the reference starts
        hooks = [layer.attention.register_forward_hook(follow, with_kwargs=True) for layer in full]
        try:
            cache = DynamicCache(config=model.config)
            input_ids = ids(batch=2)
            t = input_ids.shape[1]
            logits = model(input_ids=input_ids, past_key_values=cache).logits
            for step in range(13):
                token = logits[:, -1:].argmax(-1)
                position = torch.tensor([t + step])
                logits = model(
                    input_ids=token, past_key_values=cache, cache_position=position, position_ids=position.expand(2, 1)
                ).logits
        finally:
            for hook in hooks:
                hook.remove()
        assert any(press._pending.values()) or interval == 1  # some steps still wait to be recorded
        stats = press.stats  # records them
    assert set(reference) == {layer.layer_idx for layer in full}
    for idx, expected in reference.items():
        got = stats[idx]
        assert got.step == expected.step == 13 and got.seen == expected.seen
        torch.testing.assert_close(got.position, expected.position)
        torch.testing.assert_close(got.mass, expected.mass, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.ema, expected.ema, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.prior, expected.prior, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.last_used, expected.last_used)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("layout", ["kivi", "per_token"])
def test_packed_layers_stay_packed_under_budget_and_decode_as_their_dequantized_cache(family, layout):
    model = get_tiny_model(family)
    quantize = QuantizationPress(bits=4, group_size=4, key_group_size=8, residual_length=4, layout=layout)
    scheduling = AdaptiveSchedulingPress(budget=20, interval=3, sink_tokens=2, recent_window=4)
    press = PrefillDecodingPress(
        prefilling_press=ComposedPress([KnormPress(0.25), quantize]), decoding_press=scheduling
    )
    lengths = []

    def watch(cache):
        for idx in full_layers(model):
            layer = cache.layers[idx]
            assert isinstance(layer, PackedKVLayer)
            pending = scheduling._pending.get(idx)
            assert layer.keys.shape[2] == scheduling._stats[idx].length + (len(pending.queries) if pending else 0)
            lengths.append(layer.keys.shape[2])

    cache = decode(model, press, ids(batch=2), steps=12, watch=watch)
    assert max(lengths) < 20 + 3 and min(lengths) == 20  # it evicted, within budget + interval
    # the packed cache it leaves is what the model reads: one more step equals dense attention over it
    dense = dequantized_copy(model, cache)
    step = torch.tensor([[7], [9]])
    position = torch.tensor([T + 12])
    with torch.no_grad():
        packed_logits = model(input_ids=step, past_key_values=cache, position_ids=position.expand(2, 1)).logits
        dense_logits = model(input_ids=step, past_key_values=dense, position_ids=position.expand(2, 1)).logits
    torch.testing.assert_close(packed_logits, dense_logits, rtol=1e-4, atol=1e-4)


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
