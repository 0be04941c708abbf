"""Scores shared across ratios (pikvpress_eval.score_memo): every press of the leaderboard, replayed at every ratio on
one prefill with the memo, leaves exactly the cache (and kvpress's head-wise masked keys) it leaves without it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kvpress import KnormPress, ScorerPress, SnapKVPress
from pikvpress_eval.config import load_config
from pikvpress_eval.prefill import can_reuse_prefill, capture_prefill, replay_press
from pikvpress_eval.score_memo import ScoreMemo

from pikvpress.models import tiny_model

LEADERBOARD = load_config("evaluation/configs/leaderboard.yaml")
MORE = load_config("evaluation/configs/leaderboard_more.yaml")
CONTEXTS = (90, 77)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prefills(llama):
    g = torch.Generator().manual_seed(0)
    return [capture_prefill(llama, torch.randint(3, 250, (1, n), generator=g)) for n in CONTEXTS]


def tensors(value, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor reachable from a cache layer (dense, packed or sharded), by attribute path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            out.update(tensors(item, f"{prefix}[{i}]"))
    elif isinstance(value, dict):
        for k, item in value.items():
            out.update(tensors(item, f"{prefix}.{k}"))
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
        for k, item in vars(value).items():
            if k not in ("config",):
                out.update(tensors(item, f"{prefix}.{k}"))
    return out


def snapshot(model, cache) -> tuple[list[dict], list]:
    layers = [tensors(layer) for layer in cache.layers]
    masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    return layers, masks


def assert_same(a, b, what):
    layers_a, masks_a = a
    layers_b, masks_b = b
    for i, (x, y) in enumerate(zip(layers_a, layers_b, strict=True)):
        assert x.keys() == y.keys(), (what, i)
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (what, i, k)
    for x, y in zip(masks_a, masks_b, strict=True):
        assert (x is None) == (y is None), what
        if x is not None:
            assert all(torch.equal(p, q) for p, q in zip(x, y)), what


def replay_all(model, prefills, name, memo_for):
    """Replay ``name`` at every leaderboard ratio on every prefill (rows inner, as a block runs), torch seeded once,
    as a sweep draws: a press that draws random numbers must draw the same ones with the memo."""
    out = {}
    torch.manual_seed(1234)
    for ratio in LEADERBOARD.ratios:
        for i, prefill in enumerate(prefills):
            press = LEADERBOARD.build_press(name, ratio)
            memo = memo_for(i)
            if memo is None:
                cache = replay_press(model, prefill, press)
            else:
                with memo.sharing(press, name):
                    cache = replay_press(model, prefill, press)
            out[ratio, i] = snapshot(model, cache)
    return out


SHARED = [n for n in dict.fromkeys(LEADERBOARD.press_names + MORE.press_names) if n != "no_press"]


def test_shared_scores_leave_the_cache_of_a_replay_without_them(llama, prefills):
    """Every press of the leaderboard, every ratio, one memo per prefill for them all (a scorer's scores serve every
    press that holds the same scorer), against each press replayed alone."""
    shared_names = [n for n in SHARED if can_reuse_prefill(LEADERBOARD.build_press(n, 0.5), llama)]
    assert len(shared_names) > 25
    memos = [ScoreMemo(p, {}) for p in prefills]
    for memo in memos[1:]:
        memo.verdicts = memos[0].verdicts
    for name in shared_names:
        plain = replay_all(llama, prefills, name, lambda i: None)
        shared = replay_all(llama, prefills, name, lambda i: memos[i])
        for key in plain:
            assert_same(plain[key], shared[key], (name, key))
    assert sum(m.hits for m in memos) > 0


@pytest.mark.parametrize(
    ("name", "shares"),
    [
        ("snapkv", True),
        ("adakv_snapkv", True),
        ("knorm", True),
        ("streaming_llm", False),
        ("compactor", False),
        ("leverage", False),
    ],
)
def test_scores_are_shared_only_when_the_ratio_cannot_change_them(name, shares, llama, prefills):
    """SnapKV's window scores are computed once per layer for the five ratios; StreamingLLM and Compactor (default
    blending) read the ratio in ``score``, LeverageScore draws random numbers: computed at every ratio."""
    memo = ScoreMemo(prefills[0])
    for ratio in LEADERBOARD.ratios:
        press = LEADERBOARD.build_press(name, ratio)
        with memo.sharing(press, name):
            replay_press(llama, prefills[0], press)
    layers = len(prefills[0].layers)
    if shares:
        assert memo.misses == layers and memo.hits == layers * (len(LEADERBOARD.ratios) - 1)
        # another press holding the same scorer takes its scores too
        other = {"snapkv": "critical_snapkv", "adakv_snapkv": "chunkkv", "knorm": "merging_knorm"}[name]
        hits, press = memo.hits, LEADERBOARD.build_press(other, 0.5)
        with memo.sharing(press, other):
            replay_press(llama, prefills[0], press)
        assert memo.hits >= hits + layers
    else:
        assert memo.hits == 0 and memo.misses >= layers * len(LEADERBOARD.ratios)


@dataclass
class CountingPress(ScorerPress):
    """A scorer that remembers how often it ran: it changes itself, so its scores are never shared."""

    compression_ratio: float = 0.0
    runs: int = 0

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.runs = self.runs + 1
        return keys.norm(dim=-1)


def test_a_scorer_that_changes_its_press_is_not_shared(llama, prefills):
    memo = ScoreMemo(prefills[0])
    for ratio in (0.25, 0.5):
        press = CountingPress(compression_ratio=ratio)
        with memo.sharing(press, "counting"):
            replay_press(llama, prefills[0], press)
    assert memo.hits == 0


def test_scores_are_not_shared_between_different_fields_or_inputs(llama, prefills):
    memo = ScoreMemo(prefills[0])
    for window in (4, 8):  # another window_size: another score
        press = SnapKVPress(compression_ratio=0.5, window_size=window)
        with memo.sharing(press, "snapkv"):
            replay_press(llama, prefills[0], press)
    assert memo.hits == 0
    other = ScoreMemo(prefills[1], memo.verdicts)  # another prefill: its own scores
    press = SnapKVPress(compression_ratio=0.5, window_size=4)
    with other.sharing(press, "snapkv"):
        replay_press(llama, prefills[1], press)
    assert other.hits == 0 and other.misses == len(prefills[1].layers)


def test_a_shared_score_is_a_copy(llama, prefills):
    """A press that edits its scores in place (AdaKV's safeguard) cannot change the next ratio's."""
    memo = ScoreMemo(prefills[0])
    got = []
    for _ in range(2):
        press = KnormPress(compression_ratio=0.5)
        with memo.sharing(press, "knorm"):
            layer = prefills[0].layers[0]
            module = llama.model.layers[0].self_attn
            scores = press.score(module, layer.kwargs["hidden_states"], layer.keys, layer.values, None, layer.kwargs)
            got.append(scores.clone())
            scores.fill_(0)
    assert memo.hits == 1 and torch.equal(got[0], got[1]) and bool(got[0].abs().sum() > 0)
    assert "score" not in vars(press)  # nothing of the memo outlives its block
