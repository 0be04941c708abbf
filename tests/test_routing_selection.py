"""The pure functions ExpertRoutingPress is made of (pikvpress.routing.experts / selection / token_scores / gate)."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny_model
from kvpress import KeyDiffPress

from pikvpress.models import get_adapter
from pikvpress.routing.experts import (
    attention_mass,
    centroid_mass,
    key_experts,
    predicted_mass,
    route_by_gate,
    top_k_mass,
)
from pikvpress.routing.gate import GateInputs
from pikvpress.routing.selection import (
    choose_in_experts,
    head_budgets,
    kept_indices,
    protected_tokens,
    selection_scores,
)
from pikvpress.routing.token_scores import keydiff_scores, span_max, window_scores


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_protected_tokens_are_the_sinks_and_the_recent_ones():
    p = protected_tokens(10, 2, 3, "cpu")
    assert p.tolist() == [True, True, False, False, False, False, False, True, True, True]
    assert not protected_tokens(5, 0, 0, "cpu").any()


def test_top_k_mass_gives_each_query_one_unit_over_its_top_k_experts():
    per_query = torch.softmax(torch.randn(2, 3, 7, 5, generator=gen()), dim=-1)
    mass = top_k_mass(per_query, 2)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 3), 7.0))
    only_top1 = top_k_mass(per_query, 1)
    expected = torch.zeros(2, 3, 5).scatter_add_(-1, per_query.argmax(-1), torch.ones(2, 3, 7))
    torch.testing.assert_close(only_top1, expected)


def test_route_by_gate_puts_tokens_in_their_top_expert_and_counts_the_span():
    probs = torch.softmax(torch.randn(2, 12, 4, generator=gen(1)), dim=-1)
    r = route_by_gate(probs, heads=3, span=slice(2, 9), window=4, top_k=2)
    assert r.assignment.shape == (2, 3, 12) and torch.equal(r.assignment[:, 0], probs.argmax(-1))
    expected = torch.stack([torch.bincount(probs[b, 2:9].argmax(-1), minlength=4) for b in range(2)])
    assert torch.equal(r.sizes[:, 1], expected) and r.router == "gate"
    torch.testing.assert_close(r.mass.sum(-1), torch.full((2, 3), 4.0))  # four window queries


def test_key_experts_partition_the_span_and_the_masses_follow_the_formulas():
    keys = torch.randn(1, 2, 20, 8, generator=gen(2))
    unit = torch.nn.functional.normalize(keys, dim=-1)
    span = slice(2, 18)
    assignment, sizes, member = key_experts(unit, span, 4, 3)
    assert sizes.sum(-1).tolist() == [[16, 16]] and (assignment[..., :2] == 0).all()
    assert torch.equal(member.sum(-2), torch.ones(1, 2, 16))
    assert torch.equal(member.argmax(-2), assignment[..., span])
    # centroid mass: softmax over experts of q . (the expert's mean key), each query to its top-k
    queries = torch.randn(1, 2, 5, 8, generator=gen(3))
    means = torch.stack(
        [torch.stack([keys[0, h, span][assignment[0, h, span] == e].mean(0) for e in range(4)]) for h in range(2)]
    )
    per_query = torch.softmax(queries[0] @ means.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(
        centroid_mass(queries, keys[:, :, span], member, sizes, 2), top_k_mass(per_query, 2)[None]
    )
    # measured mass: each query's attention summed per expert
    attention = torch.softmax(torch.randn(1, 2, 5, 16, generator=gen(4)), dim=-1)
    per_expert = torch.stack([(attention * (assignment[..., span] == e)[:, :, None]).sum(-1) for e in range(4)], -1)
    torch.testing.assert_close(attention_mass(attention, member, 2), top_k_mass(per_expert, 2))
    # predicted mass: a softmax of the predicted log-attention over the span, summed per expert
    scores = torch.randn(1, 2, 16, generator=gen(5))
    mass = predicted_mass(scores, assignment[..., span], 4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2))
    torch.testing.assert_close(mass[0, 0, 1], torch.softmax(scores[0, 0], -1)[assignment[0, 0, span] == 1].sum())


def test_head_budgets_share_the_layer_budget_by_score_with_a_floor():
    scores = torch.randn(2, 4, 30, generator=gen(6))
    scores[:, 0] += 10  # head 0 holds the best tokens
    protected = protected_tokens(30, 2, 2, "cpu")
    kept = head_budgets(scores, protected, n_kept=10, n_protected=4, floor=0.5)
    assert kept.sum(-1).tolist() == [40, 40]
    assert (kept >= 5).all() and (kept[:, 0] > kept[:, 1:].max(-1).values).all()


def test_choose_in_experts_keeps_each_experts_best_tokens_and_every_protected_one():
    b, h, t, e = 2, 3, 24, 3
    scores = torch.randn(b, h, t, generator=gen(7))
    protected = protected_tokens(t, 2, 2, "cpu")
    assignment = torch.randint(0, e, (b, h, t), generator=gen(8)).masked_fill(protected, 0)
    sizes = torch.stack([((assignment == x) & ~protected).sum(-1) for x in range(e)], -1)
    kept = torch.minimum(sizes, torch.tensor([3, 1, 2]))
    chosen, by_score = choose_in_experts(scores, assignment, protected, sizes, kept)
    assert chosen[..., protected].all()
    for x in range(e):
        members = (assignment == x) & ~protected
        picked = chosen & members
        assert torch.equal(picked.sum(-1), kept[..., x])
        # no unpicked member scores above a picked one
        worst_picked = scores.masked_fill(~picked, float("inf")).amin(-1)
        best_left = scores.masked_fill(~(members & ~picked), float("-inf")).amax(-1)
        assert (worst_picked >= best_left).all()
    assert torch.equal(scores.gather(-1, by_score), scores.sort(-1, descending=True).values)
    # the selection scores' top-k is the choice, and kept_indices returns it in context order
    n = int(chosen.sum(-1).max())
    assert (chosen.sum(-1) == n).all()
    sel = selection_scores(scores, protected, chosen, by_score, e)
    top = sel.topk(n, dim=-1).indices
    assert torch.equal(torch.zeros_like(chosen).scatter_(-1, top, True), chosen)
    indices = kept_indices(chosen, torch.full((b, h), n), sel, e)
    assert torch.equal(indices, indices.sort(-1).values) and torch.equal(
        chosen.gather(-1, indices), torch.ones_like(indices, dtype=torch.bool)
    )


def test_keydiff_scores_equal_kvpress_keydiff():
    keys = torch.randn(2, 2, 17, 8, generator=gen(9))
    expected = KeyDiffPress().score(None, None, keys, None, None, {})
    torch.testing.assert_close(keydiff_scores(torch.nn.functional.normalize(keys, dim=-1)), expected.float())


def test_window_scores_average_over_the_queries_that_see_each_token():
    window, t = 3, 8
    attention = torch.softmax(torch.randn(1, 1, 2 * window, t, generator=gen(10)), dim=-1)  # two query heads
    scores = window_scores(attention, window, kernel_size=1)
    seen = torch.tensor([3.0] * (t - window) + [3.0, 2.0, 1.0])
    torch.testing.assert_close(scores[0, 0], attention[0, 0].sum(0) / (seen * 2))
    hit = torch.zeros(1, 1, 9)
    hit[..., 4] = 1.0
    assert span_max(hit, 3)[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_gate_inputs_record_during_a_prefill_and_forget_everything_when_removed():
    model = get_tiny_model("qwen3_moe")
    layers = get_adapter(model).layers
    inputs = GateInputs()
    inputs.install(layers)
    assert inputs._hooks and inputs.last_layer == max(layer.layer_idx for layer in layers if layer.router is not None)
    ids = torch.randint(3, 200, (1, 9), generator=gen(11))
    with torch.no_grad():
        model(input_ids=ids)
    layer = next(layer for layer in layers if layer.router is not None)
    assert inputs.routing(layer, torch.zeros(1, 9, 64)) is None  # no attention output handed over yet
    inputs.attention_output(layer.layer_idx, torch.zeros(1, 9, 64))
    routing = inputs.routing(layer, torch.zeros(1, 9, 64))
    assert routing is not None and routing.probs.shape[:2] == (1, 9)
    assert inputs.routing(layer, torch.zeros(1, 5, 64)) is None  # other tokens than the ones recorded
    inputs.remove()
    assert not inputs._hooks and not inputs._layer_inputs and not inputs._attention_outputs
    with torch.no_grad():
        model(input_ids=ids)
    assert not inputs._layer_inputs


@pytest.mark.parametrize("experts", [1, 3])
def test_kept_indices_fill_unequal_head_shares_with_next_best(experts):
    scores = torch.arange(12.0).view(1, 1, 12).expand(1, 2, 12).contiguous()
    chosen = torch.zeros(1, 2, 12, dtype=torch.bool)
    chosen[0, 0, :4] = True
    chosen[0, 1, :2] = True
    sel = selection_scores(
        scores, torch.zeros(12, dtype=torch.bool), chosen, scores.argsort(-1, descending=True), experts
    )
    indices = kept_indices(chosen, torch.tensor([[4, 2]]), sel, experts)
    assert indices.shape == (1, 2, 4)
