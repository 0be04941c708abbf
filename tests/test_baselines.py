"""Every offline kvpress baseline: kvpress's own definitions, run once on a tiny Llama through the harness's
path (shared-prefill replay where :func:`can_reuse_prefill` allows it, kvpress's pipeline otherwise), leaving
the cache its kind promises: ``1 - ratio`` of the tokens, every token (masks only), or every token with
pruned key channels. See docs/baselines.md."""

from __future__ import annotations

import pytest
import torch
from kvpress import (
    AdaKVPress,
    BasePress,
    BlockPress,
    ChunkKVPress,
    CompactorPress,
    ComposedPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    EntropyGatedChunkKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVComposePress,
    KVgradPress,
    KVzipPress,
    LagKVPress,
    MergingPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept
from pikvpress_eval.config import load_config
from pikvpress_eval.prefill import can_reuse_prefill, capture_prefill, replay_press
from pikvpress_eval.presses import (
    ALIASES,
    BASELINES,
    CHANNEL_PRUNING,
    EAGER_PRESSES,
    MASKS_ONLY,
    build_press,
)
from pikvpress_eval.runner import Evaluator
from transformers import DynamicCache, pipeline

from pikvpress.models import tiny_model, tiny_tokenizer

#: kvpress 0.5.5's evaluation/evaluate_registry.py PRESS_REGISTRY entries that run offline, verbatim
KVPRESS_DEFINITIONS = {
    "adakv_snapkv": lambda: AdaKVPress(SnapKVPress()),
    "block_keydiff": lambda: BlockPress(press=KeyDiffPress(), block_size=128),
    "chunkkv": lambda: ChunkKVPress(press=SnapKVPress(), chunk_length=20),
    "critical_adakv_expected_attention": lambda: CriticalAdaKVPress(ExpectedAttentionPress(use_vnorm=False)),
    "critical_adakv_snapkv": lambda: CriticalAdaKVPress(SnapKVPress()),
    "critical_expected_attention": lambda: CriticalKVPress(ExpectedAttentionPress(use_vnorm=False)),
    "critical_snapkv": lambda: CriticalKVPress(SnapKVPress()),
    "cur": lambda: CURPress(),
    "entropy_gated_chunkkv": lambda: EntropyGatedChunkKVPress(press=SnapKVPress()),
    "expected_attention": lambda: AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)),
    "keydiff": lambda: KeyDiffPress(),
    "kvcompose": lambda: KVComposePress(),
    "kvcompose_unstructured": lambda: KVComposePress(structured=False),
    "kvgrad": lambda: KVgradPress(),
    "kvzip": lambda: KVzipPress(),
    "kvzip_plus": lambda: KVzipPress(kvzip_plus_normalization=True),
    "lagkv": lambda: LagKVPress(),
    "knorm": lambda: KnormPress(),
    "observed_attention": lambda: ObservedAttentionPress(),
    "pyramidkv": lambda: PyramidKVPress(),
    "random": lambda: RandomPress(),
    "snap_think": lambda: ComposedPress([SnapKVPress(), ThinKPress()]),
    "snapkv": lambda: SnapKVPress(),
    "streaming_llm": lambda: StreamingLLMPress(),
    "think": lambda: ThinKPress(),
    "tova": lambda: TOVAPress(),
    "compactor": lambda: CompactorPress(),
    "adakv_compactor": lambda: AdaKVPress(CompactorPress()),
    "merging_knorm": lambda: MergingPress(KnormPress()),
    "merging_snapkv": lambda: MergingPress(SnapKVPress()),
    "merging_expected_attention": lambda: MergingPress(ExpectedAttentionPress(epsilon=1e-2)),
}

#: every name the registry builds (aliases included) that runs offline on a dense Llama model
NAMES = sorted([*BASELINES, *ALIASES])
CONTEXT = 300  # tokens of text: above LagKV's n_sink + 2 * lag_size, two Compactor chunks, several blocks
RATIO = 0.5
#: presses whose kept-token count is not exactly compute_n_kept per layer: tokens of tolerance on the mean
#: over layers (ChunkKV keeps whole chunks of 20; PyramidKV and KVCompose split the budget across layers)
TOLERANCE = {"chunkkv": 20, "pyramidkv": 1, "kvcompose": 1}


def kvpress_press(name: str, ratio: float) -> BasePress:
    """kvpress's press for ``name``, its ratio set the way kvpress's evaluate.py sets it."""
    press = KVPRESS_DEFINITIONS[name]()
    if isinstance(press, ComposedPress):
        for part in press.presses:
            if isinstance(part, ThinKPress):
                part.key_channel_compression_ratio = ratio  # our sweep's ratio for both parts
            else:
                part.compression_ratio = ratio
    elif isinstance(press, ThinKPress):
        press.key_channel_compression_ratio = ratio
    else:
        press.compression_ratio = ratio
    return press


def state(value):
    """A comparable description of a press: its kvpress class and every attribute, recursively."""
    if isinstance(value, BasePress):
        kvpress_type = next(t for t in type(value).__mro__ if t.__module__.startswith("kvpress"))
        return kvpress_type, {k: state(v) for k, v in sorted(vars(value).items())}
    if isinstance(value, (list, tuple)):
        return [state(v) for v in value]
    return value


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.875])
@pytest.mark.parametrize("name", sorted(KVPRESS_DEFINITIONS))
def test_kvpress_names_carry_kvpress_definitions(name, ratio):
    assert state(build_press(name, ratio)) == state(kvpress_press(name, ratio))


def test_the_comparison_sees_a_changed_argument():
    assert state(build_press("chunkkv", 0.5, chunk_length=10)) != state(kvpress_press("chunkkv", 0.5))
    plain = build_press("expected_attention_plain", 0.5)
    assert state(plain) != state(kvpress_press("expected_attention", 0.5))


# --- running every baseline --------------------------------------------------------------------------


def _with_tokenizer(model, path):
    """KVzip (and KVgrad) read the tokenizer from ``model.config.name_or_path``, as a real checkpoint has it."""
    tiny_tokenizer().save_pretrained(path)
    model.config.name_or_path = str(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _with_tokenizer(tiny_model("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def eager_llama(tmp_path_factory):
    return _with_tokenizer(tiny_model("llama", attn_implementation="eager"), tmp_path_factory.mktemp("eager"))


@pytest.fixture(scope="module")
def context_text():
    generator = torch.Generator().manual_seed(0)
    return "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (CONTEXT,), generator=generator))


def masked_keys(model) -> list[int]:
    """Per layer, how many (head, token) keys the press masked (0 when it masked none)."""
    counts = []
    for layer in model.model.layers:
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        counts.append(0 if masked is None else len(masked[0]))
    return counts


def run_like_the_harness(model, name: str, ratio: float, text: str):
    """The cache a harness run of ``name`` leaves (the runner's shared or its own-prefill path), the context
    length, and whether the prefill was shared."""
    tokenizer = tiny_tokenizer()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    press = build_press(name, ratio)
    shared = can_reuse_prefill(press, model)
    context_ids = pipe.preprocess(text, [""], "", int(1e10))["context_ids"]
    torch.manual_seed(0)
    if shared:
        cache = replay_press(model, capture_prefill(model, context_ids), press)
    else:
        cache = DynamicCache()
        pipe(text, question="", press=press, max_new_tokens=2, cache=cache)
    return cache, context_ids.shape[1], shared


@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_runs_and_leaves_the_cache_its_kind_promises(name, llama, eager_llama, context_text):
    model = eager_llama if name in EAGER_PRESSES else llama
    cache, n, _ = run_like_the_harness(model, name, RATIO, context_text)
    lengths = [cache.get_seq_length(i) for i in range(len(cache))]
    masked = masked_keys(model)
    num_layers, num_kv_heads = len(lengths), model.config.num_key_value_heads
    if name in MASKS_ONLY:
        assert lengths == [n] * num_layers, "a press that only masks keys keeps every token"
        # the masks remove the ratio's share of every layer's (head, token) keys, within rounding
        assert abs(sum(masked) - num_layers * num_kv_heads * (n - compute_n_kept(n, RATIO))) <= num_layers
    elif name in CHANNEL_PRUNING:
        assert lengths == [n] * num_layers and sum(masked) == 0
        head_dim = cache.layers[0].keys.shape[-1]
        for layer in cache.layers:  # the ratio's share of each head's key channels is zero at every token
            zero_channels = (layer.keys == 0).all(dim=2).sum(dim=-1)
            assert (zero_channels == int(head_dim * RATIO)).all()
    else:
        assert sum(masked) == 0, "a token-removing press masks nothing"
        mean = sum(lengths) / num_layers
        assert abs(mean - compute_n_kept(n, RATIO)) <= TOLERANCE.get(name, 0), lengths
        assert max(lengths) < n


@pytest.mark.parametrize("name", [n for n in NAMES if n not in EAGER_PRESSES])
def test_a_shared_prefill_replays_to_the_cache_of_the_press_own_prefill(name, llama, context_text):
    press = build_press(name, RATIO)
    if not can_reuse_prefill(press, llama):
        pytest.skip(f"{name} runs with its own prefill")
    pipe = pipeline("kv-press-text-generation", model=llama, tokenizer=tiny_tokenizer(), device=llama.device)
    context_ids = pipe.preprocess(context_text, [""], "", int(1e10))["context_ids"]
    torch.manual_seed(0)  # RandomPress, LeverageScorePress and Compactor draw random numbers
    own = DynamicCache()
    with torch.no_grad(), press(llama):
        llama.model(input_ids=context_ids, past_key_values=own)
    own_masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in llama.model.layers]
    prefill = capture_prefill(llama, context_ids)
    for attempt in range(2):
        if attempt:  # ThinK zeroes key channels in place: the next press replayed must still see the prefill's keys
            replay_press(llama, prefill, build_press("think", RATIO))
        torch.manual_seed(0)
        replayed = replay_press(llama, prefill, build_press(name, RATIO))
        replay_masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in llama.model.layers]
        assert len(own) == len(replayed)
        for a, b in zip(own.layers, replayed.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        for a, b in zip(own_masks, replay_masks):
            assert (a is None) == (b is None)
            if a is not None:
                assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def test_presses_with_their_own_context_manager_run_alone(llama):
    for name in ["kvzip", "kvzip_plus", "kvzip_layerwise", "kvgrad", "kvcompose", "kvcompose_unstructured"]:
        assert not can_reuse_prefill(build_press(name, RATIO), llama), name
    # a wrapper shares a prefill exactly when the press it wraps does
    assert can_reuse_prefill(build_press("critical_adakv_snapkv", RATIO), llama)
    wrapped = ChunkKVPress(press=SnapKVPress(RATIO))
    wrapped.press.compresses_while_decoding = True
    assert not can_reuse_prefill(wrapped, llama)


def test_kvcompose_unstructured_keeps_one_copy_of_the_context(llama, context_text):
    """kvpress 0.5.5 leaves the context's scoring pass in the cache: twice the tokens, the copy unmasked."""
    cache, n, _ = run_like_the_harness(llama, "kvcompose_unstructured", RATIO, context_text)
    assert [cache.get_seq_length(i) for i in range(len(cache))] == [n] * len(cache)
    kvpress_cache = DynamicCache()
    pipe = pipeline("kv-press-text-generation", model=llama, tokenizer=tiny_tokenizer(), device=llama.device)
    pipe(context_text, question="", press=kvpress_press("kvcompose_unstructured", RATIO), cache=kvpress_cache)
    assert kvpress_cache.get_seq_length(0) == 2 * n  # the defect the registry's subclass removes


def test_the_evaluator_runs_every_offline_baseline(llama, tmp_path):
    names = [n for n in NAMES if n not in EAGER_PRESSES]
    config = load_config(
        None,
        [
            "dataset=needle",
            "context_length=200",
            "needle_depth=0.5",
            "max_new_tokens=2",
            f"press_name=[no_press, {', '.join(names)}]",
            f"compression_ratio={RATIO}",
            f"output_dir={tmp_path}",
        ],
    )
    evaluator = Evaluator(config, llama, tiny_tokenizer())
    results = {r["press"]: r for r in evaluator.run()}
    alone = [n for n in names if not can_reuse_prefill(build_press(n, RATIO), llama)]
    assert evaluator.prefills == 1 + len(alone)  # one shared prefill, plus one per press that needs its own
    full = results["no_press"]["kv_bytes"]
    for name in names:
        if name in MASKS_ONLY or name in CHANNEL_PRUNING:
            assert results[name]["kv_bytes"] == full, name
        else:
            assert results[name]["kv_bytes"] < 0.6 * full, name
