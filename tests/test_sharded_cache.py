"""ExpertShardedCache / ShardedKVLayer: placement, routing summaries, exact sharded attention, top-k, crop, evict."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny_model
from torch import nn
from transformers import DynamicCache

from pikvpress import PiKVPress, enable_packed_attention, tiny_model
from pikvpress.attention import sharded_layer_attention
from pikvpress.cache import ExpertShardedCache, ShardedKVLayer, cache_bytes_read, cache_nbytes_per_device
from pikvpress.kernels.attention import attention_partial
from pikvpress.models import TINY_FAMILIES
from pikvpress.routing.shards import (
    balanced_assignment,
    select_shards,
    shard_assignment,
    shard_counts,
    shard_scores,
    token_validity,
)
from pikvpress.scheduling import sharded_step_probs, step_probs

B, HKV, G, D = 2, 2, 3, 16
PACKING = {"bits": 8, "group_size": 4, "key_group_size": 8, "residual_length": 0, "stats_dtype": torch.float16}


def random_kv(t: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, t, D, generator=gen) * 2
    values = torch.randn(B, HKV, t, D, generator=gen)
    return keys.to(dtype), values.to(dtype)


def filled_layer(t: int, *, seed: int = 0, dtype=torch.float32, **kwargs) -> ShardedKVLayer:
    """A layer holding ``t`` random tokens, all but ``tail_length`` of them distributed."""
    layer = ShardedKVLayer(**kwargs)
    keys, values = random_kv(t, seed, dtype)
    layer.update(keys, values)
    layer.distribute()
    return layer


def dense_reference(query, keys, values, scale, keep=None):
    out, _ = attention_partial(query, keys, values, scale, keep)
    return out.transpose(1, 2)


def causal_keep(lq: int, n: int) -> torch.Tensor:
    return (torch.arange(n)[None, :] <= torch.arange(n - lq, n)[:, None])[None, None]


# --------------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------------


def test_balanced_assignment_fills_every_shard_exactly_and_is_stable():
    gen = torch.Generator().manual_seed(0)
    preference = torch.rand(B, HKV, 50, 4, generator=gen)
    counts = shard_counts(50, 4)
    assert counts == [13, 13, 12, 12]
    shard = balanced_assignment(preference, counts)
    for b in range(B):
        for h in range(HKV):
            assert torch.bincount(shard[b, h], minlength=4).tolist() == counts
            # stable: a token preferring shard s to its own finds s full of tokens that prefer s at least as much
            pref = preference[b, h]
            own = pref.gather(-1, shard[b, h][:, None]).squeeze(-1)
            for s in range(4):
                members = pref[shard[b, h] == s, s]
                envious = (pref[:, s] > own) & (shard[b, h] != s)
                assert bool((pref[envious, s] <= members.min()).all())


def test_balanced_assignment_keeps_first_choices_that_fit():
    first = torch.arange(40).remainder(4)[torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    preference = torch.nn.functional.one_hot(first, 4).float().expand(B, HKV, 40, 4) + 0.01
    assert torch.equal(balanced_assignment(preference, [10] * 4), first.expand(B, HKV, 40))


def test_shard_assignment_rules():
    keys, _ = random_kv(10)
    contiguous = shard_assignment(keys, 3, "contiguous")
    assert contiguous[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert shard_assignment(keys, 3, "round_robin")[1, 1].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    # experts: expert e of 8 lives in shard e * 4 // 8; every group fits, so every token goes to its expert's shard
    experts = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 2]).expand(B, HKV, 10)
    placed = shard_assignment(keys, 4, "experts", experts=experts, num_experts=8)
    # shard sizes are [3, 3, 2, 2]: group 1 (experts 2, 3) has three tokens, group 0 (0, 1) three
    assert placed[0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]
    with pytest.raises(ValueError, match="placement must be one of"):
        shard_assignment(keys, 2, "random")


def test_key_cluster_placement_groups_similar_keys():
    # four well-separated directions: each cluster is one shard
    gen = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(4, D, generator=gen), dim=-1) * 10
    labels = torch.arange(64) % 4
    keys = (directions[labels] + 0.1 * torch.randn(64, D, generator=gen)).expand(1, 1, 64, D)
    placed = shard_assignment(keys, 4, "experts")[0, 0]
    for label in range(4):
        assert placed[labels == label].unique().numel() == 1


# --------------------------------------------------------------------------------------------------
# summaries and selection
# --------------------------------------------------------------------------------------------------


def test_quest_bound_bounds_every_key_and_centroid_is_the_mean_logit():
    layer = filled_layer(80, num_shards=4, placement="experts")
    query = torch.randn(B, HKV, G, D, generator=torch.Generator().manual_seed(3))
    counts = torch.tensor(layer.shard_lengths).expand(B, HKV, 4)
    centroid = layer.key_sum / counts.unsqueeze(-1)
    bound = shard_scores(query, layer.key_min, layer.key_max, centroid, counts, "bound")
    mean = shard_scores(query, layer.key_min, layer.key_max, centroid, counts, "centroid")
    for s, shard in layer.local_shards:
        logits = torch.matmul(query, shard.keys.transpose(-1, -2))  # (B, HKV, G, L)
        assert bool((bound[..., s] >= logits.amax(-1) - 1e-4).all())
        torch.testing.assert_close(mean[..., s], logits.mean(-1), rtol=1e-4, atol=1e-4)
        # the bound is tight somewhere: it equals max q.k for a key at the shard's corner, never far above
        assert bool((bound[..., s] > logits.amax(-1) - 1e-4).all())


def test_select_shards_picks_the_best_and_never_an_empty_shard():
    scores = torch.tensor([[[[0.5, 2.0, float("-inf"), 1.0]]]])
    assert select_shards(scores, 2).tolist() == [[[[False, True, False, True]]]]
    assert select_shards(scores, 4).tolist() == [[[[True, True, False, True]]]]


# --------------------------------------------------------------------------------------------------
# exact attention over the shards
# --------------------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("placement", ["experts", "contiguous", "round_robin"])
@pytest.mark.parametrize("lq", [1, 3])
def test_all_shards_equal_dense_attention(dtype, placement, lq):
    layer = filled_layer(70, num_shards=4, placement=placement, tail_length=5, dtype=dtype)
    new_k, new_v = random_kv(lq, seed=9, dtype=dtype)
    layer.update(new_k, new_v)  # the tokens land in the tail (the attention function reads it)
    query = torch.randn(B, HKV * G, lq, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = sharded_layer_attention(nn.Module(), query, layer.tail_keys, layer.tail_values, None, layer, scaling=0.25)
    keys, values = layer.dequantized()
    assert keys.shape[2] == 70 + lq
    ref = dense_reference(query, keys, values, 0.25, causal_keep(lq, 70 + lq) if lq > 1 else None)
    torch.testing.assert_close(out.float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_padding_mask_reaches_the_sharded_tokens():
    layer = filled_layer(60, num_shards=3, tail_length=4)
    layer.update(*random_kv(1, seed=5))
    n = 61
    keep = torch.ones(B, 1, 1, n, dtype=torch.bool)
    keep[1, :, :, :17] = False  # row 1 is left-padded by 17 tokens
    query = torch.randn(B, HKV * G, 1, D, generator=torch.Generator().manual_seed(6))
    out = sharded_layer_attention(nn.Module(), query, layer.tail_keys, layer.tail_values, keep, layer, scaling=0.3)
    keys, values = layer.dequantized()
    torch.testing.assert_close(out, dense_reference(query, keys, values, 0.3, keep), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["cpu", "triton"])
def path(request, monkeypatch):
    """Packed shards read by the pure-torch reference, or by the split Triton kernel under the interpreter (the
    CUDA path)."""
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("PIKVPRESS_FORCE_TRITON", "1")
    return request.param


def test_packed_shards_equal_dense_attention_over_what_they_store(path):
    layer = filled_layer(90, num_shards=2, tail_length=3, packing=PACKING)
    assert all(shard.packed is not None and shard.packed.packed_length > 0 for _, shard in layer.local_shards)
    layer.update(*random_kv(1, seed=7))
    query = torch.randn(B, HKV * G, 1, D, generator=torch.Generator().manual_seed(8))
    out = sharded_layer_attention(nn.Module(), query, layer.tail_keys, layer.tail_values, None, layer, scaling=0.25)
    keys, values = layer.dequantized()  # the packed shards dequantized, in sequence order
    torch.testing.assert_close(out, dense_reference(query, keys, values, 0.25), rtol=1e-5, atol=1e-5)
    dense = filled_layer(90, num_shards=2, tail_length=3)
    assert layer.nbytes < dense.nbytes * 0.75  # int8 codes + fp16 stats instead of fp32


@pytest.mark.parametrize(
    ("packing", "path"),
    [(None, "cpu"), (PACKING, "cpu"), (PACKING, "triton")],  # dense shards never run the packed kernel
    ids=["dense", "packed-cpu", "packed-triton"],
    indirect=["path"],
)
def test_top_k_reads_only_the_chosen_shards(packing, path):
    layer = filled_layer(120, num_shards=4, tail_length=6, top_k_shards=1, packing=packing)
    layer.update(*random_kv(1, seed=10))
    query = torch.randn(B, HKV * G, 1, D, generator=torch.Generator().manual_seed(11))
    out = sharded_layer_attention(nn.Module(), query, layer.tail_keys, layer.tail_values, None, layer, scaling=0.25)
    # reference: dense attention of each query row over its chosen shard and the tail
    counts = torch.tensor(layer.shard_lengths).expand(B, HKV, 4)
    scores = shard_scores(query.reshape(B, HKV, G, D) * 0.25, layer.key_min, layer.key_max, layer.key_sum, counts)
    chosen = select_shards(scores, 1)  # (B, HKV, G, S)
    assert bool((chosen.sum(-1) == 1).all())
    token_shard = torch.full((B, HKV, 121), -1)
    for s, shard in layer.local_shards:
        token_shard.scatter_(-1, shard.index.long(), s)
    keep = (token_shard[:, :, None, :] < 0) | chosen.gather(
        -1, token_shard.clamp_min(0)[:, :, None, :].expand(-1, -1, G, -1)
    )
    keys, values = layer.dequantized()
    ref = dense_reference(query, keys, values, 0.25, keep.reshape(B, HKV * G, 1, 121))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # bytes read: the tail, plus each (row, kv head)'s chosen shards
    rows_read = sum(int(chosen[..., s].any(-1).sum()) * shard.row_kv_nbytes for s, shard in layer.local_shards)
    assert layer.bytes_read == pytest.approx(rows_read + 2 * layer.tail_keys.numel() * 4)
    full = filled_layer(120, num_shards=4, tail_length=6)
    full.update(*random_kv(1, seed=10))
    sharded_layer_attention(nn.Module(), query, full.tail_keys, full.tail_values, None, full, scaling=0.25)
    assert full.bytes_read == pytest.approx(2 * (121 * B * HKV * D * 4))  # every token's key and value
    assert layer.bytes_read < 0.8 * full.bytes_read


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_with_every_shard_equals_dense_decoding(family):
    model = get_tiny_model(family)
    enable_packed_attention(model)
    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(12))
    kwargs = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dense = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
        cache = ExpertShardedCache(num_shards=4, tail_length=4, flush_tokens=2, config=model.config)
        sharded = model.generate(ids, past_key_values=cache, **kwargs)
    layers = [layer for layer in cache.layers if isinstance(layer, ShardedKVLayer)]
    assert layers and all(layer.has_shards for layer in layers)
    assert all(layer.sharded_length > 48 - 4 for layer in layers)  # decode tokens were flushed to the shards too
    diff = max(float((a - b).abs().max()) for a, b in zip(dense.logits, sharded.logits))
    assert diff <= 1e-4
    assert torch.equal(dense.sequences, sharded.sequences)
    assert cache_bytes_read(cache) > 0


# --------------------------------------------------------------------------------------------------
# crop, evict, views, bytes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop_to", [75, 66, 64, 50, 20, 0])
def test_crop_keeps_the_first_tokens_in_order(crop_to):
    layer = filled_layer(64, num_shards=4, tail_length=2, flush_tokens=1)
    for step in range(16):  # decode: the tail overflows and flushes 4 tokens at a time
        layer.update(*random_kv(1, seed=100 + step))
    assert layer.sharded_length > 64 - 2
    keys, values = layer.dequantized()
    layer.keys = layer.keys[:, :, :crop_to]  # what kvpress's pipeline does to remove an answer
    layer.values = layer.values[:, :, :crop_to]
    assert layer.get_seq_length() == crop_to
    if crop_to:
        k, v = layer.dequantized()
        assert torch.equal(k, keys[:, :, :crop_to]) and torch.equal(v, values[:, :, :crop_to])
    # shards stay rectangular and balanced
    assert max(layer.shard_lengths) - min(layer.shard_lengths) <= 1


def test_evict_keeps_each_shards_share_and_returns_the_kept_indices():
    layer = filled_layer(100, num_shards=4, tail_length=8)
    keys, values = layer.dequantized()
    before = {s: shard.index.long() for s, shard in layer.local_shards}
    order = torch.stack([torch.randperm(100, generator=torch.Generator().manual_seed(s)) for s in range(B * HKV)])
    kept = layer.evict(order.view(B, HKV, 100), budget=48)
    assert kept.shape == (B, HKV, 48)
    assert layer.shard_lengths == [10, 10, 10, 10]  # 48 - the 8 tail tokens, split evenly
    k, v = layer.dequantized()
    assert torch.equal(k, keys.gather(2, kept[..., None].expand(-1, -1, -1, D)))
    assert torch.equal(v, values.gather(2, kept[..., None].expand(-1, -1, -1, D)))
    assert bool((kept[..., -8:] == torch.arange(92, 100)).all())  # the tail (recent tokens) stays
    # inside a shard, its 10 best-ranked tokens stay
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(100).expand_as(order)).view(B, HKV, 100)
    for s, index in before.items():
        best = index.gather(-1, rank.gather(-1, index).topk(10, dim=-1, largest=False).indices).sort(-1).values
        assert torch.equal(kept.gather(-1, layer.shards[s].index.long()), best)
    # summaries follow the kept keys
    for s, shard in layer.local_shards:
        torch.testing.assert_close(layer.key_max[:, :, s], shard.keys.amax(2))


@pytest.mark.parametrize("packing", [None, PACKING], ids=["dense", "packed"])
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_scheduler_probabilities_over_shards_equal_dense(packing, sinks):
    # one-token steps on a short tail: the tail flushes to the shards between steps, so some shard tokens
    # come after the first steps (their future) and must be masked for them
    layer = filled_layer(50, num_shards=4, tail_length=2, flush_tokens=1, packing=packing)
    start, n = layer.get_seq_length(), 9
    for step in range(n):
        layer.update(*random_kv(1, seed=20 + step))
    assert layer.sharded_length > start  # a flush moved decode tokens into the shards
    queries = torch.randn(B, HKV * G, n, D, generator=torch.Generator().manual_seed(3)) * 0.5
    sink_logits = torch.randn(HKV * G, generator=torch.Generator().manual_seed(4)) if sinks else None
    probs = sharded_step_probs(layer, queries, start, sink_logits)
    keys, _ = layer.dequantized()
    torch.testing.assert_close(probs, step_probs(queries, keys, start, sink_logits), rtol=1e-5, atol=1e-6)
    assert probs.shape == (B, HKV, n, start + n)
    # fewer steps than the layer holds: the later tokens are the future of every step
    torch.testing.assert_close(
        sharded_step_probs(layer, queries[:, :, :4], start),
        step_probs(queries[:, :, :4], keys[:, :, : start + 4], start),
    )


def test_the_scheduler_reads_the_query_pikv_attention_used():
    model = tiny_model("qwen3_moe")  # a fresh model: no module asked for its queries yet
    kept = []

    def grab(module, args, kwargs, output):  # registered before the press's hook: runs first
        if kwargs["hidden_states"].shape[1] == 1:
            kept.append(press.scheduling._tap._queries.get(module))  # what the tap holds for the press

    attention = model.model.layers[0].self_attn
    hook = attention.register_forward_hook(grab, with_kwargs=True)
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(2))
    press = PiKVPress(scheduling={"budget": 1000}, sharding={"num_shards": 2, "tail_length": 4})
    try:
        with torch.no_grad(), press(model):
            model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=DynamicCache(config=model.config))
    finally:
        hook.remove()
    # pikv attention handed the query it used to the press's tap at every decode step
    assert len(kept) == 3 and all(q is not None and q.shape[2] == 1 for q in kept)
    assert not press.scheduling._tap.is_open and not press.scheduling._tap._queries  # closed with the context


def test_views_and_bytes():
    layer = filled_layer(40, num_shards=2, tail_length=4)
    assert layer.keys.shape == (B, HKV, 40, D)
    with pytest.raises(TypeError, match="dequantize"):
        torch.cat([layer.keys])
    with pytest.raises(TypeError, match="can only be cropped"):
        layer.keys = torch.zeros(B, HKV, 40, D)
    per_device = layer.nbytes_per_device()
    assert sum(per_device.values()) == layer.nbytes
    kv = 2 * B * HKV * 40 * D * 4
    index = B * HKV * 36 * 4
    summaries = 3 * B * HKV * 2 * D * 4 + B * HKV * 2 * 8  # key min / max / sum, float32; real-token counts, int64
    assert layer.nbytes == kv + index + summaries
    cache = DynamicCache()
    cache.layers = [layer]
    assert cache_nbytes_per_device(cache) == {"cpu": layer.nbytes}


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 5, True, 1.5])
def test_bad_top_k_is_rejected(top_k):
    with pytest.raises(ValueError, match="top_k_shards must be None or an int in 1..num_shards=4"):
        ShardedKVLayer(num_shards=4, top_k_shards=top_k)


def test_more_shards_than_tokens_is_rejected():
    layer = ShardedKVLayer(num_shards=8)
    layer.update(*random_kv(6))
    with pytest.raises(ValueError, match="cannot split 6 tokens into num_shards=8"):
        layer.distribute()
    assert layer.tail_length_now == 6 and not layer.has_shards  # nothing moved


@pytest.mark.parametrize("devices", [["cpu"] * 3, ["cpu"] * 8, "cpu", []])
def test_a_device_list_that_does_not_fit_is_rejected(devices):
    with pytest.raises(ValueError, match="devices|device list"):
        ExpertShardedCache(num_shards=4, devices=devices)


@pytest.mark.parametrize(
    ("num_shards", "devices", "expected"),
    [
        (4, ["cpu", "meta"], ["cpu", "cpu", "meta", "meta"]),
        (6, ["cpu", "meta", "cpu"], ["cpu", "cpu", "meta", "meta", "cpu", "cpu"]),
        (2, ["meta", "cpu"], ["meta", "cpu"]),
    ],
)
def test_devices_spread_the_shards(num_shards, devices, expected):
    # shard s lives on devices[s * len(devices) // num_shards]: blocks of consecutive shards per device. The meta
    # device tells the devices apart without a second accelerator, so a wrong mapping cannot pass on "cpu" twice.
    layer = filled_layer(60, num_shards=num_shards, devices=devices)
    assert [str(layer.shard_device(s)) for s in range(num_shards)] == expected
    assert [str(shard.device) for shard in layer.shards] == expected
    assert [str(shard.keys.device) for shard in layer.shards] == expected  # the tokens moved there too
    assert [str(shard.index.device) for shard in layer.shards] == expected
    per_device = layer.nbytes_per_device()
    for device in set(expected):
        held = sum(shard.nbytes for shard in layer.shards if str(shard.device) == device)
        assert per_device[device] >= held > 0


def test_bad_layer_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_shards must be"):
        ShardedKVLayer(num_shards=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        ShardedKVLayer(placement="hash")


def test_pikv_press_rejects_more_shards_than_context_tokens_and_waits_when_routing_leaves_few():
    from pikvpress import ExpertRoutingPress, PiKVPress

    model = get_tiny_model("llama")
    with (
        pytest.raises(ValueError, match="cannot split a 6-token context into num_shards=8"),
        PiKVPress(sharding={"num_shards": 8, "tail_length": 0})(model),
    ):
        model(torch.randint(3, 259, (1, 6)), past_key_values=DynamicCache(config=model.config))
    # routing leaves 10 tokens, 8 of them in the tail: too few to shard yet; decoding shards them later
    press = PiKVPress(
        routing=ExpertRoutingPress(0.75, router="keys", num_experts=2), sharding={"num_shards": 4, "tail_length": 8}
    )
    cache = DynamicCache(config=model.config)
    with press(model):
        model.generate(torch.randint(3, 259, (1, 40)), past_key_values=cache, max_new_tokens=8, min_new_tokens=8)
    layer = cache.layers[0]
    assert isinstance(layer, ShardedKVLayer) and layer.has_shards
    assert layer.get_seq_length() == 10 + 7


# --------------------------------------------------------------------------------------------------
# padding: out of placement and summaries
# --------------------------------------------------------------------------------------------------


def test_token_validity_reads_every_mask_form():
    real = torch.tensor([[True] * 6, [False, False] + [True] * 4])  # row 1 left-padded by 2
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    boolean = causal[None, None] & real[:, None, None, :]  # (B, 1, Q, K) as sdpa gets it
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~boolean, torch.finfo(torch.float32).min)  # as eager gets it
    for mask in (boolean, additive, real.long()):
        assert torch.equal(token_validity(mask, 6), real)
    assert torch.equal(token_validity(boolean, 4), real[:, :4])  # a pruned layer: the columns decoding gives it
    assert token_validity(None, 6) is None and token_validity(torch.ones(2, 6), 6) is None


def _layer_with_padding(keys, values, valid, steps, **kwargs) -> ShardedKVLayer:
    """A layer prefilled with ``keys`` / ``values`` (``valid``: real tokens), then decoding ``steps``."""
    layer = ShardedKVLayer(**kwargs)
    layer.lazy_initialization(keys, values)
    layer.tail_keys, layer.tail_values = keys, values
    layer.distribute(valid=valid)
    for k, v in steps:  # decode tokens flush to the shards, placed by the shards' mean keys
        layer.update(k, v)
    return layer


@pytest.mark.parametrize("placement", ["experts", "contiguous", "round_robin"])
def test_padding_is_placed_apart_and_left_out_of_the_summaries(placement):
    """Row 1 left-padded by 14 tokens: its real tokens land in the shards and summaries they have alone, whatever
    the pad tokens' keys; the summaries count real tokens only."""
    keys, values = random_kv(50, seed=21)
    other = keys.clone()
    other[1, :, :14] = torch.randn(HKV, 14, D, generator=torch.Generator().manual_seed(22)) * 5  # other pad keys
    valid = torch.ones(B, 50, dtype=torch.bool)
    valid[1, :14] = False
    steps = [random_kv(1, seed=30 + i) for i in range(6)]
    kwargs = {"num_shards": 4, "placement": placement, "tail_length": 4, "flush_tokens": 1}
    padded = _layer_with_padding(keys, values, valid, steps, **kwargs)
    repadded = _layer_with_padding(other, values, valid, steps, **kwargs)
    row = [(k[1:], v[1:]) for k, v in steps]
    alone = _layer_with_padding(keys[1:, :, 14:], values[1:, :, 14:], None, row, **kwargs)
    assert padded.sharded_length > 46 and alone.sharded_length > 32  # decode tokens were flushed too
    for s in range(4):  # the same placement whatever the pad keys
        assert torch.equal(padded.shards[s].index, repadded.shards[s].index)
    for name in ("key_min", "key_max", "key_sum", "key_count"):
        assert torch.equal(getattr(padded, name), getattr(repadded, name)), name
    # row 1's real tokens sit in the shards they sit in alone (indices shifted by the 14 pad tokens)
    for s in range(4):
        index = padded.shards[s].index[1].long()  # (HKV, L)
        real = padded.valid[1].gather(-1, index)
        for h in range(HKV):
            assert (index[h][real[h]] - 14).tolist() == alone.shards[s].index[0, h].tolist()
    assert torch.equal(padded.key_min[1], alone.key_min[0]) and torch.equal(padded.key_max[1], alone.key_max[0])
    torch.testing.assert_close(padded.key_sum[1], alone.key_sum[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(padded.key_count[1], alone.key_count[0])
    assert bool((padded.key_count[1].sum(-1) == alone.sharded_length).all())
    assert bool((padded.key_count[0].sum(-1) == padded.sharded_length).all())  # row 0 has no padding
    assert bool((padded.valid[1, :, :14] == 0).all()) and bool(padded.valid[1, :, 14:].all())
    # crops and evictions keep the padding known: summaries recomputed from the real keys the shards still hold
    padded.crop(45)
    kept = padded.evict(torch.arange(45).flip(-1).expand(B, HKV, 45).contiguous(), budget=30)
    assert padded.valid.shape == (B, HKV, 30) and torch.equal(
        padded.valid, valid[:, None].expand(-1, HKV, -1)[..., :45].gather(-1, kept)
    )
    for s, shard in padded.local_shards:
        real = padded.valid.gather(-1, shard.index.long())
        assert torch.equal(padded.key_count[:, :, s], real.sum(-1))
        k = shard.keys.masked_fill(~real[..., None], float("-inf"))
        torch.testing.assert_close(padded.key_max[:, :, s], k.amax(2))


def test_a_shard_of_padding_only_is_never_read_for_its_row():
    keys, values = random_kv(50, seed=23)
    valid = torch.ones(B, 50, dtype=torch.bool)
    valid[1, :46] = False  # every sharded token of row 1 is padding; only the tail holds real ones
    layer = _layer_with_padding(
        keys, values, valid, [random_kv(1, seed=24)], num_shards=4, tail_length=4, top_k_shards=1
    )
    assert layer.key_count[1].sum() == 0
    assert bool((layer.key_min[1] == float("inf")).all()) and bool((layer.key_max[1] == float("-inf")).all())
    query = torch.randn(B, HKV * G, 1, D, generator=torch.Generator().manual_seed(25))
    counts = torch.tensor(layer.shard_lengths).expand(B, HKV, 4)
    for method in ("bound", "centroid"):
        scores = shard_scores(query.reshape(B, HKV, G, D), layer.key_min, layer.key_max, layer.key_sum, counts, method)
        assert bool((scores[1] == float("-inf")).all()) and bool(torch.isfinite(scores[0]).all())
        assert not bool(select_shards(scores, 1)[1].any())
    keep = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)[:, None, None, :]
    out = sharded_layer_attention(nn.Module(), query, layer.tail_keys, layer.tail_values, keep, layer, scaling=0.3)
    assert bool(torch.isfinite(out).all())
    k, v = layer.dequantized()
    torch.testing.assert_close(out[1:], dense_reference(query[1:], k[1:], v[1:], 0.3, keep[1:]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def forced_logits(model, ids, mask, press, forced):
    """``(B, 1 + steps, V)`` logits: the prefill's last position, then each of ``forced`` ``(B, steps)`` fed in turn
    (teacher forcing, so that two runs compare step by step even where their greedy tokens would differ)."""
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with press(model):
        logits = [
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits[:, -1]
        ]
        for step in range(forced.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=forced[:, step : step + 1], attention_mask=mask, position_ids=positions, past_key_values=cache
            )
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), cache


@pytest.mark.parametrize("top_k", [1, None], ids=["top1", "every_shard"])
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_left_padded_row_decodes_as_alone_whatever_its_pad_tokens(family, top_k):
    """A left-padded row of a batch of two decodes (8 teacher-forced steps, decode tokens flushed to the shards)
    exactly as with other pad tokens and as alone without padding: its shard summaries and placement ignore the
    padding and the other row. With top-1 shards this needs the padding fully out of the summaries and the
    row's real tokens placed as alone (the same k-means, the same balanced split); with every shard read the
    attention is exact whatever the placement."""
    model = get_tiny_model(family)
    gen = torch.Generator().manual_seed(13)
    ids = torch.randint(3, 259, (2, 64), generator=gen)
    forced = torch.randint(3, 259, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # row 1 left-padded by 20
    make = lambda: PiKVPress(sharding={"num_shards": 2, "top_k_shards": top_k, "tail_length": 4, "flush_tokens": 1})
    runs = []
    for pad in (torch.zeros(20, dtype=torch.long), torch.randint(3, 259, (20,), generator=gen)):
        padded = ids.clone()
        padded[1, :20] = pad
        runs.append(forced_logits(model, padded, mask, make(), forced))
    (logits, cache), (repadded, _) = runs
    alone, _ = forced_logits(model, ids[1:, 20:], mask[1:, 20:], make(), forced[1:])
    torch.testing.assert_close(logits[1], repadded[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0], repadded[0], rtol=0, atol=1e-5)
    layers = [layer for layer in cache.layers if isinstance(layer, ShardedKVLayer)]
    assert layers and all(layer.sharded_length > 64 - 4 for layer in layers)  # the padding is in the shards
    assert all(bool((layer.key_count[1].sum(-1) == layer.sharded_length - 20).all()) for layer in layers)
    if top_k == 1:  # and the top-1 read really skipped shards
        for layer in layers:
            every = sum(shard.kv_nbytes for shard in layer.shards) + 2 * layer.tail_keys.numel() * 4
            assert layer.bytes_read < every


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_left_padded_batch_decodes_as_dense(family):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pikvpress import apply_kvpress_fixes, remove_kvpress_fixes
    from pikvpress.attention import _dispatched

    model = get_tiny_model(family)
    enable_packed_attention(model)
    # the compatibility layer turned off and on again keeps pikvpress's dispatch, and passes a pikvpress layer's
    # part through unaligned (aligning would cut the mask to the tail's length and lose the shards' padding)
    remove_kvpress_fixes()
    apply_kvpress_fixes()
    impl = model.config._attn_implementation
    if impl != "eager":
        assert _dispatched(ALL_ATTENTION_FUNCTIONS[impl])
    ids = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(14))
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dense = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
        cache = ExpertShardedCache(num_shards=3, tail_length=2, flush_tokens=1, config=model.config)
        sharded = model.generate(ids, past_key_values=cache, **kwargs)
    assert max(float((a - b).abs().max()) for a, b in zip(dense.logits, sharded.logits)) <= 1e-4


def test_pikv_press_arguments():
    from dataclasses import FrozenInstanceError, replace

    from pikvpress import ExpertRoutingPress, PiKVPress, QuantizationPress, ShardingOptions

    press = PiKVPress(compression_ratio=0.5, compression={"bits": 2, "key_group_size": 8}, scheduling={"budget": 64})
    assert press.routing.compression_ratio == 0.5 and press.compression.bits == 2 and press.scheduling.budget == 64
    assert press.sharding.tail_length == QuantizationPress().residual_length and press.compresses_while_decoding
    assert PiKVPress().routing is None and PiKVPress().sharding == ShardingOptions(tail_length=32)
    options = ShardingOptions(num_shards=8, top_k_shards=2)  # one frozen set of options for press, cache and layer
    assert PiKVPress(sharding=options).sharding == replace(options, tail_length=32)
    assert ExpertShardedCache(options).options is options and ShardedKVLayer(options).options is options
    assert ShardedKVLayer(options, tail_length=3).tail_length == 3 and options.tail_length is None
    with pytest.raises(ValueError, match=r"sharding has no option \['shards'\]"):
        PiKVPress(sharding={"shards": 2})
    with pytest.raises(FrozenInstanceError):
        options.num_shards = 2
    with pytest.raises(ValueError, match="differs from the routing press"):
        PiKVPress(routing=ExpertRoutingPress(0.25), compression_ratio=0.5)
    with pytest.raises(ValueError, match="routing must be a ExpertRoutingPress instance"):
        PiKVPress(routing="learned")
    with pytest.raises(ValueError, match="give exactly one of budget"):
        PiKVPress(scheduling={})
    with pytest.raises(ValueError, match="top_k_shards must be None or an int in 1..num_shards=2"):
        PiKVPress(sharding={"num_shards": 2, "top_k_shards": 3})
    with pytest.raises(ValueError, match="devices or process_group"):
        PiKVPress(process_group="default", sharding={"num_shards": 2, "devices": ["cpu", "cpu"]})
    with pytest.raises(ValueError, match="spread evenly over 3 devices"):
        PiKVPress(sharding={"num_shards": 4, "devices": ["cpu"] * 3})
