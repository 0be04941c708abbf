"""ExpertRoutingPress: routers, budgets, protection, learned router files, wrappers, harness registration."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import get_tiny_model
from default_presses import tiny_router_dir
from kvpress import ComposedPress, DecodingPress, KeyDiffPress, KnormPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

from pikvpress_eval.prefill import can_reuse_prefill
from pikvpress_eval.presses import build_press, takes_ratio
from pikvpress import ExpertRoutingPress
from pikvpress.cache.ops import gather_kept
from pikvpress.models import TINY_FAMILIES, get_adapter
from pikvpress.routing import LearnedRouter, RouterSpec, load_router, spherical_kmeans
from pikvpress.routing.training import KVzipSample, MlpFit, RidgeFit, linear_router, spearman

MOE_FAMILIES = [f for f in TINY_FAMILIES if get_adapter(get_tiny_model(f)).is_moe]
T = 48


def ids(batch: int = 1, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(model, press, input_ids):
    cache = DynamicCache(config=model.config)
    with press(model):
        model(input_ids=input_ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"router": "mlp"}, "router"),
        ({"scorer": "keynorm"}, "scorer"),
        ({"window_size": 0}, "window_size"),
        ({"n_sink": -1}, "n_sink"),
        ({"expert_floor": -2}, "expert_floor"),
        ({"compression_ratio": 1.0}, "compression_ratio"),
        ({"head_budget": "global"}, "head_budget"),
        ({"head_floor": 1.5}, "head_floor"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExpertRoutingPress(**kwargs)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gate_router_uses_every_moe_layers_gate_and_falls_back_on_dense_layers(family):
    model = get_tiny_model(family)
    press = ExpertRoutingPress(0.5, router="gate", window_size=8)
    prefill(model, press, ids())
    adapter = get_adapter(model)
    for layer in adapter.layers:
        if layer.is_sliding:
            assert layer.layer_idx not in press.stats
            continue
        stats = press.stats[layer.layer_idx]
        if layer.router is not None:
            assert stats.router == "gate"
            assert stats.sizes.shape[-1] == layer.router.num_experts
        else:
            assert stats.router == "keys (no MoE gate)"


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_gate_router_inside_composed_press_still_reads_the_gate(family):
    model = get_tiny_model(family)
    inner = ExpertRoutingPress(0.5, router="gate", window_size=8)
    cache = prefill(model, ComposedPress([inner, KnormPress(0.25)]), ids())
    expected = compute_n_kept(compute_n_kept(T, 0.5), 0.25)
    assert {cache.layers[i].keys.shape[2] for i in range(len(cache.layers))} == {expected}
    routers = {s.router for s in inner.stats.values()}
    assert routers == ({"gate"} if family == "qwen3_moe" else {"keys (no MoE gate)"})
    assert not inner._gate_inputs._hooks  # removed after the prefill's last MoE layer


@pytest.mark.parametrize("router", ["keys", "gate", "learned"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_budget_split_floors_and_protected_tokens(router, ratio):
    model = get_tiny_model("qwen3_moe")
    press = ExpertRoutingPress(
        ratio,
        router=router,
        num_experts=4,
        top_k=1,
        window_size=8,
        n_sink=2,
        n_recent=3,
        router_weights=tiny_router_dir(),
    )
    cache = prefill(model, press, ids(batch=2))
    n_kept = compute_n_kept(T, ratio)
    for idx, stats in press.stats.items():
        assert cache.layers[idx].keys.shape[2] == n_kept
        assert stats.protected == 5
        assert torch.equal(stats.kept.sum(-1), torch.full((2, 2), n_kept - 5))
        assert bool((stats.kept <= stats.sizes).all())
        populated = stats.sizes > 0
        budget_covers_floors = populated.sum(-1) <= n_kept - 5
        assert bool((stats.kept[populated & budget_covers_floors[..., None]] >= 1).all())
        assert torch.allclose(stats.mass.sum(-1), torch.ones(2, 2))
    frame = press.stats_frame()
    assert list(frame["layer"]) == sorted(press.stats) and set(frame["kept_total"]) == {float(n_kept)}


def test_sinks_and_recent_tokens_are_kept_and_experts_keep_their_best_tokens():
    model = get_tiny_model("llama")
    press = ExpertRoutingPress(0.5, router="keys", num_experts=3, window_size=8, n_sink=2, n_recent=4)
    captured = {}

    def keep_scores(module, args, kwargs, output):
        captured[module.layer_idx] = kwargs["past_key_values"].layers[module.layer_idx].keys.clone()

    adapter = get_adapter(model)
    hooks = [layer.attention.register_forward_hook(keep_scores, with_kwargs=True) for layer in adapter.layers]
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad(), press(model):
            model(input_ids=ids(), past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    # keep_scores runs before the press's hook (registered first): it saw the full keys
    for idx in press.stats:
        full, kept = captured[idx], cache.layers[idx].keys
        for head in range(full.shape[1]):
            rows = {tuple(r.tolist()) for r in kept[0, head]}
            for pos in [0, 1, T - 4, T - 3, T - 2, T - 1]:
                assert tuple(full[0, head, pos].tolist()) in rows
        # each expert holds exactly the tokens its budget says (the clustering is deterministic)
        clusters = spherical_kmeans(full[:, :, 2 : T - 4], 3, press.kmeans_iterations)
        for head in range(full.shape[1]):
            rows = {tuple(r.tolist()) for r in kept[0, head]}
            in_cache = torch.tensor([tuple(full[0, head, 2 + i].tolist()) in rows for i in range(T - 6)])
            per_expert = [int(in_cache[clusters.assignment[0, head] == e].sum()) for e in range(3)]
            assert per_expert == press.stats[idx].kept[0, head].tolist()


def test_learned_router_with_one_expert_is_a_plain_top_k_of_its_predictions():
    model = get_tiny_model("llama")
    router = load_router(model, tiny_router_dir())
    press = ExpertRoutingPress(
        0.5, router="learned", num_experts=1, top_k=1, n_sink=0, n_recent=0, router_weights=tiny_router_dir()
    )
    hidden = {}

    def record(module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"].clone()

    adapter = get_adapter(model)
    hooks = [layer.attention.register_forward_pre_hook(record, with_kwargs=True) for layer in adapter.layers]
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids(), past_key_values=full)
    try:
        cache = prefill(model, press, ids())
    finally:
        for hook in hooks:
            hook.remove()
    n_kept = compute_n_kept(T, 0.5)
    for idx in range(len(adapter.layers)):
        top = router.predict(idx, hidden[idx]).topk(n_kept, dim=-1).indices.sort(dim=-1).values  # (1, H, n)
        expected = full.layers[idx].keys.gather(2, top[..., None].expand(-1, -1, -1, full.layers[idx].keys.shape[-1]))
        got = cache.layers[idx].keys
        for head in range(got.shape[1]):  # the same set (cache order follows the press's scores)
            assert sorted(map(tuple, got[0, head].tolist())) == sorted(map(tuple, expected[0, head].tolist()))


@pytest.mark.parametrize("router", ["keys", "gate", "learned"])
def test_same_input_same_cache(router):
    model = get_tiny_model("mixtral")
    presses = [ExpertRoutingPress(0.5, router=router, window_size=8, router_weights=tiny_router_dir()) for _ in "ab"]
    first, second = (prefill(model, press, ids(seed=3)) for press in presses)
    for a, b in zip(first.layers, second.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_window_larger_than_the_context_is_clamped_with_a_warning(caplog):
    model = get_tiny_model("qwen2")
    press = ExpertRoutingPress(0.5, window_size=500)
    with caplog.at_level(logging.WARNING):
        cache = prefill(model, press, ids(length=20))
    assert "window_size=500" in caplog.text
    assert cache.layers[0].keys.shape[2] == compute_n_kept(20, 0.5)


def test_decoding_press_wraps_it():
    model = get_tiny_model("qwen3_moe")
    press = DecodingPress(
        base_press=ExpertRoutingPress(0.5, router="keys", window_size=4), compression_interval=4, target_size=24
    )
    with torch.no_grad(), press(model):
        out = model.generate(ids(), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == T + 8


# --- learned router files -----------------------------------------------------------------------


def test_router_roundtrip_and_errors(tmp_path):
    model = get_tiny_model("llama")
    torch.manual_seed(0)
    router = LearnedRouter(RouterSpec("x", 4, 64, 2, hidden_dim=8))
    path = router.save(tmp_path / "r.safetensors")
    back = load_router(model, path)
    h = torch.randn(1, 5, 64)
    for layer in range(4):
        torch.testing.assert_close(back.predict(layer, h), router.predict(layer, h), atol=2e-2, rtol=2e-2)
    with pytest.raises(FileNotFoundError, match="train_router"):
        load_router(model)  # nothing ships for the tiny model
    with pytest.raises(ValueError, match="kv_heads"):
        load_router(get_tiny_model("deepseek_v3"), path)
    (tmp_path / "plain.safetensors").write_bytes(b"not a router")
    with pytest.raises(ValueError, match="safetensors"):
        LearnedRouter.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="router_weights"):
        ExpertRoutingPress(0.5, router="learned")(model).__enter__()


def test_ridge_fit_recovers_a_planted_linear_map():
    torch.manual_seed(0)
    layers, hidden, heads, t = 2, 16, 3, 400
    w, b = torch.randn(layers, heads, hidden) * 0.3, torch.randn(layers, heads)
    samples = []
    for _ in range(3):
        h = [torch.randn(t, hidden) for _ in range(layers)]
        log_scores = torch.stack([(w[i] @ h[i].T) + b[i][:, None] for i in range(layers)])  # (L, H, T)
        samples.append(KVzipSample(h, log_scores.exp(), start=5))
    fit = RidgeFit(layers, hidden, heads)
    for s in samples:
        fit.add(s)
    weights, bias = fit.solve(ridge=1e-6)
    torch.testing.assert_close(weights, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bias, b, atol=1e-3, rtol=1e-3)
    assert fit.tokens == 3 * (t - 5)


def test_spearman():
    a = torch.arange(10.0)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman(a, a[:3])


def test_linear_router_holds_the_fitted_weights():
    model = get_tiny_model("llama")
    w, b = torch.randn(4, 2, 64), torch.randn(4, 2)
    router = linear_router(model, w, b)
    h = torch.randn(1, 3, 64)
    torch.testing.assert_close(router.predict(1, h)[0], w[1] @ h[0].T + b[1][:, None])


# --- harness ------------------------------------------------------------------------------------


def test_harness_builds_it_and_shares_prefills_except_for_the_gate_on_moe_models():
    press = build_press("expert_routing", 0.5, router="keys", num_experts=4)
    assert isinstance(press, ExpertRoutingPress) and press.compression_ratio == 0.5
    assert takes_ratio("expert_routing")
    gate = build_press("expert_routing", 0.5, router="gate")
    assert can_reuse_prefill(press, get_tiny_model("qwen3_moe"))
    assert can_reuse_prefill(gate, get_tiny_model("llama"))
    assert not can_reuse_prefill(gate, get_tiny_model("qwen3_moe"))


# --- layer budgets, auto router, scorers by name ---------------------------------------------------


def test_learned_layer_budgets_split_the_uniform_total_by_the_routers_table(tmp_path):
    model = get_tiny_model("qwen2")
    torch.manual_seed(1)
    router = LearnedRouter(RouterSpec("tiny", 4, 64, 2))
    weights = torch.tensor([[0.5, 1.0, 1.0, 1.5], [0.2, 0.6, 1.2, 2.0], [0.1, 0.3, 1.6, 2.0]])
    router.set_layer_budget(torch.tensor([0.25, 0.5, 0.75]), weights)
    path = router.save(tmp_path / "tiny.safetensors")
    torch.testing.assert_close(router.layer_weights(0.625), (weights[1] + weights[2]) / 2)
    for ratio in (0.25, 0.5, 0.625, 0.75):
        press = ExpertRoutingPress(ratio, router="learned", router_weights=str(path))
        cache = prefill(model, press, ids())
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        assert sum(lengths) == 4 * compute_n_kept(T, ratio)
        assert lengths[0] < min(lengths[1:3]) and max(lengths[1:3]) <= lengths[-1]  # the table grows with depth
        assert min(lengths) >= press.n_sink
        assert lengths == [press.layer_kept(i, T) for i in range(4)]
        uniform = prefill(
            model, ExpertRoutingPress(ratio, router="learned", router_weights=str(path), layer_budget="uniform"), ids()
        )
        assert {layer.keys.shape[2] for layer in uniform.layers} == {compute_n_kept(T, ratio)}
    with pytest.raises(ValueError, match="layer_budget"):
        ExpertRoutingPress(0.5, router="keys", layer_budget="learned")
    with pytest.raises(ValueError, match="layer_budget"):
        ExpertRoutingPress(0.5, layer_budget="pyramid")


def test_auto_router_is_learned_with_weights_and_the_gate_without():
    model = get_tiny_model("qwen3_moe")
    press = ExpertRoutingPress(0.5, window_size=8)
    prefill(model, press, ids())
    assert {s.router for s in press.stats.values()} == {"gate"}
    press = ExpertRoutingPress(0.5, router_weights=tiny_router_dir())
    prefill(model, press, ids())
    assert {s.router for s in press.stats.values()} == {"learned"}


@pytest.mark.parametrize("scorer", ["keydiff", "knorm", "expected_attention", "tova", KnormPress()])
def test_kvpress_scorers_rank_inside_experts(scorer):
    model = get_tiny_model("llama")
    press = ExpertRoutingPress(0.5, router="keys", num_experts=3, window_size=8, scorer=scorer)
    cache = prefill(model, press, ids())
    assert {layer.keys.shape[2] for layer in cache.layers} == {compute_n_kept(T, 0.5)}


def test_keydiff_inside_experts_is_kvpress_keydiff():
    model = get_tiny_model("llama")
    press = ExpertRoutingPress(0.5, router="keys", scorer="keydiff")
    press.post_init_from_model(model)
    keys = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    attention = model.model.layers[0].self_attn
    args = (attention, torch.zeros(2, 40, 64), keys, keys, None, {})
    fast = press._token_scores(*args, attention=None, window=0, unit=torch.nn.functional.normalize(keys, dim=-1))
    torch.testing.assert_close(fast, KeyDiffPress().score(*args))


class _TopKOfScores(ExpertRoutingPress):
    """The press pruning by a top-k of its own ``score`` (the generic ScorerPress way)."""

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = self.layer_kept(int(module.layer_idx), keys.shape[2])
        return gather_kept(keys, values, scores.topk(n_kept, dim=-1).indices)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("router", ["keys", "gate", "learned"])
def test_compress_keeps_the_top_of_its_scores(family, router):
    # compress keeps the chosen tokens directly (in context order); the same set as a top-k of score()
    model = get_tiny_model(family)
    kwargs = {"router": router, "num_experts": 3, "window_size": 8, "router_weights": tiny_router_dir()}
    fast = prefill(model, ExpertRoutingPress(0.5, **kwargs), ids(batch=2))
    reference = prefill(model, _TopKOfScores(0.5, **kwargs), ids(batch=2))
    for a, b in zip(fast.layers, reference.layers):
        assert a.keys.shape == b.keys.shape
        for row_a, row_b in zip(a.keys.flatten(0, 1), b.keys.flatten(0, 1)):
            assert sorted(map(tuple, row_a.tolist())) == sorted(map(tuple, row_b.tolist()))


def test_mlp_fit_learns_a_planted_map():
    torch.manual_seed(0)
    model = get_tiny_model("llama")  # geometry (4 layers, 64 hidden, 2 kv heads)
    w = torch.randn(4, 2, 64) * 0.2
    fit = MlpFit(4, 64, 2, hidden_dim=16, tokens_per_sample=200)
    samples = []
    for _ in range(3):
        h = [torch.randn(210, 64) for _ in range(4)]
        samples.append(KVzipSample(h, torch.stack([(w[i] @ h[i].T).exp() for i in range(4)]), start=10))
    for sample in samples:
        fit.add(sample)
    router = fit.fit(model, epochs=200)
    assert router.spec.hidden_dim == 16
    held = [torch.randn(50, 64) for _ in range(4)]
    for layer in range(4):
        pred = router.predict(layer, held[layer][None])[0]
        assert spearman(pred[0], w[layer, 0] @ held[layer].T) > 0.9


def test_span_keeps_the_neighbours_of_a_predicted_hit():
    model = get_tiny_model("llama")
    router = load_router(model, tiny_router_dir())
    with torch.no_grad():
        for module in router.layers:  # every token predicted low except the one whose hidden state is large
            module.weight.zero_()
            module.bias.zero_()
    press = ExpertRoutingPress(
        0.5, router="learned", num_experts=1, top_k=1, span=3, n_sink=0, n_recent=0, router_weights=tiny_router_dir()
    )
    press.post_init_from_model(model)
    press._learned = router
    h = torch.zeros(1, 10, 64)
    h[0, 6] = 1.0
    with torch.no_grad():
        router.layers[0].weight.fill_(1.0)
    attention = model.model.layers[0].self_attn
    scores = press._token_scores(attention, h, torch.zeros(1, 2, 10, 16), None, None, {}, attention=None, window=0)
    assert scores[0, 0].argsort(descending=True)[:3].sort().values.tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="span"):
        ExpertRoutingPress(0.5, span=2)


def test_adaptive_head_budget_is_a_top_k_across_heads_of_the_learned_scores():
    model = get_tiny_model("llama")
    router = load_router(model, tiny_router_dir())
    press = ExpertRoutingPress(
        0.5,
        router="learned",
        num_experts=1,
        top_k=1,
        n_sink=0,
        n_recent=0,
        head_budget="adaptive",
        head_floor=0.0,
        layer_budget="uniform",
        router_weights=tiny_router_dir(),
    )
    hidden = {}
    adapter = get_adapter(model)
    hooks = [
        layer.attention.register_forward_pre_hook(
            lambda m, a, kw: hidden.__setitem__(m.layer_idx, kw["hidden_states"].clone()), with_kwargs=True
        )
        for layer in adapter.layers
    ]
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids(2), past_key_values=full)
    try:
        cache = prefill(model, press, ids(2))
    finally:
        for hook in hooks:
            hook.remove()
    n_kept = compute_n_kept(T, 0.5)
    uneven = 0
    for idx in range(len(adapter.layers)):
        scores = router.predict(idx, hidden[idx]).float()  # (B, H, T)
        b, h, t = scores.shape
        chosen = torch.zeros(b, h * t, dtype=torch.bool)
        chosen.scatter_(1, scores.reshape(b, -1).topk(h * n_kept, dim=-1).indices, True)
        share = chosen.view(b, h, t).sum(-1)  # each head's share of the layer's budget
        assert bool((share.sum(-1) == h * n_kept).all())
        assert torch.equal(press.stats[idx].kept.sum(-1), share)  # the experts spent each head's share
        keys, n_cut = cache.layers[idx].keys, int(share.max())
        assert keys.shape[2] == n_cut  # the layer keeps its largest head's share
        uneven += int((share != n_kept).any())
        top = scores.topk(n_cut, dim=-1).indices  # every head fills that length with its own best tokens
        full_keys = full.layers[idx].keys
        for row in range(b):
            for head in range(h):
                got = {tuple(r.tolist()) for r in keys[row, head]}
                want = {tuple(r.tolist()) for r in full_keys[row, head, top[row, head]]}
                assert got == want
    assert uneven  # the split is not uniform on this model, so the test checks something


def test_adaptive_head_budget_with_full_floor_is_the_uniform_press():
    model = get_tiny_model("qwen3_moe")
    kwargs = {"router": "learned", "router_weights": tiny_router_dir(), "layer_budget": "uniform"}
    uniform = prefill(model, ExpertRoutingPress(0.5, **kwargs), ids())
    adaptive = prefill(model, ExpertRoutingPress(0.5, head_budget="adaptive", head_floor=1.0, **kwargs), ids())
    for a, b in zip(uniform.layers, adaptive.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_keys_router_without_window_attention_routes_by_mean_logit_to_each_expert():
    from pikvpress.models import slice_positions

    model = get_tiny_model("llama")
    press = ExpertRoutingPress(0.5, router="keys", num_experts=3, top_k=2, window_size=8, n_sink=2, n_recent=4)
    assert press.scorer is None  # the default scorer (KeyDiff) computes no window attention
    seen = {}

    def record(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["hidden_states"].clone(), kwargs["position_embeddings"])

    def keep_keys(module, args, kwargs, output):
        seen[(module.layer_idx, "keys")] = kwargs["past_key_values"].layers[module.layer_idx].keys.clone()

    adapter = get_adapter(model)
    hooks = [layer.attention.register_forward_pre_hook(record, with_kwargs=True) for layer in adapter.layers]
    hooks += [layer.attention.register_forward_hook(keep_keys, with_kwargs=True) for layer in adapter.layers]
    try:
        prefill(model, press, ids())
    finally:
        for hook in hooks:
            hook.remove()
    for layer in adapter.layers:
        idx = layer.layer_idx
        hidden, positions = seen[idx]
        keys = seen[(idx, "keys")][:, :, 2 : T - 4]
        clusters = spherical_kmeans(keys, 3, press.kmeans_iterations)
        member = torch.nn.functional.one_hot(clusters.assignment, 3).float()  # (1, H, t, 3)
        means = member.transpose(-1, -2) @ keys / member.sum(2)[..., None].clamp_min(1)
        q = layer.queries(hidden[:, -8:], slice_positions(positions, slice(-8, None)))
        q = q.reshape(1, keys.shape[1], -1, q.shape[-1]) * layer.scaling
        probs = torch.softmax(q @ means.transpose(-1, -2), dim=-1)
        top = probs.topk(2, dim=-1)
        routed = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        mass = (routed / routed.sum(-1, keepdim=True)).sum(2)
        torch.testing.assert_close(press.stats[idx].mass, mass / mass.sum(-1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_adaptive_head_budget_keeps_more_bytes_than_the_ratio_and_decodes():
    model = get_tiny_model("qwen3_moe")
    press = ExpertRoutingPress(
        0.5, router="learned", head_budget="adaptive", n_sink=1, n_recent=1, router_weights=tiny_router_dir()
    )
    cache = prefill(model, press, ids())
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert all(n >= press.layer_kept(i, T) for i, n in enumerate(lengths)) and sum(lengths) > sum(
        press.layer_kept(i, T) for i in range(len(lengths))
    )
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[7]]), past_key_values=cache)
    assert out.logits.shape == (1, 1, model.config.vocab_size)
    assert all(layer.keys.shape[2] == n + 1 for layer, n in zip(cache.layers, lengths))
