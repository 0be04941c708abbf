"""State flows explicitly: nothing of a press stays on the model after ``with press(model):``, no press keeps a
cache alive, and one request's results never reach another (issue 17, defects 1 and 2)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import get_tiny_model
from default_presses import PRESS_CASES, PressCase
from kvpress import KnormPress, PrefillDecodingPress
from transformers import DynamicCache

from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress, PiKVPress, enable_packed_attention
from pikvpress.scheduling import DecodeQueryTap, scores_to_prior

FAMILIES = ["llama", "qwen3_moe", "deepseek_v3", "gpt_oss"]
case_ids = [case.name for case in PRESS_CASES]


def random_ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_state(model) -> dict:
    """What a press could leave on a model: every module's attribute names, submodules, hooks and the config's
    attention implementation."""
    state = {"attn_implementation": model.config._attn_implementation}
    for name, module in model.named_modules():
        state[name] = (
            sorted(module.__dict__),
            sorted(module._modules),
            sorted(module._buffers),
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
        )
    return state


#: kvpress's own: its attention patch sets it on every call, and AdaKV masks pruned keys through it (kvpress's
#: pipeline decodes outside the press's context, so it must outlive it); the next prefill replaces it
KVPRESS_ATTRIBUTES = {"masked_key_indices"}


def tensors_on_modules(model) -> list[str]:
    """Tensors held in a module's plain attributes (parameters and buffers live elsewhere), kvpress's aside."""
    return [
        f"{name}.{key}"
        for name, module in model.named_modules()
        for key, value in module.__dict__.items()
        if key not in KVPRESS_ATTRIBUTES
        and (
            isinstance(value, torch.Tensor)
            or (isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value))
        )
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_nothing_of_the_press_remains_on_the_model_and_no_cache_is_kept_alive(case: PressCase, family: str):
    model = get_tiny_model(family, case=case)
    with torch.no_grad():
        model(input_ids=random_ids(4, seed=10))  # kvpress's attention patch sets its attribute on the first call
    before = model_state(model)
    press = case.make(0.5)
    cache = DynamicCache(config=model.config)
    ids = random_ids(40, seed=11)
    with torch.no_grad():
        with press(model):
            out = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
        assert model_state(model) == before
        assert not tensors_on_modules(model)
        # decoding on after the press exited (kvpress's pipeline does) changes nothing on the model either
        model(input_ids=out[:, -1:], past_key_values=cache)
        model(input_ids=random_ids(6, seed=12))  # a later forward without any press
    assert model_state(model) == before
    assert not tensors_on_modules(model)
    # the user drops the cache: nothing of the press keeps it (or any of its layers) alive
    refs = [weakref.ref(cache)] + [weakref.ref(layer) for layer in cache.layers]
    del cache
    gc.collect()
    assert all(ref() is None for ref in refs), f"{press!r} keeps the cache alive"


def test_reading_packed_layers_changes_nothing_on_the_model_not_even_its_attention_implementation():
    """kvpress's pipeline decodes outside the press's context, so packed and sharded layers must be readable then: the
    attention functions are wrapped once (selected per layer by the keys' tag), the model and its config untouched."""
    model = get_tiny_model("llama")
    with torch.no_grad():
        model(input_ids=random_ids(4, seed=10))
    before = model_state(model)
    enable_packed_attention(model)
    assert model_state(model) == before
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation)
    )
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            with PiKVPress(
                compression={"bits": 4, "key_group_size": 8, "residual_length": 4}, sharding={"num_shards": 2}
            )(model):
                model(input_ids=random_ids(30, seed=3), past_key_values=cache)
            model(input_ids=random_ids(1, seed=4), past_key_values=cache)  # a sharded, packed cache read after exit
    finally:
        hook.remove()
    assert seen == [before["attn_implementation"]] * 2
    assert model_state(model) == before and not tensors_on_modules(model)


@pytest.mark.parametrize("prior_from_routing", [False, True])
def test_a_routing_prefill_never_reaches_a_later_request(prior_from_routing: bool):
    """Defect 1: ExpertRoutingPress left its prefill scores on the attention modules, keyed by ``id(cache)``; a later
    ``PrefillDecodingPress(KnormPress, AdaptiveSchedulingPress)`` on another sequence took them as its prior whenever
    the new cache reused the old one's address. Every request must start from the prior a fresh model gives."""
    model = get_tiny_model("llama")
    routing = ExpertRoutingPress(0.5, router="keys", num_experts=2, window_size=8)

    def knorm_then_schedule(seed: int) -> dict[int, torch.Tensor]:
        scheduler = AdaptiveSchedulingPress(budget=1000, interval=8, prior_from=routing if prior_from_routing else None)
        press = PrefillDecodingPress(prefilling_press=KnormPress(0.5), decoding_press=scheduler)
        cache = DynamicCache(config=model.config)
        ids = random_ids(32, seed=seed)
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=cache)
            position = torch.tensor([32])
            step = random_ids(1, seed=seed + 1)
            model(input_ids=step, past_key_values=cache, cache_position=position, position_ids=position[None])
            return {idx: stats.ema.clone() for idx, stats in scheduler._stats.items()}

    references = {seed: knorm_then_schedule(seed) for seed in range(8)}  # no routing request before them
    for seed in range(8):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), routing(model):  # another request, the same shapes: 32 tokens cut to 16
            model(input_ids=random_ids(32, seed=100 + seed), past_key_values=cache)
        del cache
        gc.collect()  # the next cache may take the freed one's address
        got = knorm_then_schedule(seed)
        assert got.keys() == references[seed].keys()
        for idx, ema in got.items():
            torch.testing.assert_close(ema, references[seed][idx], rtol=0, atol=0)


def test_routing_scores_reach_the_scheduler_of_that_cache_only():
    model = get_tiny_model("qwen3_moe")
    routing = ExpertRoutingPress(0.5, router="keys", num_experts=2, window_size=8)
    cache, other = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad(), routing(model):
        model(input_ids=random_ids(32, seed=1), past_key_values=cache)
    layers = [idx for idx in range(len(cache.layers)) if routing.kept_scores(cache, idx) is not None]
    assert layers and all(routing.kept_scores(other, idx) is None for idx in layers)
    scores = {idx: routing.kept_scores(cache, idx) for idx in layers}
    scheduler = AdaptiveSchedulingPress(budget=1000, interval=8, prior_from=routing)
    with torch.no_grad(), scheduler(model):
        position = torch.tensor([32])
        model(
            input_ids=random_ids(1, seed=2), past_key_values=cache, cache_position=position, position_ids=position[None]
        )
        for idx in layers:
            torch.testing.assert_close(scheduler._stats[idx].ema[..., :16], scores_to_prior(scores[idx]))
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None and len(routing._routed) == 0  # the hand-off is freed with its cache


def test_the_scheduler_taps_queries_only_inside_its_context():
    """Defect 2: AdaptiveSchedulingPress marked attention modules to keep their queries and never unmarked them,
    and its pending steps kept the last cache alive."""
    model = get_tiny_model("llama")
    press = AdaptiveSchedulingPress(budget=1000, interval=64)  # nothing recorded before the context ends
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model):
            model.generate(random_ids(20, seed=5), max_new_tokens=4, do_sample=False, past_key_values=cache)
            assert press._tap.is_open and press._pending  # steps waiting to be scored, holding the cache layer
        assert not press._tap.is_open and not press._pending
        assert press.stats and all(
            stats.step >= 3 for stats in press.stats.values()
        )  # the waiting steps were recorded at exit
        model(input_ids=random_ids(1, seed=6), past_key_values=cache)  # no press: no query is kept anywhere
    assert not press._tap._queries and not tensors_on_modules(model)
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None


def test_a_tap_keeps_only_the_watched_modules_queries_and_forgets_them_when_closed():
    model = get_tiny_model("llama")
    attention = [layer.self_attn for layer in model.model.layers]
    tap = DecodeQueryTap()
    tap.open(attention[:1])
    with torch.no_grad():
        model(input_ids=random_ids(4, seed=7))
    assert tap.take(attention[0]) is not None and tap.take(attention[0]) is None  # taken once
    assert all(tap.take(module) is None for module in attention[1:])
    with torch.no_grad():
        model(input_ids=random_ids(4, seed=8))
    tap.close()
    assert tap.take(attention[0]) is None


def test_pikv_press_reads_the_experts_from_its_routing_press(monkeypatch):
    from pikvpress.cache import ShardedKVLayer

    placed = []
    distribute = ShardedKVLayer.distribute

    def recording(self, *args, experts=None, num_experts=None, **kwargs):
        placed.append((experts, num_experts))
        return distribute(self, *args, experts=experts, num_experts=num_experts, **kwargs)

    monkeypatch.setattr(ShardedKVLayer, "distribute", recording)
    model = get_tiny_model("qwen3_moe")
    routing = ExpertRoutingPress(0.5, router="gate", num_experts=4, window_size=8)
    press = PiKVPress(routing=routing, sharding={"num_shards": 2, "tail_length": 2})
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=random_ids(40, seed=9), past_key_values=cache)
    sharded = [idx for idx, layer in enumerate(cache.layers) if isinstance(layer, ShardedKVLayer) and layer.has_shards]
    assert sharded and len(placed) == len(sharded)
    for idx, (experts, num_experts) in zip(sharded, placed):
        routed = routing.routed_tokens(cache, idx)
        assert num_experts == routed.num_experts
        torch.testing.assert_close(experts, routed.experts[..., : experts.shape[-1]], rtol=0, atol=0)
