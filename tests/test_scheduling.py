"""Decode-time scheduling: statistics updates and alignment, and the tokens each eviction policy keeps."""

from __future__ import annotations

import pytest
import torch

from pikvpress.scheduling import POLICIES, DecodeStatistics, kept_indices, scores_to_prior, step_probs

# ten cached tokens, not in position order (a prefill press may leave them in any order)
POSITIONS = [3, 0, 9, 5, 1, 8, 2, 7, 4, 6]


def hand_built() -> DecodeStatistics:
    stats = DecodeStatistics.start(torch.tensor(POSITIONS).view(1, 1, -1))
    by_position = {  # position: (mass, ema, last_used)
        0: (0.0, 0.0, -1),
        1: (5.0, 0.01, 2),
        2: (1.0, 0.30, 7),
        3: (4.0, 0.02, 5),
        4: (0.5, 0.25, 7),
        5: (3.0, 0.05, 1),
        6: (0.2, 0.20, -1),
        7: (0.1, 0.15, 6),
        8: (0.0, 0.00, -1),
        9: (0.0, 0.00, -1),
    }
    stats.mass = torch.tensor([by_position[p][0] for p in POSITIONS]).view(1, 1, -1)
    stats.ema = torch.tensor([by_position[p][1] for p in POSITIONS]).view(1, 1, -1)
    stats.last_used = torch.tensor([by_position[p][2] for p in POSITIONS]).view(1, 1, -1)
    return stats


@pytest.mark.parametrize(
    "policy, positions",
    [
        # sink (position 0) and recent window (8, 9) first, then by the policy's statistic
        ("h2o", {0, 8, 9, 1, 3}),  # mass 5.0 and 4.0
        ("adaptive", {0, 8, 9, 2, 4}),  # moving average 0.30 and 0.25
        ("lru", {0, 8, 9, 2, 4}),  # last used at step 7
        ("streaming", {0, 8, 9, 7, 6}),  # the latest positions
    ],
)
def test_each_policy_keeps_what_its_rule_says(policy, positions):
    stats = hand_built()
    kept = kept_indices(stats, 5, policy, sink_tokens=1, recent_window=2)
    assert kept.shape == (1, 1, 5)
    assert kept[0, 0].tolist() == sorted(kept[0, 0].tolist())  # cache order is kept
    assert {POSITIONS[i] for i in kept[0, 0].tolist()} == positions


def test_adaptive_scores_unused_tokens_by_their_prior_and_used_ones_by_their_average():
    stats = hand_built()
    prior = torch.full((1, 1, 10), 0.1)
    prior[0, 0, POSITIONS.index(6)] = 0.28  # never used: its prior holds, above position 4's average 0.25
    prior[0, 0, POSITIONS.index(7)] = 0.90  # used at step 6: its average 0.15 counts, not this prior
    stats.prior = prior
    kept = kept_indices(stats, 5, "adaptive", sink_tokens=1, recent_window=2)
    assert {POSITIONS[i] for i in kept[0, 0].tolist()} == {0, 8, 9, 2, 6}


def test_lru_breaks_ties_by_recency_and_budget_smaller_than_protected_keeps_sinks_first():
    stats = hand_built()
    # positions 2 and 4 were both last used at step 7: the more recent one (4, at the higher cache index
    # here, so a tie broken by cache index would pick 2) is kept
    kept = kept_indices(stats, 4, "lru", sink_tokens=1, recent_window=2)
    assert {POSITIONS[i] for i in kept[0, 0].tolist()} == {0, 8, 9, 4}
    # budget 2 with 1 sink and a 3-token window (positions 7, 8, 9): the sink, then the window's best by mass
    kept = kept_indices(stats, 2, "h2o", sink_tokens=1, recent_window=3)
    assert {POSITIONS[i] for i in kept[0, 0].tolist()} == {0, 7}
    # a budget above the cache length keeps everything
    assert kept_indices(stats, 50, "h2o").shape[-1] == 10


def test_observe_accumulates_averages_and_marks_use():
    stats = DecodeStatistics.start(
        torch.arange(4).view(1, 1, 4), prior=torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]), decay=0.5
    )
    stats.observe(torch.tensor([[[0.7, 0.1, 0.1, 0.1]]]))
    stats.observe(torch.tensor([[[0.1, 0.6, 0.2, 0.1]]]))
    # the prior counts as one step of mass (H2O counts the prefill's attention)
    torch.testing.assert_close(stats.mass, torch.tensor([[[1.2, 1.0, 0.5, 0.3]]]))
    assert (DecodeStatistics.start(torch.arange(4).view(1, 1, 4)).mass == 0).all()  # no prior: no mass
    # ema = 0.5 * (0.5 * prior + 0.5 * p1) + 0.5 * p2
    prior, p1, p2 = (
        torch.tensor([0.4, 0.3, 0.2, 0.1]),
        torch.tensor([0.7, 0.1, 0.1, 0.1]),
        torch.tensor([0.1, 0.6, 0.2, 0.1]),
    )
    torch.testing.assert_close(stats.ema[0, 0], 0.25 * prior + 0.25 * p1 + 0.5 * p2)
    assert stats.last_used[0, 0].tolist() == [0, 1, -1, -1]  # above uniform (0.25) at steps 0 and 1
    assert stats.step == 2


def test_statistics_stay_aligned_through_appends_and_evictions():
    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, 3, 12
    stats = DecodeStatistics.start(torch.arange(t).expand(b, h, t))
    reference = {}  # (row, head, position) -> accumulated mass, computed independently
    for step in range(30):
        stats.append(torch.full((b, h, 1), t + step))
        probs = torch.softmax(torch.randn(b, h, stats.length, generator=gen), dim=-1)
        stats.observe(probs)
        for r in range(b):
            for hh in range(h):
                for i, pos in enumerate(stats.position[r, hh].tolist()):
                    reference[r, hh, pos] = reference.get((r, hh, pos), 0.0) + float(probs[r, hh, i])
        if stats.length > 10:
            kept = kept_indices(stats, 8, POLICIES[step % len(POLICIES)], sink_tokens=2, recent_window=3)
            stats.keep(kept)
            assert stats.length == 8
    for r in range(b):
        for hh in range(h):
            for i, pos in enumerate(stats.position[r, hh].tolist()):
                assert stats.mass[r, hh, i].item() == pytest.approx(reference[r, hh, pos], rel=1e-5)
            assert {0, 1} <= set(stats.position[r, hh].tolist())  # sinks survive every eviction


def test_new_tokens_start_at_a_uniform_share():
    stats = DecodeStatistics.start(torch.arange(3).view(1, 1, 3), prior=torch.tensor([[[0.6, 0.3, 0.0]]]))
    for step in range(100):  # many appends: the buffers grow, the earlier statistics stay
        stats.append(torch.tensor([[[3 + step]]]))
        assert stats.ema[0, 0, -1].item() == pytest.approx(1 / (4 + step))
    assert stats.ema[0, 0, :3].tolist() == pytest.approx([0.6, 0.3, 0.0])
    assert stats.position[0, 0].tolist() == list(range(103))
    assert stats.last_used[0, 0, -1].item() == -1 and stats.mass[0, 0, -1].item() == 0


def test_positions_below_the_tokens_seen_continue_after_them_and_evictions_count():
    # 10 tokens seen, 4 cached after an eviction: a caller counting the pruned cache restarts at position 4
    stats = DecodeStatistics.start(torch.arange(10).view(1, 1, 10))
    stats.observe(torch.full((1, 1, 10), 0.1))
    stats.keep(torch.tensor([[[0, 1, 8, 9]]]))
    assert stats.since_eviction == 0 and stats.seen == 10
    stats.append(torch.tensor([[[4, 5]]]))
    assert stats.position[0, 0].tolist() == [0, 1, 8, 9, 10, 11] and stats.seen == 12
    stats.append(torch.tensor([[[40]]]))  # a caller's true position beyond: kept as given
    assert stats.position[0, 0, -1].item() == 40 and stats.seen == 41
    stats.observe(torch.full((1, 1, 7), 1 / 7))
    stats.observe(torch.full((1, 1, 7), 1 / 7))
    assert stats.since_eviction == 2 and stats.step == 3


def test_bad_arguments_are_rejected():
    stats = hand_built()
    with pytest.raises(ValueError, match="policy"):
        kept_indices(stats, 4, "fifo")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            kept_indices(stats, bad, "h2o")
    with pytest.raises(ValueError, match="sink_tokens"):
        kept_indices(stats, 4, "h2o", sink_tokens=-1)
    with pytest.raises(ValueError, match="decay"):
        DecodeStatistics.start(torch.zeros(1, 1, 3, dtype=torch.long), decay=1.0)
    with pytest.raises(ValueError, match="prior"):
        DecodeStatistics.start(torch.zeros(1, 1, 3, dtype=torch.long), prior=torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="probs"):
        stats.observe(torch.zeros(1, 1, 3))


@pytest.mark.parametrize("threshold", [None, 0.05])
def test_record_steps_equals_appending_and_observing_step_by_step(threshold):
    g = torch.Generator().manual_seed(3)
    b, h, t, s = 2, 3, 7, 5
    start = torch.arange(t).expand(b, h, t)
    prior = torch.rand(b, h, t, generator=g)
    one, batched = (DecodeStatistics.start(start, prior=prior, decay=0.8, threshold=threshold) for _ in range(2))
    one.observe(torch.rand(b, h, t, generator=g).softmax(-1))
    batched.mass, batched.ema, batched.last_used = one.mass, one.ema, one.last_used
    batched.step = one.step
    probs = torch.zeros(b, h, s, t + s)
    for step in range(s):
        probs[:, :, step, : t + step + 1] = torch.rand(b, h, t + step + 1, generator=g).softmax(-1)
        one.append(torch.full((b, h, 1), t + step))
        one.observe(probs[:, :, step, : t + step + 1])
    batched.record_steps(torch.arange(t, t + s).expand(b, h, s), probs)
    assert batched.step == one.step == s + 1 and batched.seen == one.seen == t + s and batched.length == t + s
    torch.testing.assert_close(batched.position, one.position)
    torch.testing.assert_close(batched.mass, one.mass)
    torch.testing.assert_close(batched.ema, one.ema)
    torch.testing.assert_close(batched.prior, one.prior)  # new tokens' priors: 1 / (length at their step)
    assert torch.equal(batched.last_used, one.last_used)
    with pytest.raises(ValueError, match="probs"):
        batched.record_steps(torch.zeros(b, h, 2, dtype=torch.long), torch.zeros(b, h, 2, t + s))


def test_scores_to_prior_ranks_scores_into_a_distribution():
    scores = torch.tensor([[[3.0, -1.0, 10.0, 3.0]]])
    prior = scores_to_prior(scores)
    # ranks from the lowest: -1 -> 1, 3 (index 0) -> 2, 3 (index 3) -> 3, 10 -> 4; over 4 * 5 / 2
    torch.testing.assert_close(prior, torch.tensor([[[2.0, 1.0, 4.0, 3.0]]]) / 10)
    torch.testing.assert_close(scores_to_prior(scores * 1e6 - 7), prior)  # any scale


def test_step_probs_is_causal_across_steps_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 6, 4, generator=g)
    queries = torch.randn(1, 4, 3, 4, generator=g)  # two query heads per KV head, three steps after 3 tokens
    probs = step_probs(queries, keys, 3)
    assert probs.shape == (1, 2, 3, 6)
    for step in range(3):
        assert (probs[:, :, step, 3 + step + 1 :] == 0).all()
        expected = torch.stack([torch.softmax(keys[0, j // 2, : 4 + step] @ queries[0, j, step], 0) for j in range(4)])
        torch.testing.assert_close(probs[0, :, step, : 4 + step], expected.view(2, 2, -1).mean(dim=1))
    with pytest.raises(ValueError, match="keys"):
        step_probs(queries, keys, 2)
