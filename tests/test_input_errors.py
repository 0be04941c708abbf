"""Bad input fails early and names the argument; defaults accept real models (issue 17, defects 4, 6 and 7)."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny_model
from kvpress import PrefillDecodingPress
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, StaticCache

from pikvpress import (
    AdaptiveSchedulingPress,
    ExpertRoutingPress,
    PiKVPress,
    QuantizationPress,
    UnsupportedModelError,
)
from pikvpress.cache import PackedKVLayer
from pikvpress.cache.packed_layer import default_group_size
from pikvpress.models import tiny_model


def random_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(seed))


# --- defect 4: caches the presses cannot handle are refused before anything runs ---------------------------------
STATIC_PRESSES = {
    "expert_routing": lambda: ExpertRoutingPress(0.5, router="keys", window_size=4),
    "adaptive_scheduling": lambda: AdaptiveSchedulingPress(budget=8),
    "pikv": lambda: PiKVPress(sharding={"num_shards": 2, "tail_length": 2}),
    "pikv_routing": lambda: PiKVPress(compression_ratio=0.5, sharding={"num_shards": 2, "tail_length": 2}),
    "quantization": lambda: QuantizationPress(bits=4),
}


@pytest.mark.parametrize("name", list(STATIC_PRESSES))
def test_a_static_cache_is_refused_naming_its_class(name):
    model = get_tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=48)
    press = STATIC_PRESSES[name]()
    with pytest.raises(ValueError, match=r"StaticCache.*supported caches: DynamicCache"), torch.no_grad(), press(model):
        model(input_ids=random_ids(24), past_key_values=cache)
    assert all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)  # nothing was replaced


def test_a_static_cache_is_refused_by_a_scheduler_inside_prefill_decoding_press():
    model = get_tiny_model("qwen3_moe")
    press = PrefillDecodingPress(decoding_press=AdaptiveSchedulingPress(budget=8))
    with pytest.raises(ValueError, match="StaticCache"), torch.no_grad(), press(model):
        model.generate(random_ids(16), max_new_tokens=3, do_sample=False, cache_implementation="static")


# --- defect 6: defaults that accept real models ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key_dim", "value_dim", "group"),
    [(96, 96, 32), (80, 80, 16), (48, 48, 16), (24, 24, 8), (16, 16, 16), (128, 128, 64), (192, 128, 64), (24, 12, 4)],
)
def test_default_group_follows_the_head_dims(key_dim, value_dim, group):
    assert default_group_size(key_dim, value_dim) == group


@pytest.mark.parametrize("head_dim", [96, 80, 48, 24])
def test_quantization_press_default_packs_any_head_dim(head_dim):
    model = tiny_model("llama", head_dim=head_dim)  # Phi-3-mini's 96, and 80, 48, 24
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), QuantizationPress(bits=4, residual_length=4, key_group_size=8)(model):
        out = model.generate(random_ids(40), max_new_tokens=4, do_sample=False, past_key_values=cache)
    packed = [layer for layer in cache.layers if isinstance(layer, PackedKVLayer)]
    assert packed and all(layer.group_size == default_group_size(head_dim, head_dim) for layer in packed)
    assert packed[0].nbytes < 0.5 * 2 * 44 * head_dim * 4 * 2  # really packed: well under the fp32 bytes
    assert out.shape == (1, 44)


def test_quantization_press_default_packs_mla_key_and_value_dims():
    model = get_tiny_model("deepseek_v3")  # keys 24, values 12: the group divides both
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), QuantizationPress(bits=4, residual_length=4, key_group_size=8)(model):
        model.generate(random_ids(40), max_new_tokens=3, do_sample=False, past_key_values=cache)
    packed = [layer for layer in cache.layers if isinstance(layer, PackedKVLayer)]
    assert packed and all(layer.group_size == 4 for layer in packed)


def test_an_explicit_group_that_does_not_divide_the_head_dim_is_still_refused():
    model = tiny_model("llama", head_dim=96)
    press = QuantizationPress(bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size=64 does not divide the key head dim 96"), press(model):
        pass


@pytest.mark.parametrize("router", ["keys", "gate", "learned"])
@pytest.mark.parametrize("length", [1, 2, 5])
def test_expert_routing_keeps_what_a_tiny_context_has(router, length):
    from default_presses import tiny_router_dir

    model = get_tiny_model("qwen3_moe")
    kwargs = {"router_weights": tiny_router_dir()} if router == "learned" else {}
    press = ExpertRoutingPress(0.5, router=router, num_experts=2, window_size=4, **kwargs)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.generate(random_ids(length), max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert out.shape == (1, length + 3)
    assert cache.get_seq_length() >= max(1, length // 2)


# --- defect 7: bad input fails at construction (or when the press meets the model) -------------------------------
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PiKVPress(sharding={"devices": ["foo", "bar"]}), r"devices must hold device names.*'foo'"),
        (lambda: PiKVPress(sharding={"devices": [3, 4]}), "devices must hold device names"),
        (lambda: PiKVPress(timeout=-1), "timeout must be a number of seconds > 0, got -1"),
        (lambda: PiKVPress(timeout=0), "timeout must be"),
        (lambda: PiKVPress(timeout="soon"), "timeout must be"),
        (lambda: PiKVPress(timeout=float("inf")), "timeout must be"),
        (lambda: QuantizationPress(bits=4.0), r"bits must be an int in \(2, 4, 8\), got 4.0"),
        (lambda: QuantizationPress(bits=True), "bits must be an int"),
        (lambda: PiKVPress(compression={"bits": 4.0}), "bits must be an int"),
        (lambda: AdaptiveSchedulingPress(budget=8, prior_from="routing"), "prior_from must be None or a press"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_an_unusable_device_fails_when_the_press_meets_the_model():
    model = get_tiny_model("llama")
    press = PiKVPress(
        sharding={"num_shards": 2, "devices": ["cuda:7"]}
    )  # a valid name: whether it exists is known at run time
    allowed = "'cuda:" if torch.cuda.is_available() else "CUDA is not available here"
    with pytest.raises(ValueError, match=f"devices names 'cuda:7'.*{allowed}"), press(model):
        pass


def test_the_scheduler_refuses_a_model_family_it_has_no_adapter_for():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    press = AdaptiveSchedulingPress(budget=8)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*Supported families"), press(model):
        pass


def test_ranks_compare_their_scheduling_settings():
    a = PiKVPress(scheduling={"budget": 64}, sharding={"num_shards": 2})
    b = PiKVPress(scheduling={"budget": 128}, sharding={"num_shards": 2})
    c = PiKVPress(scheduling={"budget": 64}, sharding={"num_shards": 2})
    assert a.settings()["scheduling"] != b.settings()["scheduling"]
    assert a.settings() == c.settings()
    assert PiKVPress(sharding={"num_shards": 2}).settings()["scheduling"] is None
