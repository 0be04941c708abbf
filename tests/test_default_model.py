"""The conformance checks on the real default model, SmolLM2-135M-Instruct (offline, from its wheel)."""

from __future__ import annotations

import pytest
import torch
from conftest import dequantized_copy
from default_presses import PRESS_CASES, PressCase
from test_conformance import QUANTIZING, decode_logits, fixed_decode_budget, greedy_continue, prefill
from transformers import DynamicCache, pipeline

from pikvpress_eval.benchmarks.needle import make_sample
from pikvpress.models import get_adapter, load_model

pytestmark = pytest.mark.slow
CONTEXT_TOKENS = 512


@pytest.fixture(scope="module")
def default_model():
    return load_model()


@pytest.fixture(scope="module")
def needle(default_model):
    return make_sample(default_model[1], CONTEXT_TOKENS, depth=0.5)


def test_default_model_is_an_instruct_llama(default_model):
    model, tokenizer = default_model
    adapter = get_adapter(model)
    assert adapter.family.name == "llama" and len(adapter) == model.config.num_hidden_layers
    assert not adapter.is_moe
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_no_press_finds_the_needle(default_model, needle):
    model, tokenizer = default_model
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    answer = pipe(needle.context, question=needle.question, answer_prefix=needle.answer_prefix, max_new_tokens=12)
    assert needle.answer in answer["answer"]


@pytest.mark.parametrize("case", PRESS_CASES, ids=[c.name for c in PRESS_CASES])
def test_press_on_default_model(case: PressCase, default_model, needle):
    model, tokenizer = default_model
    if case.attn_implementation not in (None, model.config._attn_implementation):
        model, _ = load_model(attn_implementation=case.attn_implementation)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    cache = DynamicCache()
    press = case.make(0.5)
    result = pipe(needle.context, question=needle.question, answer_prefix=needle.answer_prefix,
                  press=press, cache=cache, max_new_tokens=12)
    assert isinstance(result["answer"], str) and result["answer"].strip()
    context_len = len(pipe.preprocess(needle.context, [""], "", 10**6)["context_ids"][0])
    for layer in get_adapter(model).layers:
        length = cache.layers[layer.layer_idx].keys.shape[2]
        if case.decodes:  # it evicted while answering (the pipeline then cut the answer off)
            assert length < context_len
            continue
        expected = context_len if case.masks_instead_of_pruning else case.kept(
            press, layer.attention, context_len, 0.5)
        assert length == expected
    # ratio 0 changes nothing: decoding from the press's cache (what a press edits; the prefill's own logits come
    # before any edit) is bit for bit decoding without a press, or for a lossy press dense attention over what it
    # stores
    ids = tokenizer(needle.context, return_tensors="pt").input_ids[:, :128]
    steps = tokenizer(" The answer is the number", return_tensors="pt").input_ids[:, :4]
    if case.lossless:
        reference = decode_logits(model, None, ids, steps)
        assert torch.equal(decode_logits(model, case.make(0.0), ids, steps, after_prefill=lambda c: c), reference)
        if case.decodes and not fixed_decode_budget(case.make(0.0)):
            assert torch.equal(decode_logits(model, case.make(0.0), ids, steps), reference)
    else:
        logits = decode_logits(model, case.make(0.0), ids, steps)
        dense = decode_logits(model, case.make(0.0), ids, steps, after_prefill=lambda c: dequantized_copy(model, c))
        n = 1 if case.name in QUANTIZING else steps.shape[1]  # (a quantizing press may pack the decoded tokens)
        torch.testing.assert_close(logits[:, :n], dense[:, :n], rtol=1e-4, atol=1e-4)


def test_generate_continues_on_default_model(default_model, needle):
    model, tokenizer = default_model
    from kvpress import SnapKVPress

    ids = tokenizer(needle.context, return_tensors="pt").input_ids
    with torch.no_grad(), SnapKVPress(0.5)(model):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    cache, logits = prefill(model, SnapKVPress(0.5), ids)
    expected = greedy_continue(model, cache, logits, ids.shape[1], 6)
    generated = out[0, ids.shape[1]:].tolist()
    assert generated == expected[: len(generated)]


def test_shipped_learned_router_agrees_with_kvzip(default_model, needle):
    """The shipped router predicts KVzip's scores on a context it was not trained on (an essay needle)."""
    from pikvpress.routing import load_router
    from pikvpress.routing.training import kvzip_targets, router_agreement

    model, tokenizer = default_model
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    ids = pipe.preprocess(needle.context, [""], "", 10**6)["context_ids"]
    router = load_router(model)
    assert router.nbytes < 1_000_000
    agreement = router_agreement(router, kvzip_targets(model, ids))
    assert agreement.shape == (model.config.num_hidden_layers,)
    assert float(agreement.mean()) > 0.6
