"""Compatibility layer that makes kvpress's own presses correct on every family pikvpress supports.

Applied when :mod:`pikvpress` is imported (set ``PIKVPRESS_KVPRESS_FIXES=0`` to opt out), so that
comparisons against kvpress baselines are fair. Use :func:`kvpress_fixes` to turn it off or on for a
block, e.g. to see a defect::

    from pikvpress.compat import kvpress_fixes
    with kvpress_fixes(False):
        ...  # plain kvpress 0.5.5 behaviour

The defects fixed (measured with kvpress 0.5.5, transformers 5.2) are listed in :data:`KVPRESS_FIXES`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvpress.presses.base_press import BasePress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pikvpress.compat import patches
from pikvpress.models.families import FAMILIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVPressFix:
    """One kvpress defect and what the compatibility layer does about it."""

    name: str
    families: str
    defect: str
    fix: str


KVPRESS_FIXES: tuple[KVPressFix, ...] = (
    KVPressFix(
        "qk-norm",
        "Qwen3-MoE, OLMoE",
        "query-based presses (SnapKV, TOVA, ExpectedAttention, PyramidKV, ...) project queries without q_norm "
        "because the check is `isinstance(module, Qwen3Attention)`; OLMoE's full-width q_norm and clip_qkv are "
        "skipped too, so the presses keep a different set of tokens than their own formula says",
        "pre-RoPE queries/keys come from pikvpress.models adapters (norms, clipping, MLA projections)",
    ),
    KVPressFix(
        "model-rope",
        "GPT-OSS, DeepSeek-V2/V3",
        "SnapKV/TOVA/PyramidKV window attention and ExpectedAttention's averaged rotation assume Llama's "
        "rotate_half over the full head dim: they crash on GPT-OSS (half-dim cos/sin) and DeepSeek (partial "
        "RoPE, complex frequencies on V2), and ignore GPT-OSS attention sinks",
        "window attention and the averaged rotation use the model's own rotary function, softmax scale and sinks",
    ),
    KVPressFix(
        "sliding-window",
        "GPT-OSS (and any model with sliding-window layers)",
        "every press compresses sliding-window layers, whose cache tracks its own length and already holds at "
        "most window-1 tokens: their stored length and the attention mask fall out of step",
        "presses hook only full-attention layers; sliding-window layers are left as the model keeps them",
    ),
    KVPressFix(
        "mla-head-dims",
        "DeepSeek-V2/V3",
        "every press fails with `no attribute head_dim`; pruning gathers values with the key head dim",
        "a press attaches head_dim = qk_head_dim to MLA attention modules (as kvpress attaches rotary_emb); "
        "ScorerPress/PyramidKV gather keys and values "
        "with their own head dims",
    ),
    KVPressFix(
        "uneven-layer-lengths",
        "all, with SDPA or eager attention",
        "PyramidKV and PerLayerCompression leave layers with different lengths; transformers builds one mask "
        "from the first layer's length, so SDPA/eager attention fail on every other layer",
        "attention functions right-align the mask to each layer's key length",
    ),
    KVPressFix(
        "adakv-fake-keys",
        "all",
        "AdaKV hides pruned keys by searching for a fake key that every query of a group scores -inf against; "
        "when a multi-token question's queries are not all in one half-space the search raises `Could not find "
        "fake keys` and the pipeline dies",
        "pruned keys are removed through the attention mask, per head, exactly",
    ),
)

_saved: list[tuple[Any, str, Any]] = []


def _setattr(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
    setattr(owner, name, value)


def _modeling_modules() -> list[Any]:
    modules = []
    for spec in FAMILIES:
        for model_type in spec.model_types:
            try:
                modules.append(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"))
            except ImportError:  # family absent from this transformers version
                continue
    return modules


def kvpress_fixes_applied() -> bool:
    """Whether the compatibility layer is currently applied."""
    return bool(_saved)


def apply_kvpress_fixes() -> None:
    """Apply every fix in :data:`KVPRESS_FIXES` (idempotent)."""
    if _saved:
        return
    # pre-RoPE projections, rebound wherever kvpress imported them by name
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("kvpress") or module is None:
            continue
        for name, replacement in (
            ("get_prerope_query_states", patches.get_prerope_query_states),
            ("get_prerope_key_states", patches.get_prerope_key_states),
        ):
            if getattr(module, name, None) is patches.ORIGINALS[name]:
                _setattr(module, name, replacement)
    _setattr(SnapKVPress, "compute_window_attention", staticmethod(patches.window_attention))
    _setattr(ExpectedAttentionPress, "apply_avg_rope", patches.apply_avg_rope)
    _setattr(ScorerPress, "compress", patches.scorer_compress)
    _setattr(PyramidKVPress, "compress", patches.pyramidkv_compress)
    _setattr(BasePress, "__call__", patches.press_call)
    # masks aligned to each layer's length, in the registered and the per-family eager attention
    for key in list(ALL_ATTENTION_FUNCTIONS.keys()):
        func = ALL_ATTENTION_FUNCTIONS[key]
        _saved.append((ALL_ATTENTION_FUNCTIONS, key, func))
        ALL_ATTENTION_FUNCTIONS[key] = patches.with_aligned_mask(func)
    for module in _modeling_modules():
        if hasattr(module, "eager_attention_forward"):
            _setattr(module, "eager_attention_forward", patches.with_aligned_mask(module.eager_attention_forward))
    logger.debug("applied %d kvpress compatibility patches", len(_saved))


def remove_kvpress_fixes() -> None:
    """Restore kvpress and transformers exactly as they were before :func:`apply_kvpress_fixes`."""
    while _saved:
        owner, name, original = _saved.pop()
        if owner is ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS[name] = original
        else:
            setattr(owner, name, original)


@contextmanager
def kvpress_fixes(enabled: bool = True) -> Generator[None, None, None]:
    """Run a block with the compatibility layer applied (``True``) or removed (``False``)."""
    was_applied = kvpress_fixes_applied()
    (apply_kvpress_fixes if enabled else remove_kvpress_fixes)()
    try:
        yield
    finally:
        if was_applied and not kvpress_fixes_applied():
            apply_kvpress_fixes()
        elif not was_applied and kvpress_fixes_applied():
            remove_kvpress_fixes()


__all__ = [
    "KVPRESS_FIXES",
    "KVPressFix",
    "apply_kvpress_fixes",
    "kvpress_fixes",
    "kvpress_fixes_applied",
    "remove_kvpress_fixes",
]
