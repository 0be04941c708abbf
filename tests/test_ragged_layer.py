"""RaggedKVLayer: each (batch row, KV head) holds exactly its kept tokens; attention over it equals dense attention
over those tokens; bytes, crops and batch operations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pikvpress.cache.layer_base import DISPATCHED
from pikvpress.cache.ragged_layer import RaggedKVLayer, RaggedKVView
from pikvpress.kernels.ragged_reference import ragged_attention_partial, ragged_offsets, ragged_rows
from pikvpress.ragged_attention import ragged_layer_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(b=2, hkv=2, hq=4, t=24, dk=16, dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hkv, t, dk, generator=g).to(dtype)
    values = torch.randn(b, hkv, t, dv, generator=g).to(dtype)
    keep = torch.rand(b, hkv, t, generator=g) < 0.5
    keep[0, -1] = False  # an empty head
    keep[-1, 0] = True  # a full one
    return keys, values, keep, g


def _dense_over_kept(q, keys, values, keep, scale, extra_keys=None, extra_values=None, causal=False):
    """Attention of every query row over exactly the kept tokens of its KV head (then ``extra`` tokens, causal among
    the last ``Lq`` of them), head by head in float64: the ground truth."""
    b, hq, lq, _ = q.shape
    hkv = keys.shape[1]
    out = torch.zeros(b, hq, lq, values.shape[-1], dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            k = keys[i, kv][keep[i, kv]].double()
            v = values[i, kv][keep[i, kv]].double()
            for j in range(lq):
                kk, vv = k, v
                if extra_keys is not None:
                    r = extra_keys.shape[2]
                    visible = r - lq + j + 1 if causal else r
                    kk = torch.cat([k, extra_keys[i, kv, :visible].double()])
                    vv = torch.cat([v, extra_values[i, kv, :visible].double()])
                if kk.shape[0] == 0:
                    continue
                w = torch.softmax(kk @ q[i, h, j].double() * scale, dim=0)
                out[i, h, j] = w @ vv
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq", [1, 3])
def test_ragged_partial_equals_dense_attention_over_kept_tokens(dtype, lq):
    keys, values, keep, g = _inputs(dtype=dtype)
    q = torch.randn(2, 4, lq, 16, generator=g).to(dtype)
    scale = 16**-0.5
    out, lse = ragged_attention_partial(q, keys[keep], values[keep], ragged_offsets(keep.sum(-1)), scale)
    expected = _dense_over_kept(q, keys, values, keep, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    # the empty head (batch row 0, KV head 1: query heads 2 and 3) is an empty partial
    assert torch.isneginf(lse[0, 2:]).all() and (out[0, 2:] == 0).all()
    assert torch.isfinite(lse[1]).all()


def test_ragged_partial_token_mask_drops_tokens():
    keys, values, keep, g = _inputs()
    q = torch.randn(2, 4, 1, 16, generator=g)
    flat_k, flat_v, offsets = keys[keep], values[keep], ragged_offsets(keep.sum(-1))
    drop = torch.rand(flat_k.shape[0], generator=g) < 0.3
    out, _ = ragged_attention_partial(q, flat_k, flat_v, offsets, 0.25, keep=~drop)
    fewer = keep.clone()
    fewer[keep] = ~drop
    torch.testing.assert_close(out.double(), _dense_over_kept(q, keys, values, fewer, 0.25), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one bool per stored token"):
        ragged_attention_partial(q, flat_k, flat_v, offsets, 0.25, keep=drop[:-1])
    with pytest.raises(ValueError, match="offsets describe"):
        ragged_attention_partial(q, flat_k, flat_v, offsets[:-1], 0.25)


def test_ragged_rows_select_repeat_and_reorder_heads():
    lengths = torch.tensor([2, 0, 3, 1])
    offsets = ragged_offsets(lengths)
    assert offsets.tolist() == [0, 2, 2, 5, 6]
    assert ragged_rows(offsets, torch.tensor([2, 0, 2, 1])).tolist() == [2, 3, 4, 0, 1, 2, 3, 4]
    assert ragged_rows(offsets, torch.tensor([1])).tolist() == []


def test_layer_holds_exactly_the_kept_tokens():
    keys, values, keep, _ = _inputs(dtype=torch.bfloat16)
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    n = int(keep.sum())
    assert layer.head_lengths.tolist() == keep.sum(-1).tolist()
    per_token = (keys.shape[-1] + values.shape[-1]) * 2  # bf16 keys and values
    index_bytes = (keep.shape[0] * keep.shape[1] + 1) * 8 + n * 2  # int64 offsets, int16 positions
    assert layer.nbytes == n * per_token + index_bytes
    assert layer.nbytes < keys.numel() * 2 + values.numel() * 2  # less than the dense layer it came from
    assert layer.get_seq_length() == keys.shape[2]
    assert isinstance(layer.keys, RaggedKVView) and layer.keys.shape == keys.shape
    torch.testing.assert_close(layer.keys.dequantize(), keys * keep[..., None])
    torch.testing.assert_close(layer.values.dequantize(), values * keep[..., None])
    assert torch.equal(layer.dense_keep(), keep)


def test_from_indices_keeps_each_heads_first_counts():
    keys, values, _, _ = _inputs(b=1, hkv=2, t=10)
    indices = torch.tensor([[[7, 2, 5, 0], [1, 9, 3, 4]]])
    counts = torch.tensor([[3, 1]])
    layer = RaggedKVLayer.from_indices(keys, values, indices, counts)
    assert layer.head_lengths.tolist() == [[3, 1]]
    assert layer.positions.tolist() == [2, 5, 7, 1]
    torch.testing.assert_close(
        layer.body_keys, torch.stack([keys[0, 0, 2], keys[0, 0, 5], keys[0, 0, 7], keys[0, 1, 1]])
    )


def test_append_crop_and_the_pipelines_crop_by_view():
    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    body = layer.nbytes
    new_k, new_v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    layer.append(new_k, new_v)
    assert layer.get_seq_length() == 24 + 5 and layer.tail_length == 5
    layer.keys = layer.keys[:, :, :26]  # kvpress's pipeline removes the answer this way
    layer.values = layer.values[:, :, :26]
    assert layer.tail_length == 2 and torch.equal(layer.tail_keys, new_k[:, :, :2])
    layer.crop(24)
    assert layer.nbytes == body
    layer.crop(10)  # into the body: every kept token at a position from 10 on goes
    assert layer.get_seq_length() == 10
    assert layer.head_lengths.tolist() == keep[..., :10].sum(-1).tolist()
    torch.testing.assert_close(layer.keys.dequantize(), (keys * keep[..., None])[:, :, :10])
    with pytest.raises(TypeError, match="can only be cropped"):
        layer.keys = keys


@pytest.mark.parametrize(
    "op, rows",
    [
        (lambda layer: layer.batch_select_indices(torch.tensor([1])), [1]),
        (lambda layer: layer.batch_repeat_interleave(2), [0, 0, 1, 1]),
        (lambda layer: layer.reorder_cache(torch.tensor([1, 0])), [1, 0]),
    ],
)
def test_batch_operations_move_each_rows_heads(op, rows):
    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    layer.append(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 8, generator=g))
    dense_k, dense_v = layer.keys.dequantize(), layer.values.dequantize()
    op(layer)
    assert layer.batch == len(rows)
    torch.testing.assert_close(layer.keys.dequantize(), dense_k[rows])
    torch.testing.assert_close(layer.values.dequantize(), dense_v[rows])
    assert torch.equal(layer.dense_keep()[:, :, :24], keep[rows])


def test_update_refuses_an_attention_function_that_would_read_the_dropped_tokens():
    keys, values, keep, _ = _inputs()
    never = "an_attention_no_model_runs"  # not named by enable_packed_attention
    config = SimpleNamespace(_attn_implementation=never, model_type="llama")
    layer = RaggedKVLayer.from_kept(keys, values, keep, config=config)
    assert never not in DISPATCHED
    with pytest.raises(RuntimeError, match="enable_packed_attention"):
        layer.update(keys[:, :, :1], values[:, :, :1])


@pytest.mark.parametrize("lq", [1, 4])
@pytest.mark.parametrize("sinks", [False, True])
def test_layer_attention_equals_dense_attention_over_the_kept_tokens_and_the_tail(lq, sinks):
    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    tail_k, tail_v = torch.randn(2, 2, 2 + lq, 16, generator=g), torch.randn(2, 2, 2 + lq, 8, generator=g)
    layer.append(tail_k, tail_v)
    q = torch.randn(2, 4, lq, 16, generator=g)
    scale = 0.3
    s_aux = torch.randn(4, generator=g) if sinks else None
    out = ragged_layer_attention(torch.nn.Module(), q, tail_k, tail_v, None, layer, scale, s_aux)
    expected = _dense_over_kept(q, keys, values, keep, scale, tail_k, tail_v, causal=True)
    if sinks:  # one more logit per query head, with no value: rescales each row by its mass
        logits_mass = _mass(q, keys, keep, scale, tail_k, lq)
        expected = expected * (logits_mass / (logits_mass + torch.exp(s_aux.double())[None, :, None]))[..., None]
    assert out.shape == (2, lq, 4, 8)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


def _mass(q, keys, keep, scale, tail_k, lq):
    """sum of exp(logits) of each query row over its kept tokens and its visible tail tokens (float64)."""
    b, hq = q.shape[:2]
    hkv = keys.shape[1]
    mass = torch.zeros(b, hq, lq, dtype=torch.float64)
    r = tail_k.shape[2]
    for i in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for j in range(lq):
                kk = torch.cat([keys[i, kv][keep[i, kv]], tail_k[i, kv, : r - lq + j + 1]]).double()
                mass[i, h, j] = torch.exp(kk @ q[i, h, j].double() * scale).sum()
    return mass


def test_layer_attention_reads_the_padding_mask_at_the_tokens_positions():
    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    tail_k, tail_v = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    layer.append(tail_k, tail_v)
    q = torch.randn(2, 4, 1, 16, generator=g)
    padding = torch.ones(2, 25, dtype=torch.long)
    padding[1, :6] = 0  # row 1 left-padded by 6 positions
    out = ragged_layer_attention(torch.nn.Module(), q, tail_k, tail_v, padding, layer, 0.25)
    visible = keep.clone()
    visible[1, :, :6] = False
    expected = _dense_over_kept(q, keys, values, visible, 0.25, tail_k, tail_v, causal=True)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    assert not math.isclose(float(out[1].abs().sum()), float(_no_mask(layer, q, tail_k, tail_v)[1].abs().sum()))


def _no_mask(layer, q, tail_k, tail_v):
    return ragged_layer_attention(torch.nn.Module(), q, tail_k, tail_v, None, layer, 0.25)


def test_rows_of_ragged_layers_read_as_one_stack_as_each_alone():
    """A decode step over several sequences' own ragged layers (batched answering) reads them as one flat store;
    each row gets the output it gets alone."""
    from pikvpress.rows_attention import stack_groups, stacked_rows_attention

    rows, tails, alone = [], [], []
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 1, 16, generator=g)
    for i, t in enumerate((24, 17, 30)):
        keys, values, keep, _ = _inputs(b=1, t=t, seed=i)
        layer = RaggedKVLayer.from_kept(keys, values, keep)
        tail = (torch.randn(1, 2, 2 + i, 16, generator=g), torch.randn(1, 2, 2 + i, 8, generator=g))
        layer.append(*tail)
        rows.append(layer)
        tails.append(tail)
        alone.append(ragged_layer_attention(torch.nn.Module(), q[i : i + 1], *tail, None, layer, 0.25))
    assert stack_groups(rows, q.device) == [[0, 1, 2]]
    stacked = stacked_rows_attention(q, rows, tails, 0.25)
    torch.testing.assert_close(stacked, torch.cat(alone), atol=1e-6, rtol=1e-5)


def test_evict_keeps_each_heads_best_held_tokens_and_compacts_the_positions():
    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    layer.append(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 8, generator=g))
    dense_k, held = layer.keys.dequantize(), layer.dense_keep()
    n = layer.get_seq_length()
    order = torch.rand(2, 2, n, generator=g).argsort(-1)
    budget = 5
    columns = layer.evict(order, budget)
    # brute force: each head's first `budget` held positions in its order
    expected = torch.zeros_like(held)
    for b in range(2):
        for h in range(2):
            mine = [int(p) for p in order[b, h] if held[b, h, p]][:budget]
            expected[b, h, mine] = True
    assert layer.head_lengths.tolist() == expected.sum(-1).tolist()
    assert int(layer.head_lengths.max()) <= budget
    assert torch.equal(columns[0, 0], expected.reshape(-1, n).any(0).nonzero().squeeze(-1))
    assert layer.get_seq_length() == columns.shape[-1] and layer.tail_length == 0
    assert torch.equal(layer.dense_keep(), expected[..., columns[0, 0]])
    torch.testing.assert_close(layer.keys.dequantize(), (dense_k * expected[..., None])[:, :, columns[0, 0]])


def test_step_probabilities_over_a_ragged_layer_skip_the_dropped_tokens():
    from pikvpress.scheduling.attention import layer_step_probs

    keys, values, keep, g = _inputs()
    layer = RaggedKVLayer.from_kept(keys, values, keep)
    layer.append(torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 8, generator=g))
    probs = layer_step_probs(layer, torch.randn(2, 4, 2, 16, generator=g), 24)  # (B, H, 2 steps, 26)
    held = layer.dense_keep()
    assert (probs.masked_select(~held[:, :, None, :]) == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 2))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_packed_body_holds_codes_and_reads_as_its_dequantized_tokens(bits):
    from pikvpress.kernels.quantize import dequantize, quantize_values

    keys, values, keep, g = _inputs()
    packing = {"bits": bits, "group_size": 8, "stats_dtype": torch.float16}
    layer = RaggedKVLayer.from_kept(keys, values, keep, packing=packing)
    n = int(keep.sum())
    codes = n * (16 + 8) * bits // 8
    stats = n * (16 // 8 + 8 // 8) * 2 * 2  # a scale and a zero point (float16) per token and channel group
    assert layer.nbytes == codes + stats + (2 * 2 + 1) * 8 + n * 2
    dq_keys = dequantize(quantize_values(keys[keep].view(1, 1, n, 16), bits, 8, torch.float16), torch.float32)
    expected_keys = torch.zeros_like(keys)
    expected_keys[keep] = dq_keys.view(n, 16)
    torch.testing.assert_close(layer.keys.dequantize(), expected_keys)
    # attention is exact over the dequantized kept tokens
    tail_k, tail_v = torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 8, generator=g)
    layer.append(tail_k, tail_v)
    q = torch.randn(2, 4, 2, 16, generator=g)
    out = ragged_layer_attention(torch.nn.Module(), q, tail_k, tail_v, None, layer, 0.25)
    dense_k, dense_v = layer.keys.dequantize()[:, :, :24], layer.values.dequantize()[:, :, :24]
    expected = _dense_over_kept(q, dense_k, dense_v, keep, 0.25, tail_k, tail_v, causal=True)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    # crops, rows and evictions keep the codes of the tokens they keep
    before = layer.keys.dequantize()
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.keys.dequantize(), before[[1]])
    layer.crop(10)
    torch.testing.assert_close(layer.keys.dequantize(), before[[1], :, :10])
    kept = layer.evict(torch.arange(10).flip(0).expand(1, 2, 10), 3)
    assert int(layer.head_lengths.max()) <= 3 and layer.packing == packing
    expected = before[[1], :, :10][:, :, kept[0, 0]] * layer.dense_keep()[..., None]
    torch.testing.assert_close(layer.keys.dequantize(), expected)  # requantized on the same per-token grid


def test_bad_packing_is_named():
    keys, values, keep, _ = _inputs()
    for packing, match in [
        ({"bits": 3, "group_size": 8, "stats_dtype": torch.float16}, "bits"),
        ({"bits": 4, "group_size": 6, "stats_dtype": torch.float16}, "group_size"),
        ({"bits": 4, "group_size": 8, "stats_dtype": torch.float32}, "stats_dtype"),
        ({"bits": 4}, "keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            RaggedKVLayer.from_kept(keys, values, keep, packing=packing)
