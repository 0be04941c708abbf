"""Routing math: key-space spherical k-means and the keep-budget split across experts."""

from __future__ import annotations

import pytest
import torch

from pikvpress.routing import allocate_budget, spherical_kmeans


def test_kmeans_recovers_planted_directions_and_is_deterministic():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    dirs = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=-1) * 4
    labels = torch.arange(60) % 3  # interleaved, so evenly spaced initial tokens hit every cluster
    keys = (dirs[labels] + 0.05 * torch.randn(60, 16, generator=gen)).view(1, 1, 60, 16).repeat(2, 2, 1, 1)
    a = spherical_kmeans(keys, 3, iterations=5)
    b = spherical_kmeans(keys.clone(), 3, iterations=5)
    assert torch.equal(a.assignment, b.assignment) and torch.equal(a.centroids, b.centroids)
    assert a.assignment.shape == (2, 2, 60) and a.centroids.shape == (2, 2, 3, 16)
    for row in a.assignment.view(-1, 60):  # same partition as the planted labels, up to renaming
        mapping = {int(l): int(c) for l, c in zip(labels, row)}
        assert len(set(mapping.values())) == 3
        assert all(mapping[int(l)] == int(c) for l, c in zip(labels, row))
    assert torch.equal(a.sizes, torch.full((2, 2, 3), 20))
    torch.testing.assert_close(a.centroids.norm(dim=-1), torch.ones(2, 2, 3))


def test_kmeans_bad_arguments():
    keys = torch.randn(1, 1, 4, 8)
    for bad, name in ((0, "num_experts"), (True, "num_experts")):
        with pytest.raises(ValueError, match=name):
            spherical_kmeans(keys, bad)
    with pytest.raises(ValueError, match="cannot split 4 tokens"):
        spherical_kmeans(keys, 5)
    with pytest.raises(ValueError, match="iterations"):
        spherical_kmeans(keys, 2, iterations=-1)


@pytest.mark.parametrize("seed", range(20))
def test_budget_sums_exactly_respects_sizes_and_floors(seed):
    gen = torch.Generator().manual_seed(seed)
    e = int(torch.randint(1, 9, (1,), generator=gen))
    sizes = torch.randint(0, 30, (3, 2, e), generator=gen)
    sizes[..., 0] += 1
    mass = torch.rand(3, 2, e, generator=gen) * (torch.rand(3, 2, e, generator=gen) > 0.3)
    total = int(sizes.sum(-1).min())
    for budget in sorted({0, 1, total // 3, total // 2, total}):
        kept = allocate_budget(mass, sizes, budget, floor=2)
        assert torch.equal(kept.sum(-1), torch.full((3, 2), budget))
        assert bool((kept >= 0).all()) and bool((kept <= sizes).all())
        populated = (sizes > 0).sum(-1)
        covered = 2 * populated <= budget  # rows whose budget covers every floor
        floors = torch.minimum(sizes, torch.full_like(sizes, 2))
        assert bool(((kept >= floors) | ~covered.unsqueeze(-1)).all())


def test_budget_row_by_row_equals_the_batched_split():
    # up to 32 rows run row by row in Python, more as one numpy computation: the same numbers either way
    gen = torch.Generator().manual_seed(0)
    for e in (1, 3, 8, 9, 20):
        sizes = torch.randint(0, 30, (400, e), generator=gen)
        mass = torch.rand(400, e, generator=gen) * (torch.rand(400, e, generator=gen) > 0.3)
        mass[::7] = (mass[::7] * 10).round() / 10  # ties
        budget = (torch.rand(400, generator=gen) * (sizes.sum(-1) + 1)).long().clamp_max(sizes.sum(-1))
        for floor in (0, 1, 2):
            batched = allocate_budget(mass, sizes, budget, floor=floor)
            rows = torch.cat(
                [allocate_budget(mass[i : i + 1], sizes[i : i + 1], budget[i : i + 1], floor) for i in range(400)]
            )
            assert torch.equal(batched, rows)
            assert torch.equal(batched.sum(-1), budget)


def test_budget_follows_mass():
    sizes = torch.tensor([[100, 100, 100, 100]])
    mass = torch.tensor([[0.7, 0.2, 0.1, 0.0]])
    kept = allocate_budget(mass, sizes, 100, floor=1)
    assert kept.tolist() == [[68, 20, 11, 1]]  # floor 1 each, then 96 split 0.7/0.2/0.1 by largest remainder
    capped = allocate_budget(mass, torch.tensor([[10, 100, 100, 100]]), 100, floor=0)
    assert capped[0, 0] == 10 and capped.sum() == 100 and capped[0, 1] > capped[0, 2]


def test_budget_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(torch.ones(1, 2), torch.tensor([[1, 1]]), 3)
    with pytest.raises(ValueError, match="same shape"):
        allocate_budget(torch.ones(1, 3), torch.tensor([[1, 1]]), 1)
    with pytest.raises(ValueError, match="floor"):
        allocate_budget(torch.ones(1, 2), torch.tensor([[1, 1]]), 1, floor=-1)


MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "phimoe", "gpt_oss", "deepseek_v2", "deepseek_v3")


@pytest.mark.parametrize("family", MOE_FAMILIES + ("llama",))
def test_gate_routing_equals_the_models_own_routing(family):
    """From the attention hook's point of view (layer input + attention output), the gate sees exactly
    the MLP input the decoder layer computes next, on every MoE layer; dense layers have no router."""
    from conftest import get_tiny_model

    from pikvpress.models import get_adapter
    from pikvpress.routing import gate_routing

    model = get_tiny_model(family)
    layers = get_adapter(model).layers
    seen: dict[int, dict] = {}
    hooks = []
    for layer in layers:
        idx = layer.layer_idx
        record = seen.setdefault(idx, {})
        dec, attn, mlp = layer.decoder_layer, layer.attention, layer.decoder_layer.mlp
        hooks.append(
            dec.register_forward_pre_hook(
                lambda m, a, kw, r=record: r.__setitem__("input", (a[0] if a else kw["hidden_states"]).clone()),
                with_kwargs=True,
            )
        )
        hooks.append(attn.register_forward_hook(lambda m, a, o, r=record: r.__setitem__("attn", o[0].clone())))
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, r=record: r.__setitem__("mlp", a[0].clone())))
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    routed = 0
    for layer in layers:
        rec = seen[layer.layer_idx]
        with torch.no_grad():
            got = gate_routing(layer, rec["input"], rec["attn"])
        if layer.router is None:
            assert got is None
            continue
        routed += 1
        with torch.no_grad():
            want = layer.router(rec["mlp"])
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.topk_indices, want.topk_indices)
    assert routed > 0 if family != "llama" else routed == 0


def test_budget_per_row():
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(5, 40, (2, 3, 4), generator=gen)
    mass = torch.rand(2, 3, 4, generator=gen)
    budget = torch.minimum(torch.randint(0, 60, (2, 3), generator=gen), sizes.sum(-1))
    kept = allocate_budget(mass, sizes, budget, floor=1)
    assert torch.equal(kept.sum(-1), budget)
    assert bool((kept <= sizes).all())
    for row in range(2):  # row by row with a scalar budget gives the same split
        for head in range(3):
            one = allocate_budget(mass[row, head], sizes[row, head], int(budget[row, head]), floor=1)
            assert torch.equal(one, kept[row, head])
    with pytest.raises(ValueError, match="per-row budget"):
        allocate_budget(mass, sizes, budget[0])
    with pytest.raises(ValueError, match="exceeds"):
        allocate_budget(mass, sizes, sizes.sum(-1) + 1)
