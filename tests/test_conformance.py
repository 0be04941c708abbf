"""The conformance suite: every press in default_presses.py on a tiny model of every family."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import dequantized_copy, get_tiny_model
from default_presses import PRESS_CASES, PressCase
from transformers import DynamicCache, pipeline

from pikvpress.cache import RaggedKVLayer
from pikvpress.models import TINY_FAMILIES, get_adapter

CONTEXT_LEN = 40
RATIO = 0.5
NEW_TOKENS = 4
DECODE_STEPS = 6

# presses that quantize: a left-padded row's padding shifts its quantization groups. KIVI key groups span tokens,
# so the pads' keys set the scales and zero points of the first real tokens' codes; and the residual is packed in
# whole groups counted over the padded sequence, so the padded row's decoded tokens are packed at other steps than
# the row's alone. Every other press, at ratio 0, decodes a padded row as that row alone.
QUANTIZING = {"quantization_int4", "quantization_int2_per_token", "pikv_routing_int8_sharded"}

case_ids = [case.name for case in PRESS_CASES]


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, length), generator=gen)


@torch.no_grad()
def prefill(model, press, ids, attention_mask=None):
    cache = DynamicCache(config=model.config)
    context = press(model) if press is not None else torch.no_grad()
    with context:
        out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache)
    return cache, out.logits


@torch.no_grad()
def greedy_continue(model, cache, last_logits, start: int, steps: int) -> list[int]:
    """Greedy decoding from a (compressed) cache, one token at a time, positions continuing at ``start``."""
    tokens = [int(last_logits[0, -1].argmax())]
    for t in range(steps - 1):
        out = model(
            input_ids=torch.tensor([[tokens[-1]]]),
            past_key_values=cache,
            position_ids=torch.tensor([[start + t]]),
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_prefill_leaves_expected_lengths(case: PressCase, family: str):
    model = get_tiny_model(family, case=case)
    press = case.make(RATIO)
    cache, _ = prefill(model, press, random_ids(1, CONTEXT_LEN))
    for layer in get_adapter(model).layers:
        stored = cache.layers[layer.layer_idx]
        if layer.is_sliding:  # left as the model keeps it: the last window - 1 tokens, length tracked
            assert stored.keys.shape[2] == min(CONTEXT_LEN, layer.sliding_window - 1)
            assert stored.get_seq_length() == CONTEXT_LEN
            continue
        kept = CONTEXT_LEN if case.masks_instead_of_pruning else case.kept(press, layer.attention, CONTEXT_LEN, RATIO)
        assert stored.keys.shape == (1, layer.num_kv_heads, kept, layer.key_dim)
        assert stored.values.shape == (1, layer.num_kv_heads, kept, layer.value_dim)
        if case.ragged:  # the heads hold AdaKV's kept tokens and nothing else; no mask is left on the module
            assert isinstance(stored, RaggedKVLayer)
            assert layer.attention.masked_key_indices is None
            assert int(stored.head_lengths.sum()) == layer.num_kv_heads * int(CONTEXT_LEN * (1 - RATIO))
            assert bool((stored.head_lengths > 0).all())
        elif case.masks_instead_of_pruning:
            _batch_idx, head_idx, _seq_idx = layer.attention.masked_key_indices
            masked_per_head = torch.bincount(head_idx, minlength=layer.num_kv_heads)
            assert int(masked_per_head.sum()) == layer.num_kv_heads * (CONTEXT_LEN - int(CONTEXT_LEN * (1 - RATIO)))
            assert bool((masked_per_head < CONTEXT_LEN).all())  # every head keeps something


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_generate_continues_from_compressed_cache(case: PressCase, family: str):
    model = get_tiny_model(family, case=case)
    ids = random_ids(1, CONTEXT_LEN, seed=1)
    with torch.no_grad(), case.make(RATIO)(model):
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=DynamicCache(config=model.config)
        )
    if case.decodes:  # the press evicts while decoding: the reference decodes by hand under it too
        press = case.make(RATIO)
        with torch.no_grad(), press(model):
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, past_key_values=cache).logits
            expected = greedy_continue(model, cache, logits, CONTEXT_LEN, NEW_TOKENS)
    else:
        cache, logits = prefill(model, case.make(RATIO), ids)
        expected = greedy_continue(model, cache, logits, CONTEXT_LEN, NEW_TOKENS)
    generated = out[0, CONTEXT_LEN:].tolist()
    eos = model.generation_config.eos_token_id
    # generate stops at EOS; up to there it must match decoding the compressed cache by hand
    assert len(generated) == NEW_TOKENS or generated[-1] == eos
    assert generated == expected[: len(generated)]


@torch.no_grad()
def decode_logits(model, press, ids, steps, *, after_prefill=None) -> torch.Tensor:
    """``(B, n, V)`` logits of each of the ``n`` tokens of ``steps`` ``(B, n)`` fed one at a time after the prefill
    of ``ids``, prefill and decoding under ``press`` (None: no press) the way ``model.generate`` runs it.
    ``after_prefill(cache)`` may return the cache to decode instead (decoded without the press)."""
    cache = DynamicCache(config=model.config)
    context = press(model) if press is not None else contextlib.nullcontext()
    with context:
        model(input_ids=ids, past_key_values=cache)
        if after_prefill is None:
            return torch.cat(
                [model(input_ids=steps[:, i : i + 1], past_key_values=cache).logits for i in range(steps.shape[1])], 1
            )
    cache = after_prefill(cache)
    return torch.cat(
        [model(input_ids=steps[:, i : i + 1], past_key_values=cache).logits for i in range(steps.shape[1])], 1
    )


def fixed_decode_budget(press) -> bool:
    """Whether ``press`` evicts while decoding down to a fixed token budget, whatever its compression ratio."""
    decoding = getattr(press, "decoding_press", press)
    scheduler = getattr(decoding, "scheduling", decoding)  # PiKVPress holds its scheduler
    return getattr(scheduler, "budget", None) is not None


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_ratio_zero_is_bit_identical_to_no_press(case: PressCase, family: str):
    # (the prefill's own logits cannot tell: kvpress presses edit the cache after a layer's attention ran; what a
    # press changes is read by the steps that decode from the cache)
    model = get_tiny_model(family, case=case)
    ids, steps = random_ids(1, CONTEXT_LEN, seed=2), random_ids(1, DECODE_STEPS, seed=6)
    if case.lossless:
        reference = decode_logits(model, None, ids, steps)
        # the press's prefill at ratio 0 leaves a cache that decodes bit for bit as without a press
        keep = lambda cache: cache
        assert torch.equal(decode_logits(model, case.make(0.0), ids, steps, after_prefill=keep), reference)
        if case.decodes and not fixed_decode_budget(case.make(0.0)):  # and so does its decoding at ratio 0
            assert torch.equal(decode_logits(model, case.make(0.0), ids, steps), reference)
        return
    # a lossy press is held to dense attention over exactly what it stores after the prefill, at every step (only the
    # first for a press that quantizes: later steps may pack the decoded tokens, which the dense copy holds at full
    # precision)
    logits = decode_logits(model, case.make(0.0), ids, steps)
    dense = decode_logits(model, case.make(0.0), ids, steps, after_prefill=lambda c: dequantized_copy(model, c))
    n = 1 if case.name in QUANTIZING else DECODE_STEPS
    torch.testing.assert_close(logits[:, :n], dense[:, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_batch_of_two_with_left_padding(case: PressCase, family: str):
    model = get_tiny_model(family, case=case)
    long_row, short_row = random_ids(1, CONTEXT_LEN, seed=3), random_ids(1, CONTEXT_LEN - 10, seed=4)
    pad = torch.zeros(1, 10, dtype=torch.long)
    ids = torch.cat([long_row, torch.cat([pad, short_row], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}

    def generate(ratio, inputs, attention_mask=None):
        with torch.no_grad(), case.make(ratio)(model):
            return model.generate(inputs, attention_mask=attention_mask, **kwargs)

    batched = generate(RATIO, ids, mask)
    assert batched.sequences.shape[0] == 2 and batched.sequences.shape[1] > CONTEXT_LEN
    assert all(torch.isfinite(logits).all() for logits in batched.logits)
    if case.deterministic:  # the unpadded row continues exactly as it does alone
        alone = generate(RATIO, long_row)
        torch.testing.assert_close(batched.logits[0][0], alone.logits[0][0], rtol=1e-4, atol=1e-4)
        row, single = batched.sequences[0].tolist(), alone.sequences[0].tolist()
        assert row[: len(single)] == single
        assert all(tok == model.generation_config.pad_token_id for tok in row[len(single) :])  # padded after EOS
    # The padded row at RATIO legitimately differs from the row alone: kvpress's presses (and the routing and
    # scheduling presses) score the pad tokens like real ones, so they spend budget on them, and once a cache is
    # pruned the decode mask covers its first columns as padding, whichever tokens sit there now. At ratio 0
    # nothing is pruned and the padded row decodes as the row alone, step by step, for every press but those that
    # quantize (QUANTIZING) and a decoding press with a fixed budget (it evicts at ratio 0 too, and the eviction
    # compacts the cache under the decode mask's padding columns); for these the unpadded row, at ratio 0 too,
    # still decodes as it does alone.
    padded = generate(0.0, ids, mask)
    assert all(torch.isfinite(logits).all() for logits in padded.logits)
    if case.name in QUANTIZING or fixed_decode_budget(case.make(0.0)):
        alone = generate(0.0, long_row)
        for step, logits in enumerate(alone.logits):
            torch.testing.assert_close(padded.logits[step][0], logits[0], rtol=1e-4, atol=1e-4)
        return
    alone = generate(0.0, short_row)
    assert len(padded.logits) >= len(alone.logits)
    for step, logits in enumerate(alone.logits):
        torch.testing.assert_close(padded.logits[step][1], logits[0], rtol=1e-4, atol=1e-4)
    assert (
        padded.sequences[1, CONTEXT_LEN : CONTEXT_LEN + len(alone.logits)].tolist() == alone.sequences[0, 30:].tolist()
    )


PIPELINE_FAMILIES = ("llama", "qwen3_moe", "gpt_oss", "deepseek_v3")


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
@pytest.mark.parametrize("case", PRESS_CASES, ids=case_ids)
def test_kvpress_pipeline_answers_and_removes_answers(case: PressCase, family: str, tokenizer):
    model = get_tiny_model(family, case=case)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 2
    questions = ["Who jumps?", "Over what?"]
    if case.decodes:  # kvpress's pipeline takes one question with a press that acts while decoding
        questions = questions[:1]
    cache = DynamicCache()
    both = pipe(context, questions=questions, press=case.make(RATIO), max_new_tokens=NEW_TOKENS, cache=cache)
    compressed_lengths = [layer.keys.shape[2] for layer in cache.layers]
    # each answer is as if asked alone: the pipeline removed the previous answer from the cache
    for question, answer in zip(questions, both["answers"]):
        single = pipe(context, question=question, press=case.make(RATIO), max_new_tokens=NEW_TOKENS)
        assert single["answer"] == answer
    context_len = len(pipe.preprocess(context, [""], "", 10**6)["context_ids"][0])
    for layer, length in zip(get_adapter(model).layers, compressed_lengths):
        if case.masks_instead_of_pruning or layer.is_sliding:
            assert length == context_len
        elif case.decodes:  # it evicted while answering (the pipeline then cut the answer off)
            assert length < context_len
        else:
            assert length == case.kept(case.make(RATIO), layer.attention, context_len, RATIO)


@pytest.mark.parametrize("case", [c for c in PRESS_CASES if c.bad_kwargs], ids=lambda c: c.name)
def test_bad_arguments_are_rejected(case: PressCase):
    cls = type(case.make(0.1))
    for bad in case.bad_kwargs:
        with pytest.raises((AssertionError, ValueError), match="(?i)ratio"):
            cls(**bad)
