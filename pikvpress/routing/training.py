"""Training the learned router: KVzip's reconstruction attention as the target, ridge regression as the fit.

For each training context, :func:`kvzip_targets` runs kvpress's :class:`~kvpress.KVzipPress` (a prefill
plus the "repeat the context" passes) and returns, per layer, every context token's attention-input
hidden state and its KVzip score (the largest attention any reconstruction query pays it).
:class:`RidgeFit` accumulates ``X^T X`` and ``X^T y`` of ``hidden -> log(score)`` layer by layer, so
the data never has to fit in memory, and solves the ridge system in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from kvpress import KVzipPress
from torch import nn
from transformers import DynamicCache

from pikvpress.models.adapter import language_model
from pikvpress.routing.learned import LearnedRouter, RouterSpec, model_geometry, model_name_of

#: scores below this are clipped before the log (KVzip scores are attention probabilities)
SCORE_FLOOR = 1e-5


@dataclass
class KVzipSample:
    """One context's training data.

    Parameters
    ----------
    hidden_states : list of torch.Tensor
        Per layer, ``(T, hidden)`` float32 inputs of the attention module during the prefill.
    scores : torch.Tensor
        ``(layers, kv_heads, T)`` float32 KVzip scores.
    start : int
        First context token (the chat template's prefix before it gets no KVzip score).
    """

    hidden_states: list[torch.Tensor]
    scores: torch.Tensor
    start: int


class _ScoreCapture(KVzipPress):
    """KVzipPress that records its scores instead of masking the cache."""

    captured: torch.Tensor | None = None

    def compress_post(self, model: nn.Module) -> None:
        self.captured = self.score_val.detach().float().clone()


@contextmanager
def _first_attention_inputs(model: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Record each layer's first attention input ``(T, hidden)`` (float32, CPU) while the block runs.

    Only the first call per layer is kept: in a KVzip run, later calls are its reconstruction passes.
    """
    layers = language_model(model).layers
    hidden: list[torch.Tensor | None] = [None] * len(layers)

    def record(module, args, kwargs):
        idx = int(module.layer_idx)
        if hidden[idx] is None:
            hidden[idx] = kwargs["hidden_states"][0].detach().float().cpu()

    hooks = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        yield hidden
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def kvzip_targets(model: nn.Module, context_ids: torch.Tensor, chunk_size: int = 2048) -> KVzipSample:
    """Hidden states and KVzip scores of one ``(1, T)`` context (kvpress's KVzip scoring, unchanged)."""
    if context_ids.ndim != 2 or context_ids.shape[0] != 1:
        raise ValueError("context_ids must be (1, T): KVzip scores one context at a time")
    press = _ScoreCapture(compression_ratio=0.5, chunk_size=chunk_size)
    with _first_attention_inputs(model) as hidden, press(model):
        model.model(input_ids=context_ids.to(model.device), past_key_values=DynamicCache())
        start = press.prefix_length
    if press.captured is None:
        raise RuntimeError("KVzip produced no scores")
    return KVzipSample(hidden, press.captured[:, 0].cpu(), start)


@torch.no_grad()
def prefill_hidden_states(model: nn.Module, context_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``(T, hidden)`` float32 attention inputs of a plain prefill of ``(1, T)`` ``context_ids``."""
    with _first_attention_inputs(model) as hidden:
        language_model(model)(input_ids=context_ids.to(model.device), past_key_values=DynamicCache())
    return hidden


def log_target(scores: torch.Tensor) -> torch.Tensor:
    """What the router predicts: ``log(max(score, SCORE_FLOOR))``."""
    return scores.clamp_min(SCORE_FLOOR).log()


class RidgeFit:
    """Streaming ridge regression of ``log KVzip score`` on the hidden state, one system per layer.

    Parameters
    ----------
    num_layers, hidden_size, num_kv_heads : int
        The model geometry.
    """

    def __init__(self, num_layers: int, hidden_size: int, num_kv_heads: int):
        self.xtx = torch.zeros(num_layers, hidden_size + 1, hidden_size + 1, dtype=torch.float64)
        self.xty = torch.zeros(num_layers, hidden_size + 1, num_kv_heads, dtype=torch.float64)
        self.tokens = 0

    def add(self, sample: KVzipSample, skip: int = 0) -> None:
        """Add a sample's context tokens (from ``sample.start + skip`` on)."""
        first = sample.start + skip
        targets = log_target(sample.scores[..., first:])  # (L, H, T')
        for layer, h in enumerate(sample.hidden_states):
            x = torch.cat([h[first:], torch.ones(h.shape[0] - first, 1)], dim=1).double()
            self.xtx[layer] += x.T @ x
            self.xty[layer] += x.T @ targets[layer].T.double()
        self.tokens += targets.shape[-1]

    def solve(self, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights (L, kv_heads, hidden), bias (L, kv_heads))``; ``ridge`` scales with the token count."""
        if self.tokens == 0:
            raise ValueError("no training tokens were added")
        eye = torch.eye(self.xtx.shape[-1], dtype=torch.float64)
        eye[-1, -1] = 0.0  # the bias is not penalised
        solution = torch.linalg.solve(self.xtx + ridge * self.tokens / 1000.0 * eye, self.xty)  # (L, H+1, heads)
        return solution[:, :-1].transpose(1, 2).float(), solution[:, -1].float()


class MlpFit:
    """Two-layer MLP routers (``hidden -> hidden_dim -> kv_heads``, GELU) fitted by Adam on a token sample.

    Parameters
    ----------
    num_layers, hidden_size, num_kv_heads : int
        The model geometry.
    hidden_dim : int
        Width of the MLP.
    tokens_per_sample : int
        Context tokens drawn (evenly spaced) from each sample for each layer.
    """

    def __init__(
        self, num_layers: int, hidden_size: int, num_kv_heads: int, hidden_dim: int = 32, tokens_per_sample: int = 512
    ):
        self.geometry = (num_layers, hidden_size, num_kv_heads)
        self.hidden_dim = hidden_dim
        self.tokens_per_sample = tokens_per_sample
        self.x: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.y: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def add(self, sample: KVzipSample) -> None:
        t = sample.scores.shape[-1] - sample.start
        pick = sample.start + torch.linspace(0, t - 1, min(t, self.tokens_per_sample)).long()
        targets = log_target(sample.scores[..., pick])  # (L, H, n)
        for layer, h in enumerate(sample.hidden_states):
            self.x[layer].append(h[pick].half())
            self.y[layer].append(targets[layer].T.float())

    def fit(self, model: nn.Module, epochs: int = 300, lr: float = 3e-3, seed: int = 0) -> LearnedRouter:
        """Train every layer's MLP (full-batch Adam, mean squared error on the log scores)."""
        layers, hidden, heads = self.geometry
        torch.manual_seed(seed)
        router = LearnedRouter(RouterSpec(model_name_of(model), layers, hidden, heads, hidden_dim=self.hidden_dim))
        for layer, module in enumerate(router.layers):
            x, y = torch.cat(self.x[layer]).float(), torch.cat(self.y[layer])
            optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=1e-4)
            with torch.enable_grad():
                for _ in range(epochs):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.mse_loss(module(x), y)
                    loss.backward()
                    optimizer.step()
        return router.eval()


class LayerBudgetFit:
    """How KVzip's global top-k (one budget for every layer and head) splits across layers, averaged.

    Parameters
    ----------
    num_layers : int
        Layers of the model.
    ratios : torch.Tensor, optional
        Compression ratios of the table (default 0.05, 0.10, ..., 0.95).
    """

    def __init__(self, num_layers: int, ratios: torch.Tensor | None = None):
        self.ratios = torch.arange(1, 20) / 20 if ratios is None else ratios.float()
        self.total = torch.zeros(len(self.ratios), num_layers, dtype=torch.float64)
        self.samples = 0

    def add(self, sample: KVzipSample) -> None:
        scores = sample.scores[..., sample.start :].float()  # (L, H, T')
        flat = scores.flatten().sort().values
        for r, ratio in enumerate(self.ratios.tolist()):
            threshold = flat[min(int(ratio * flat.numel()), flat.numel() - 1)]
            kept = (scores >= threshold).float().mean(dim=(1, 2))  # (L,) share of each layer kept
            self.total[r] += (kept / kept.mean().clamp_min(1e-12)).double()
        self.samples += 1

    def weights(self) -> torch.Tensor:
        """``(R, L)`` mean relative keep budget per layer (mean 1 over layers)."""
        if self.samples == 0:
            raise ValueError("no samples were added")
        return (self.total / self.samples).float()


def linear_router(model: nn.Module, weights: torch.Tensor, bias: torch.Tensor) -> LearnedRouter:
    """A linear :class:`LearnedRouter` for ``model`` holding ``weights`` / ``bias`` from :meth:`RidgeFit.solve`."""
    layers, hidden, heads = model_geometry(model)
    router = LearnedRouter(RouterSpec(model_name_of(model), layers, hidden, heads))
    with torch.no_grad():
        for layer, module in enumerate(router.layers):
            module.weight.copy_(weights[layer])
            module.bias.copy_(bias[layer])
    return router.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (ties broken by position)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError("spearman needs two tensors of the same length >= 2")
    ra = torch.argsort(torch.argsort(a.flatten())).double()
    rb = torch.argsort(torch.argsort(b.flatten())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


@torch.no_grad()
def router_agreement(router: LearnedRouter, sample: KVzipSample) -> torch.Tensor:
    """``(layers,)`` mean over KV heads of the Spearman correlation between predictions and KVzip scores."""
    out = []
    for layer, h in enumerate(sample.hidden_states):
        pred = router.predict(layer, h[None])[0]  # (heads, T)
        truth = sample.scores[layer]
        first = sample.start
        out.append(sum(spearman(pred[j, first:], truth[j, first:]) for j in range(pred.shape[0])) / pred.shape[0])
    return torch.tensor(out)
