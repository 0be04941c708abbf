"""Scores computed once per prefill and shared by the ratios of a sweep.

A kvpress ``ScorerPress`` compresses a layer in two steps: ``score`` rates every cached token, then ``compress`` keeps
the ratio's share of the best. When ``score`` does not depend on the ratio, the five ratios of a leaderboard compute
the same scores five times over the same replayed prefill (:func:`~.prefill.replay_press`). :class:`ScoreMemo` keeps
each layer's scores of one prefill and hands a copy to the next press of the same kind, instead of computing them
again. A score is shared only when it is provably the same computation:

- the scorer is the same class with the same fields except ``compression_ratio`` (compared by ``repr``), wherever it
  sits: SnapKV's window scores serve ``snapkv``, ``adakv_snapkv``, ``critical_snapkv``, ``chunkkv``... at every
  ratio;
- its inputs are the prefill's own: the captured hidden states (the same object), the captured keys and values
  (equal, element for element: a press earlier in a chain that compressed the layer changes them), no attention
  weights;
- the first time a scorer runs (per kind, once per sweep) it is watched: if it reads ``compression_ratio`` from any
  press of the tree (StreamingLLM, Compactor's default blending, CriticalKV's reweighting), draws from torch's,
  Python's or numpy's global random generators (LeverageScore, an unseeded RandomPress), or changes an attribute of a
  press, its scores are never shared;
- every hit is a clone, so a press that edits the scores in place (AdaKV raises its safeguard tokens) edits its own
  copy.

A test (``tests/test_score_memo.py``) replays every press of the leaderboard at every ratio with and without the memo
and requires the caches (and kvpress's head-wise masked keys) to be bitwise equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from kvpress import BasePress
from kvpress.presses.scorer_press import ScorerPress

from .prefill import CapturedPrefill

RATIO = "compression_ratio"


def press_nodes(press: Any, path: str = "press") -> Iterator[tuple[str, BasePress]]:
    """Every press in ``press``'s tree (wrappers' ``press``, composed presses' ``presses``...), with its path."""
    if not isinstance(press, BasePress):
        return
    yield path, press
    for name, value in vars(press).items():
        if isinstance(value, BasePress):
            yield from press_nodes(value, f"{path}.{name}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from press_nodes(item, f"{path}.{name}[{i}]")


def signature(press: BasePress) -> str:
    """What a scorer is, the ratio left out: its class and the ``repr`` of its other fields."""
    cls = type(press)
    if dataclasses.is_dataclass(press):
        fields = {f.name: getattr(press, f.name, None) for f in dataclasses.fields(press) if f.name != RATIO}
    else:
        fields = {k: v for k, v in vars(press).items() if k != RATIO and k != "score"}
    return f"{cls.__module__}.{cls.__qualname__}({fields!r})"


def _rng_states() -> tuple:
    states: list[Any] = [torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    return tuple(states)


def _same_rng(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


@contextlib.contextmanager
def _watched(nodes: list[BasePress], reads: list[str]) -> Iterator[None]:
    """While active, a read of ``compression_ratio`` on any of ``nodes`` is appended to ``reads``."""
    swapped = []
    try:
        for node in nodes:
            cls = type(node)

            def getattribute(self, name, _cls=cls):
                if name == RATIO:
                    reads.append(f"{_cls.__name__}.{RATIO}")
                return _cls.__getattribute__(self, name)

            watched = type(cls.__name__, (cls,), {"__getattribute__": getattribute, "__module__": cls.__module__})
            node.__class__ = watched
            swapped.append((node, cls))
        yield
    finally:
        for node, cls in swapped:
            node.__class__ = cls


def _state(nodes: list[BasePress]) -> list[dict[str, int]]:
    return [{k: id(v) for k, v in vars(node).items() if k != "score"} for node in nodes]


class ScoreMemo:
    """The ratio-independent scores of one captured prefill, shared by the presses replayed on it.

    Parameters
    ----------
    prefill : CapturedPrefill
        The prefill every press using this memo replays (its captured hidden states, keys and values are what a
        shared score must have been computed from).
    verdicts : dict, optional
        Whether each kind of scorer (:func:`signature`) may share its scores, decided the first time it runs; pass
        the same dict to the memos of every prefill of a sweep so that each kind is watched once.

    Attributes
    ----------
    hits, misses : int
        Scores handed out from the memo, and scores computed.
    """

    def __init__(self, prefill: CapturedPrefill, verdicts: dict | None = None):
        self.prefill = prefill
        self.verdicts: dict[str, bool] = {} if verdicts is None else verdicts
        self.scores: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @contextlib.contextmanager
    def sharing(self, press: BasePress | None, name: str = "") -> Iterator[None]:
        """While active, every ``ScorerPress`` in ``press``'s tree takes its scores from the memo when it may, and adds
        them to it otherwise (``name``, the run's press name, is for the reader: scores are shared by kind)."""
        nodes = [] if press is None else list(press_nodes(press))
        patched = []
        try:
            for _, node in nodes:
                if isinstance(node, ScorerPress) and "score" not in vars(node):
                    kind = signature(node)
                    node.score = self._scorer(node, kind, [n for _, n in nodes])
                    patched.append(node)
            yield
        finally:
            for node in patched:
                vars(node).pop("score", None)

    def _inputs_are_the_prefill(self, module, hidden_states, keys, values, attentions) -> bool:
        layer = self.prefill.layers.get(getattr(module, "layer_idx", None))
        if layer is None or attentions is not None:
            return False
        if hidden_states is not layer.kwargs.get("hidden_states"):
            return False
        return (
            keys.shape == layer.keys.shape
            and values.shape == layer.values.shape
            and torch.equal(keys, layer.keys)
            and torch.equal(values, layer.values)
        )

    def _scorer(self, node: ScorerPress, kind: str, tree: list[BasePress]):
        original = type(node).score.__get__(node)

        def score(module, hidden_states, keys, values, attentions, kwargs):
            verdict = self.verdicts.get(kind)
            if verdict is False or not self._inputs_are_the_prefill(module, hidden_states, keys, values, attentions):
                self.misses += 1
                return original(module, hidden_states, keys, values, attentions, kwargs)
            key = (kind, module.layer_idx)
            if key in self.scores:
                self.hits += 1
                return self.scores[key].clone()
            self.misses += 1
            if verdict is None:  # the first time this kind runs: watch it
                reads: list[str] = []
                rng, state = _rng_states(), _state(tree)
                with _watched(tree, reads):
                    out = original(module, hidden_states, keys, values, attentions, kwargs)
                verdict = not reads and _same_rng(rng, _rng_states()) and state == _state(tree)
                self.verdicts[kind] = verdict
            else:
                out = original(module, hidden_states, keys, values, attentions, kwargs)
            if verdict and isinstance(out, torch.Tensor):
                self.scores[key] = out.clone()
            return out

        return score
