import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may need the hub

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import pikvpress  # noqa: F401  (applies the kvpress compatibility layer)
from pikvpress.models import tiny_model, tiny_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))

_MODELS: dict = {}


def get_tiny_model(family: str, attn_implementation: str | None = None, case=None):
    """Session-wide cache of tiny models (built once per family and attention implementation).

    With a press ``case``, uses the case's attention implementation and skips combinations the press
    cannot run (kvpress's AdaKV on eager-only models).
    """
    if case is not None:
        attn_implementation = case.attn_implementation
    key = (family, attn_implementation)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(family, attn_implementation=attn_implementation)
    model = _MODELS[key]
    if case is not None and not case.eager_ok and model.config._attn_implementation == "eager":
        pytest.skip(f"{case.name} does not support eager attention, the only one {family} has on CPU")
    return model


def dequantized_copy(model, cache):
    """A dense DynamicCache holding exactly the keys and values a (packed or sharded) cache represents."""
    from transformers import DynamicCache

    from pikvpress.cache import PackedKVLayer, ShardedKVLayer

    dense = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        stored = isinstance(layer, (PackedKVLayer, ShardedKVLayer))
        k, v = layer.dequantized() if stored else (layer.keys, layer.values)
        target = dense.layers[idx]
        target.lazy_initialization(k, v)
        target.keys, target.values = k.clone(), v.clone()
        if hasattr(target, "cumulative_length"):
            target.cumulative_length = layer.get_seq_length()
    return dense


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def unpatched():
    """Run a test body with plain kvpress 0.5.5 (the compatibility layer removed)."""
    from pikvpress.compat import kvpress_fixes

    with kvpress_fixes(False):
        yield
