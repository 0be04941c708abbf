"""Bytes a cache would hold in a bf16 run (the leaderboard compares against a bf16 cache of the same tokens while
the CPU model runs in float32): :func:`pikvpress.cache.ops.layer_tensor_nbytes` walks every tensor a layer holds."""

from __future__ import annotations

import contextlib

import pytest
import torch
from pikvpress_eval.presses import build_press
from transformers import DynamicCache

from pikvpress.cache.ops import layer_nbytes, layer_tensor_nbytes
from pikvpress.models import tiny_model
from pikvpress.presses import PiKVPress, QuantizationPress

PRESSES = {
    "none": lambda: None,
    "snapkv": lambda: build_press("snapkv", 0.5),
    "quantization_int4": lambda: QuantizationPress(bits=4, key_group_size=8, residual_length=4),
    "pikv_int4_shards": lambda: PiKVPress(
        compression_ratio=0.5, compression={"bits": 4, "key_group_size": 8, "residual_length": 4},
        sharding={"num_shards": 2},
    ),
    "pikv_dense_shards": lambda: PiKVPress(compression_ratio=0.5, sharding={"num_shards": 2}),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _cache(model, press):
    cache = DynamicCache()
    ids = torch.randint(3, 100, (1, 160))
    with press(model) if press is not None else contextlib.nullcontext(), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("name", list(PRESSES))
def test_the_walk_counts_what_the_layer_reports(model, name):
    cache = _cache(model, PRESSES[name]())
    for layer in cache.layers:
        assert layer_tensor_nbytes(layer) == layer_nbytes(layer) > 0


@pytest.mark.parametrize("name", list(PRESSES))
def test_bf16_counts_floats_at_two_bytes_and_integers_as_they_are(model, name):
    cache = _cache(model, PRESSES[name]())
    for layer in cache.layers:
        held = layer_nbytes(layer)
        bf16 = layer_tensor_nbytes(layer, torch.bfloat16)
        if name in ("none", "snapkv"):  # float32 keys and values only
            assert bf16 * 2 == held
        elif name == "pikv_dense_shards":  # float keys and values, plus int32 shard indices once sharded
            assert held / 2 <= bf16 < held
        else:  # packed codes keep their size: more than half of the float32 bytes
            assert held / 2 < bf16 < held
