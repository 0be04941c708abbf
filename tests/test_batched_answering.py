"""Batched answering (pikvpress_eval.batching): every row of a batch answers exactly as it would alone.

Each row's reference is kvpress's own ``pipeline.generate_answer`` over the row's own compressed cache (built from a
shared prefill by ``replay_press``), with the logits of every forward recorded; the batch combines the rows' caches
(left padding and a mask for dense layers, the rows' own layers for packed and sharded ones) and answers all rows in
one greedy loop. Rows differ in context length, question length and answer budget.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from kvpress import (
    AdaKVPress,
    CriticalAdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    PyramidKVPress,
    SnapKVPress,
)
from pikvpress_eval import batching as batching_module
from pikvpress_eval.batching import (
    Answering,
    Job,
    RowCache,
    answer_batch,
    answer_combined,
    answer_stream,
    batching_blocker,
    combine_caches,
    masked_key_indices,
)
from pikvpress_eval.config import load_config
from pikvpress_eval.prefill import capture_prefill, replay_press
from pikvpress_eval.presses import keeps_every_token
from pikvpress_eval.runner import Evaluator, plan_runs
from pikvpress_eval.runs import PREDICTIONS
from transformers import pipeline

from pikvpress import PiKVPress, QuantizationPress, RaggedPress
from pikvpress.cache import PaddedKVLayer, RowBatchedLayer, cache_bytes_read
from pikvpress.models import tiny_model, tiny_tokenizer

CONTEXTS = (70, 95, 83, 101)
QUESTIONS = (6, 11, 3, 1)
BUDGETS = (7, 4, 12, 9)

PACKING = {"bits": 4, "key_group_size": 8, "residual_length": 8}  # small groups: the answers pack tokens as they go
PRESSES = {
    "no_press": lambda: None,
    "snapkv": lambda: SnapKVPress(compression_ratio=0.5, window_size=8),
    "knorm": lambda: KnormPress(compression_ratio=0.4),
    "adakv": lambda: AdaKVPress(ExpectedAttentionPress(compression_ratio=0.5)),
    "critical_adakv": lambda: CriticalAdaKVPress(KnormPress(compression_ratio=0.5)),
    # the AdaKV choice held as ragged layers: each row's own layer, its heads read as one flat store at a decode step
    "ragged_adakv": lambda: RaggedPress(AdaKVPress(ExpectedAttentionPress(compression_ratio=0.5))),
    "pyramidkv": lambda: PyramidKVPress(compression_ratio=0.5, window_size=8),  # layers of different lengths
    "quantization": lambda: QuantizationPress(**PACKING),
    "pikv_dense": lambda: PiKVPress(compression_ratio=0.5, sharding={"num_shards": 4, "tail_length": 8}),
    "pikv_packed": lambda: PiKVPress(compression_ratio=0.5, compression=PACKING, sharding={"num_shards": 4}),
    "pikv_packed_top2": lambda: PiKVPress(
        compression_ratio=0.5, compression=PACKING, sharding={"num_shards": 4, "top_k_shards": 2, "flush_tokens": 2}
    ),
}
DENSE = {"no_press", "snapkv", "knorm", "adakv", "critical_adakv", "pyramidkv"}
#: float64 logits agree to rounding; float32 close (the batch's matmuls sum in another order)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def tolerance(name: str, dtype: torch.dtype) -> float:
    """Attention over packed and sharded layers computes in float32 whatever the model's dtype (the kernels' and
    their CPU references' contract), and a decode step reads a batch's packed or sharded rows as one stack
    (``pikvpress.rows_attention``): their rows agree to float32 rounding in a float64 model too."""
    return TOLERANCE[torch.float32 if name not in DENSE else dtype]

_MODELS: dict = {}


def model_of(dtype: torch.dtype):
    if dtype not in _MODELS:
        _MODELS[dtype] = tiny_model("llama", dtype=dtype)
    return _MODELS[dtype]


def inputs(n: int = len(CONTEXTS)):
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, 250, (1, length), generator=g) for length in CONTEXTS[:n]]
    questions = [torch.randint(3, 250, (1, length), generator=g) for length in QUESTIONS[:n]]
    return contexts, questions, list(BUDGETS[:n])


@torch.no_grad()
def solo(model, tokenizer, prefill, press, question, budget):
    """kvpress's generate_answer over the row's own cache: (answer, token ids, logits per forward, bytes read)."""
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    cache = replay_press(model, prefill, press)
    logits, reads = [], []

    def hook(module, args, kwargs, output):
        logits.append(output.logits[0, -1].clone())
        reads.append(cache_bytes_read(kwargs["past_key_values"]))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        answer = pipe.generate_answer(question, cache, prefill.context_length, budget)
    finally:
        handle.remove()
    return answer, [int(x.argmax()) for x in logits], logits, reads[-1]


@torch.no_grad()
def row_caches(model, prefills, make):
    rows = []
    for prefill in prefills:
        cache = replay_press(model, prefill, make())
        rows.append(RowCache(cache, prefill.context_length, masked_key_indices(model)))
    return rows


def check_batch_against_solo(model, name, n_rows=None):
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs(n_rows or len(CONTEXTS))
    prefills = [capture_prefill(model, c) for c in contexts]
    make = PRESSES[name]
    expected = [solo(model, tokenizer, p, make(), q, m) for p, q, m in zip(prefills, questions, budgets)]
    rows = row_caches(model, prefills, make)
    answers = answer_batch(model, tokenizer, rows, questions, budgets, keep_logits=True)
    tol = tolerance(name, model.dtype)
    for i, (got, (text, ids, logits, read)) in enumerate(zip(answers, expected)):
        assert got.token_ids == ids, (name, i)
        assert got.text == text, (name, i)
        assert len(got.logits) == len(logits), (name, i)
        for step, (a, b) in enumerate(zip(got.logits, logits)):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (name, i, step, float((a - b).abs().max()))
        assert got.kv_bytes_read == read, (name, i)  # the row's own last step, exactly
    return answers, expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(PRESSES))
def test_each_row_answers_as_it_would_alone(name, dtype):
    if dtype == torch.float64 and name.startswith("pikv_packed"):
        pytest.skip("packed shards attend with the packed kernel, which takes float16/bfloat16/float32 (alone too)")
    model = model_of(dtype)
    _, expected = check_batch_against_solo(model, name)
    assert {len(ids) for _, ids, _, _ in expected} == set(BUDGETS)  # every row ran to its own budget


@pytest.mark.parametrize("name", ["no_press", "adakv", "pyramidkv", "quantization", "pikv_packed_top2"])
def test_combine_pads_dense_layers_and_keeps_the_rows_own_packed_and_sharded_layers(name):
    model = model_of(torch.float32)
    contexts, _, _ = inputs()
    rows = row_caches(model, [capture_prefill(model, c) for c in contexts], PRESSES[name])
    batch = combine_caches(model, rows)
    if name in DENSE:
        assert batch.mode == "padded"
        for idx, layer in enumerate(batch.cache.layers):  # each layer padded to its own longest row
            lengths = [row.cache.layers[idx].keys.shape[2] for row in rows]
            assert isinstance(layer, PaddedKVLayer) and layer.keys.shape[2] == max(lengths)
            assert layer.valid.sum(1).tolist() == lengths  # left padding, marked
            assert layer.padding() == [max(lengths) - n for n in lengths]
            for i, row in enumerate(rows):
                assert torch.equal(layer.keys[i, :, max(lengths) - lengths[i] :], row.cache.layers[idx].keys[0])
        if name == "adakv":  # each row's head-wise masked keys, moved by its left padding into its batch row
            shifted, padding = batch.masked_key_indices[1], batch.cache.layers[1].padding()
            assert set(shifted[0].tolist()) == set(range(len(rows)))
            for i, row in enumerate(rows):
                seq = shifted[2][shifted[0] == i]
                assert sorted(seq.tolist()) == sorted((row.masked(1)[2] + padding[i]).tolist())
        if name == "pyramidkv":  # one row's layers have different lengths: each layer carries its own padding
            assert len({layer.keys.shape[2] for layer in rows[0].cache.layers}) > 1
    else:
        assert batch.mode == "rows"
        layer = batch.cache.layers[0]
        assert isinstance(layer, RowBatchedLayer) and layer.rows == [row.cache.layers[0] for row in rows]


@pytest.mark.parametrize("name", ["no_press", "adakv", "pyramidkv"])
def test_padded_keys_and_values_receive_no_attention(name):
    """Huge keys and values in every padded position of the batch change no answer: the mask hides them."""
    model = model_of(torch.float64)
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs()
    prefills = [capture_prefill(model, c) for c in contexts]
    lengths = [p.context_length for p in prefills]
    answers = []
    for corrupt in (False, True):
        batch = combine_caches(model, row_caches(model, prefills, PRESSES[name]))
        assert batch.mode == "padded" and any(int((~layer.valid).sum()) > 0 for layer in batch.cache.layers)
        if corrupt:
            g = torch.Generator().manual_seed(1)
            for layer in batch.cache.layers:
                pad = (~layer.valid)[:, None, :, None]
                noise = 1e4 * torch.randn(layer.keys.shape, generator=g, dtype=layer.keys.dtype)
                layer.keys = torch.where(pad, noise, layer.keys)
                layer.values = torch.where(pad, -noise, layer.values)
        answers.append(answer_combined(model, tokenizer, batch, lengths, questions, budgets, keep_logits=True))
    for clean, dirty in zip(*answers):
        assert clean.token_ids == dirty.token_ids
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(clean.logits, dirty.logits))


@pytest.mark.parametrize("name", ["no_press", "quantization"])
def test_the_pad_token_is_never_read(name):
    """The question's left padding and the tokens fed to finished rows change nothing, whatever the pad token."""
    model = model_of(torch.float32)
    contexts, questions, budgets = inputs()
    prefills = [capture_prefill(model, c) for c in contexts]
    runs = []
    for pad in (0, 77):
        tokenizer = tiny_tokenizer()
        tokenizer.pad_token_id = pad
        answers = answer_batch(
            model, tokenizer, row_caches(model, prefills, PRESSES[name]), questions, budgets, keep_logits=True
        )
        runs.append(answers)
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("no_press", torch.float64), ("adakv", torch.float64), ("quantization", torch.float64)],
)
def test_a_row_that_stops_early_keeps_its_answer_while_the_others_go_on(name, dtype):
    model = model_of(dtype)
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs()
    prefill = capture_prefill(model, contexts[2])  # the row with the largest budget
    _, ids, _, _ = solo(model, tokenizer, prefill, PRESSES[name](), questions[2], budgets[2])
    stop = ids[2]  # generate_answer never checks the first token; stopping on the third one ends the answer there
    assert stop not in ids[1:2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [saved, stop]
    try:
        answers, _ = check_batch_against_solo(model, name)
    finally:
        model.generation_config.eos_token_id = saved
    assert answers[2].token_ids == ids[:3] and len(ids) == budgets[2] > 3  # stopped on the stop token, kept it
    assert any(len(a.token_ids) > 3 for a in answers)  # the others went on after it


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "name", ["no_press", "snapkv", "adakv", "critical_adakv", "pyramidkv", "pikv_packed_top2", "ragged_adakv"]
)
def test_batches_set_aside_go_on_together_and_answer_as_alone(name, dtype):
    """Two batches each answer until one row is left, are set aside, and go on as one merged batch (re-padded, the
    masked keys shifted with their rows): every row's tokens, logits and bytes read are what it gives alone."""
    if dtype == torch.float64 and name.startswith("pikv_packed"):
        pytest.skip("packed shards attend with the packed kernel, which takes float16/bfloat16/float32 (alone too)")
    model = model_of(dtype)
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs()
    prefills = [capture_prefill(model, c) for c in contexts]
    make = PRESSES[name]
    expected = [solo(model, tokenizer, p, make(), q, m) for p, q, m in zip(prefills, questions, budgets)]
    rows = row_caches(model, prefills, make)
    parts, got = [], {}
    for members in ([0, 3], [2, 1]):  # budgets 7, 9 and 12, 4: each batch is left with one row
        batch = combine_caches(model, [rows[i] for i in members], reserve=20)
        part = Answering.start(
            model,
            tokenizer,
            batch,
            [rows[i].context_length for i in members],
            [questions[i] for i in members],
            [budgets[i] for i in members],
            keys=members,
            keep_logits=True,
        )
        part.run(park_at=1)
        assert part.active == 1 and len(part.slots) == 1  # the batch holds only the row still answering
        got.update(part.pop_finished())
        parts.append(part)
    assert sorted(got) == [0, 1]
    sizes = []
    handle = model.register_forward_hook(lambda m, a, kw, out: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        merged = Answering.merge(parts)
        assert merged.batch.batch_size == 2 and not parts[0].slots
        merged.run()
    finally:
        handle.remove()
    assert sizes[0] == 2 and sizes[-1] == 1
    got.update(merged.pop_finished())
    tol = tolerance(name, dtype)
    for i, (text, ids, logits, read) in enumerate(expected):
        assert got[i].token_ids == ids and got[i].text == text, (name, i)
        assert len(got[i].logits) == len(logits) == budgets[i]
        for step, (a, b) in enumerate(zip(got[i].logits, logits)):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (name, i, step, float((a - b).abs().max()))
        assert got[i].kv_bytes_read == read, (name, i)
        assert got[i].seconds > 0


def test_merging_refuses_rows_that_have_ended_and_mixed_combines():
    model = model_of(torch.float32)
    tokenizer = tiny_tokenizer()
    contexts, questions, _ = inputs()
    prefills = [capture_prefill(model, c) for c in contexts[:2]]
    dense = row_caches(model, prefills, PRESSES["knorm"])
    packed = row_caches(model, prefills, PRESSES["pikv_packed"])
    parts = []
    for rows in (dense, packed):
        batch = combine_caches(model, rows, reserve=20)
        parts.append(Answering.start(model, tokenizer, batch, [r.context_length for r in rows], questions[:2], [9, 1]))
    with pytest.raises(ValueError, match="must hold only rows still answering"):
        Answering.merge(parts)  # a one-token answer has ended with the question's forward
    for part in parts:
        part.run(park_at=1)
        part.pop_finished()
    with pytest.raises(ValueError, match="combined as"):
        Answering.merge(parts)
    with pytest.raises(ValueError, match="parking needs drop_finished"):
        Answering(model, tokenizer, parts[0].batch, parts[0].slots, drop_finished=False).run(park_at=1)


def test_a_padded_layer_concatenates_rows_re_padded_to_the_longest():
    a = PaddedKVLayer(torch.ones(1, 2, 3, 4), -torch.ones(1, 2, 3, 4), torch.tensor([[False, True, True]]))
    b = PaddedKVLayer(
        2 * torch.ones(2, 2, 5, 4), -2 * torch.ones(2, 2, 5, 4), torch.tensor([[True] * 5, [False] * 2 + [True] * 3])
    )
    layer = PaddedKVLayer.concat([a, b], reserve=3)
    assert layer.keys.shape == (3, 2, 5, 4) and layer._room[0].shape == (3, 2, 8, 4)
    assert torch.equal(layer.valid[0], torch.tensor([False, False, False, True, True]))  # a's row: 2 more padding
    assert torch.equal(layer.valid[1:], b.valid)
    assert torch.equal(layer.keys[0, :, 2:], a.keys[0]) and bool((layer.keys[0, :, :2] == 0).all())
    assert torch.equal(layer.values[1:], b.values)
    layer.update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))  # appends in the room
    assert layer.keys.shape == (3, 2, 6, 4) and layer.keys.data_ptr() == layer._room[0].data_ptr()


def test_a_single_row_batch_is_the_row_alone():
    model = model_of(torch.float64)
    check_batch_against_solo(model, "snapkv", n_rows=1)


def sliding_model():
    """A tiny Qwen2 whose last two layers attend over a 16-token window."""
    layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    return tiny_model("qwen2", use_sliding_window=True, sliding_window=16, layer_types=layer_types)


def test_caches_that_cannot_be_batched_are_named():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = sliding_model()
    contexts, _, _ = inputs(2)
    rows = row_caches(model, [capture_prefill(model, c) for c in contexts], PRESSES["no_press"])
    assert batching_blocker(model, rows) == "the model has sliding-window layers [2, 3]"
    with pytest.raises(ValueError, match="cannot batch these caches: the model has sliding-window layers"):
        combine_caches(model, rows)
    window = DynamicSlidingWindowLayer(sliding_window=16)
    with pytest.raises(ValueError, match="row 1 cannot be batched: a sliding-window layer"):
        RowBatchedLayer([rows[0].cache.layers[0], window])


# --- the harness --------------------------------------------------------------------------------------------------

SWEEP = [
    "dataset=needle",
    "context_length=[160, 240]",
    "needle_depth=[0.25, 1.0]",
    "compression_ratio=[0.5]",
    "max_new_tokens=6",
    (
        "composed_presses={pikv_int4_top2: [{press: pikv, compression: {bits: 4, key_group_size: 8, residual_length: 8}, "
        "sharding: {num_shards: 4, top_k_shards: 2, flush_tokens: 2}}]}"
    ),
]
FIELDS = ("predicted_answer", "kv_bytes", "kv_bytes_read", "context_tokens", "bf16_kv_bytes")


def sweep(model, output_dir, presses, *extra):
    config = load_config(None, [*SWEEP, f"press_name=[{', '.join(presses)}]", f"output_dir={output_dir}", *extra])
    evaluator = Evaluator(config, model, tiny_tokenizer())
    evaluator.run()
    records = {}
    for run in plan_runs(config):
        lines = [json.loads(line) for line in (run.directory / PREDICTIONS).read_text().splitlines()]
        records[run.directory.name] = {r["index"]: r for r in lines}
    return records, evaluator.prefills


def test_harness_batches_record_what_one_at_a_time_records(tmp_path):
    model = tiny_model("llama")
    presses = ["no_press", "knorm", "adakv_expected_attention", "pyramidkv", "pikv_int4_top2"]
    one, prefills_one = sweep(model, tmp_path / "one", presses)
    batched, prefills_batched = sweep(model, tmp_path / "three", presses, "batch_size=3")
    assert prefills_one == prefills_batched == 4  # one prefill per sample, shared by every press
    assert one.keys() == batched.keys() and len(one) == len(presses)
    for run, records in one.items():
        assert records.keys() == batched[run].keys() == {0, 1, 2, 3}
        for index, record in records.items():
            for name in FIELDS:
                assert batched[run][index][name] == record[name], (run, index, name)
            assert batched[run][index]["seconds"] > 0
    record = next(records for run, records in one.items() if run.startswith("no_press__"))[0]
    assert record["kv_bytes"] == 2 * record["bf16_kv_bytes"]  # a float32 cache of the uncompressed prompt
    assert (
        record["context_tokens"] * 4 * 2 * 2 * 16 * 2 == record["bf16_kv_bytes"]
    )  # tokens x layers x k,v x heads x dim


def test_ragged_presses_in_the_harness_answer_as_their_masked_versions_and_hold_fewer_bytes(tmp_path):
    """``ragged_<name>`` (the registry's RaggedPress over a masked head-wise baseline) shares the prefill, batches,
    and records the masked press's answers, at the bytes of the tokens it kept (plus offsets and positions)."""
    model = tiny_model("llama")
    presses = ["adakv_snapkv", "ragged_adakv_snapkv", "critical_adakv_snapkv", "ragged_critical_adakv_snapkv"]
    records, prefills = sweep(model, tmp_path / "ragged", presses, "compression_ratio=[0.5]", "batch_size=3")
    assert prefills == 4
    by_press = {run.split("__")[0]: rows for run, rows in records.items()}
    for masked in ("adakv_snapkv", "critical_adakv_snapkv"):
        for index, record in by_press[masked].items():
            ragged = by_press[f"ragged_{masked}"][index]
            assert ragged["predicted_answer"] == record["predicted_answer"], (masked, index)
            assert record["kv_bytes"] == 2 * record["bf16_kv_bytes"]  # masked: every token held, in float32
            # ragged: half the tokens (AdaKV's budget over the heads), plus 2-byte positions and per-head offsets
            assert 0.97 < ragged["kv_bytes"] / (record["kv_bytes"] / 2) < 1.06, (masked, index)


def test_a_batch_answers_several_presses_and_ratios_of_one_prompt(tmp_path):
    """With more answers per batch than prompts in the sweep, a batch holds several (press, ratio) runs of the same
    prompt (dense and AdaKV-masked caches padded together, packed ones in their own batch); every record is the
    one-at-a-time record."""
    model = tiny_model("llama")
    presses = ["no_press", "knorm", "adakv_expected_attention", "snapkv", "pikv_int4_top2"]
    ratios = "compression_ratio=[0.25, 0.75]"
    one, _ = sweep(model, tmp_path / "one", presses, ratios)
    sizes = []
    handle = model.register_forward_hook(lambda m, a, kw, out: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        batched, _ = sweep(model, tmp_path / "eight", presses, ratios, "batch_size=8")
    finally:
        handle.remove()
    assert max(sizes) > 4  # 4 prompts in all: a batch this large mixes runs
    assert one.keys() == batched.keys() and len(one) == 2 * len(presses) - 1
    for run, records in one.items():
        for index, record in records.items():
            for name in FIELDS:
                assert batched[run][index][name] == record[name], (run, index, name)


def test_harness_sets_long_answers_aside_and_records_what_one_at_a_time_records(tmp_path, monkeypatch):
    """Answers of different lengths (every even token ends an answer): batches down to a quarter of their rows are
    set aside and go on merged; every record is still the one-at-a-time record."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = list(range(0, 256, 2))
    presses = ["no_press", "knorm", "adakv_expected_attention", "pyramidkv", "pikv_int4_top2"]
    extra = ("compression_ratio=[0.25, 0.75]", "max_new_tokens=12")
    one, _ = sweep(model, tmp_path / "one", presses, *extra)
    merged = []
    original = Answering.merge.__func__

    classes = []

    def counting(cls, parts):
        merged.append(sum(part.active for part in parts))
        if parts[0].batch.mode == "padded":  # dense rows merge only with rows of about their length
            classes.append({max(x.keys.shape[2] for x in part.batch.cache.layers).bit_length() for part in parts})
        return original(cls, parts)

    monkeypatch.setattr(batching_module.Answering, "merge", classmethod(counting))
    batched, _ = sweep(model, tmp_path / "eight", presses, *extra, "batch_size=8")
    assert merged and max(merged) > 2  # rows set aside by several batches went on together
    assert classes and all(len(c) == 1 for c in classes)
    lengths = {len(r["predicted_answer"]) for records in one.values() for r in records.values()}
    assert len(lengths) > 3  # the answers do differ in length
    assert one.keys() == batched.keys()
    for run, records in one.items():
        for index, record in records.items():
            for name in FIELDS:
                assert batched[run][index][name] == record[name], (run, index, name)


def test_the_stream_merges_dense_rows_only_with_rows_of_about_their_length(monkeypatch):
    """Three chunks (short caches, long caches, short caches) each leave two rows answering: the short ones go on
    together, the long ones wait for rows of their length (here: the end), and every answer is its own."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = [10**6]  # no stop token: the budgets decide
    tokenizer = tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(3, 250, (1, n), generator=g) for n in (200, 210, 190, 205)]
    question = torch.randint(3, 250, (1, 5), generator=g)
    prefills = [capture_prefill(model, c) for c in contexts]
    short = row_caches(model, prefills, lambda: KnormPress(compression_ratio=0.8))  # ~40 tokens
    long = row_caches(model, prefills, lambda: None)  # ~200 tokens
    budgets = [9, 9, 2, 2]
    chunks = [
        [Job((tag, i), rows[i], question, budgets[i]) for i in range(4)]
        for tag, rows in (("a", short), ("b", long), ("c", short))
    ]
    merges = []
    original = Answering.merge.__func__

    def recording(cls, parts):
        merges.append([sorted({key[0] for key in (row.key for row in part.slots)}) for part in parts])
        return original(cls, parts)

    monkeypatch.setattr(batching_module.Answering, "merge", classmethod(recording))
    answers = dict(answer_stream(model, tokenizer, chunks, batch_size=4, park_at=2))
    assert merges[0] == [["a"], ["c"]]  # the short rows of chunks a and c, not a with the long rows of b
    assert [["b"]] in merges  # b's long rows go on alone, at the end
    assert {key: len(a.token_ids) for key, a in answers.items()} == {
        (tag, i): budgets[i] for tag in "abc" for i in range(4)
    }


def test_jobs_go_from_the_fewest_kept_tokens_to_the_most():
    config = load_config(
        None,
        [
            *SWEEP,
            "press_name=[no_press, knorm, adakv_expected_attention, think, pikv_int4_top2]",
            "compression_ratio=[0.25, 0.75]",
        ],
    )
    evaluator = Evaluator(config, tiny_model("llama"), tiny_tokenizer())
    runs = sorted(plan_runs(config), key=evaluator._kept_share)
    shares = [(run.press_name, run.compression_ratio, evaluator._kept_share(run)) for run in runs]
    assert [s for _, _, s in shares] == sorted(s for _, _, s in shares)
    assert {name for name, _, share in shares if share == 1.0} == {"no_press", "adakv_expected_attention", "think"}
    assert shares[0][:2] in {("knorm", 0.75), ("pikv_int4_top2", 0.75)}
    assert keeps_every_token("critical_adakv_snapkv") and not keeps_every_token("snapkv")
    assert not keeps_every_token("pikv_int4_top2", config.composed_presses)


def test_max_answer_tokens_caps_budgets_and_never_raises_them(tmp_path):
    """A cap of 3 answers as a budget of 3 does; a cap of 50 leaves SWEEP's budget of 6 alone."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = [10**6]  # no stop token: the budgets decide
    presses = ["no_press", "knorm"]
    capped, _ = sweep(model, tmp_path / "cap3", presses, "max_answer_tokens=3", "batch_size=4")
    three, _ = sweep(model, tmp_path / "three", presses, "max_new_tokens=3", "batch_size=4")
    loose, _ = sweep(model, tmp_path / "cap50", presses, "max_answer_tokens=50", "batch_size=4")
    six, _ = sweep(model, tmp_path / "six", presses, "batch_size=4")
    answers = {
        name: sorted(r["predicted_answer"] for records in result.values() for r in records.values())
        for name, result in (("capped", capped), ("three", three), ("loose", loose), ("six", six))
    }
    assert answers["capped"] == answers["three"] and answers["loose"] == answers["six"]
    assert answers["capped"] != answers["six"]
    config = load_config(None, [*SWEEP, "max_new_tokens=null", "max_answer_tokens=3"])  # the rows' own budgets
    assert Evaluator(config, model, tiny_tokenizer())._max_new_tokens({"max_new_tokens": 2}) == 2


def test_runs_with_their_own_prefill_record_the_same_context_measurements(tmp_path):
    model = tiny_model("llama")
    shared, _ = sweep(model, tmp_path / "shared", ["no_press", "knorm"])
    alone, prefills = sweep(model, tmp_path / "alone", ["no_press", "knorm"], "prefill_reuse=false", "batch_size=2")
    assert prefills == 8
    for run, records in shared.items():
        for index, record in records.items():
            for name in FIELDS:
                assert alone[run][index][name] == record[name], (run, index, name)


def test_harness_answers_unbatchable_caches_one_at_a_time_and_says_why(tmp_path, caplog):
    model = sliding_model()
    one, _ = sweep(model, tmp_path / "one", ["no_press", "knorm"])
    with caplog.at_level(logging.INFO, logger="pikvpress_eval.runner"):
        batched, _ = sweep(model, tmp_path / "two", ["no_press", "knorm"], "batch_size=2")
    assert "answering one sample at a time: the model has sliding-window layers [2, 3]" in caplog.text
    for run, records in one.items():
        for index, record in records.items():
            for name in FIELDS:
                assert batched[run][index][name] == record[name], (run, index, name)


@pytest.mark.parametrize("name", ["no_press", "adakv", "pyramidkv", "pikv_packed", "ragged_adakv"])
def test_rows_that_have_ended_leave_the_batch(name):
    """After a row's answer ends, later forwards compute only the rows still answering (the batch shrinks to the one
    row with the largest budget), and every answer is what a batch that keeps feeding the ended rows gives."""
    model = model_of(torch.float32)
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs()
    prefills = [capture_prefill(model, c) for c in contexts]
    results = {}
    for drop in (True, False):
        sizes = []
        handle = model.register_forward_hook(
            lambda m, a, kw, out, sizes=sizes: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
        )
        try:
            rows = row_caches(model, prefills, PRESSES[name])
            results[drop] = answer_batch(
                model, tokenizer, rows, questions, budgets, keep_logits=True, drop_finished=drop
            )
        finally:
            handle.remove()
        results[drop, "sizes"] = sizes
    assert results[True, "sizes"][0] == len(budgets) and results[True, "sizes"][-1] == 1
    assert results[True, "sizes"] == sorted(results[True, "sizes"], reverse=True)
    assert set(results[False, "sizes"]) == {len(budgets)}
    for a, b in zip(results[True], results[False]):
        assert a.token_ids == b.token_ids and a.kv_bytes_read == b.kv_bytes_read
        assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-4) for x, y in zip(a.logits, b.logits))


def test_a_padded_layer_drops_rows_and_the_padding_only_they_needed():
    keys = torch.arange(3 * 1 * 5 * 2, dtype=torch.float32).view(3, 1, 5, 2)
    valid = torch.tensor(
        [[False, False, True, True, True], [True, True, True, True, True], [False, True, True, True, True]]
    )
    layer = PaddedKVLayer(keys.clone(), -keys.clone(), valid)
    layer.reserve(4)
    trim = layer.select_rows([2, 0])  # row 1 (no padding) leaves: one column is padding in both kept rows
    assert trim == 1
    assert torch.equal(layer.keys, keys[[2, 0], :, 1:]) and torch.equal(layer.values, -keys[[2, 0], :, 1:])
    assert torch.equal(layer.valid, valid[[2, 0], 1:])
    layer.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))  # still appends in the room it kept
    assert layer.keys.shape == (2, 1, 5, 2) and layer._room is not None
    assert layer.keys.data_ptr() == layer._room[0].data_ptr()


@pytest.mark.parametrize("name", ["quantization", "pikv_dense", "pikv_packed", "pikv_packed_top2", "ragged_adakv"])
def test_decode_steps_read_packed_and_sharded_rows_as_one_stack(name, monkeypatch):
    """A decode step over rows of packed or sharded layers (of different lengths) reads them as one zero-padded,
    masked stack (``pikvpress.rows_attention``), once per layer and step, and every row still answers as alone."""
    from pikvpress import attention as attention_module

    calls = []
    stacked = attention_module.stacked_rows_attention
    monkeypatch.setattr(
        attention_module, "stacked_rows_attention", lambda q, rows, *a: calls.append(len(rows)) or stacked(q, rows, *a)
    )
    model = model_of(torch.float32)
    check_batch_against_solo(model, name)
    steps = sorted(BUDGETS)[-2] - 1  # while two rows answer (the first token comes from the question's forward)
    assert len(calls) == steps * model.config.num_hidden_layers  # a row left alone is read alone
    assert calls[0] == len(CONTEXTS) and min(calls) == 2


def test_a_batch_of_several_packings_stacks_the_rows_of_each_and_answers_as_alone(monkeypatch):
    """Rows of int4 quantization, PiKV with all shards read and PiKV reading 2 of 4 shards in one batch (as the harness
    batches a prompt's packed jobs): each kind is read as its own stack, and every row answers as it would alone."""
    from pikvpress import attention as attention_module

    groups = []
    stacked = attention_module.stacked_rows_attention
    monkeypatch.setattr(
        attention_module,
        "stacked_rows_attention",
        lambda q, rows, *a: groups.append(tuple(type(r).__name__ for r in rows)) or stacked(q, rows, *a),
    )
    model = model_of(torch.float32)
    tokenizer = tiny_tokenizer()
    contexts, questions, budgets = inputs()
    names = ["quantization", "pikv_packed", "pikv_packed_top2", "quantization", "pikv_packed", "pikv_packed_top2"]
    order = [0, 1, 2, 3, 2, 3]  # two rows of each kind, on different prompts
    prefills = [capture_prefill(model, c) for c in contexts]
    expected = [solo(model, tokenizer, prefills[j], PRESSES[n](), questions[j], budgets[j]) for n, j in zip(names, order)]
    rows = [row_caches(model, [prefills[j]], PRESSES[n])[0] for n, j in zip(names, order)]
    answers = answer_batch(model, tokenizer, rows, [questions[j] for j in order], [budgets[j] for j in order])
    for i, (got, (text, ids, _, read)) in enumerate(zip(answers, expected)):
        assert got.token_ids == ids and got.text == text, (names[i], i)
        assert got.kv_bytes_read == read, (names[i], i)
    packed, sharded = ("PackedKVLayer",) * 2, ("ShardedKVLayer",) * 2
    assert sorted(groups[:3]) == [packed, sharded, sharded]  # the first step of the first layer: three stacks of two
