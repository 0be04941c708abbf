"""Prefill reuse: one model prefill per sample, shared by every press that compresses in kvpress's hook.

A kvpress prefill press compresses a layer's cache in a forward hook that runs after the layer's
attention; it returns the layer's output unchanged. The hidden states, keys and values a prefill produces
therefore do not depend on the press. :func:`capture_prefill` runs the prefill once and records, for
every attention layer, the hook's inputs; :func:`replay_press` then calls a press's own hooks on those
inputs to build exactly the cache a separate run would have built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvpress import BasePress, ComposedPress, DecodingPress, PrefillDecodingPress
from torch import nn
from transformers import DynamicCache

from pikvpress.models import get_adapter, language_model


@dataclass
class CapturedLayer:
    """What one attention layer's forward hook saw during the prefill."""

    kwargs: dict[str, Any]
    output: Any
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class CapturedPrefill:
    """A prefill's per-layer hook inputs, keyed by layer index, and its context length."""

    layers: dict[int, CapturedLayer]
    context_length: int


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in language_model(model).layers]


def can_reuse_prefill(press: BasePress | None, model: nn.Module) -> bool:
    """Whether ``press`` compresses inside the standard kvpress forward hook on a shared prefill.

    Presses with their own context manager (KVzip, KVgrad, KVCompose, Finch, decoding presses...) and presses
    that read eager attention weights need their own prefill; a wrapper (AdaKV, CriticalKV, ChunkKV...) shares
    the prefill when the press it wraps does.
    """
    if press is None:
        return True
    if model.config._attn_implementation == "eager":
        return False
    if isinstance(press, (DecodingPress, PrefillDecodingPress)) or getattr(press, "compresses_while_decoding", False):
        return False  # it acts while the answer is generated, which a replayed prefill does not cover
    if getattr(press, "reads_decoder_inputs", False) and get_adapter(model).is_moe:
        return False  # the gate router reads the decoder layers' inputs, which a replay does not run
    if type(press).__call__ is not BasePress.__call__ and not getattr(press, "replays_with_hooks", False):
        return False
    if isinstance(press, ComposedPress):
        return all(can_reuse_prefill(p, model) for p in press.presses)
    inner = getattr(press, "press", None)
    if isinstance(inner, BasePress):  # a wrapper (AdaKV, CriticalKV, ChunkKV, BlockPress, MergingPress...)
        return can_reuse_prefill(inner, model)
    return True


@torch.no_grad()
def capture_prefill(model: nn.Module, context_ids: torch.Tensor) -> CapturedPrefill:
    """Run the model's prefill on ``context_ids`` once, recording every attention layer's hook inputs."""
    records: dict[int, tuple[dict, Any]] = {}

    def record(module, args, kwargs, output):
        records[module.layer_idx] = (dict(kwargs), output)

    modules = _attention_modules(model)
    hooks = [module.register_forward_hook(record, with_kwargs=True) for module in modules]
    cache = DynamicCache()
    try:
        language_model(model)(input_ids=context_ids, past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    layers = {}
    for idx, (kwargs, output) in records.items():
        kwargs.pop("past_key_values", None)
        stored = cache.layers[idx]
        layers[idx] = CapturedLayer(kwargs, output, stored.keys, stored.values)
    return CapturedPrefill(layers, context_ids.shape[1])


@torch.no_grad()
def replay_press(model: nn.Module, prefill: CapturedPrefill, press: BasePress | None) -> DynamicCache:
    """The cache a prefill under ``press`` would leave, built from a captured prefill.

    The press's own context manager registers its hooks; they are called on each layer's recorded
    inputs, in layer order, against a fresh cache holding that layer's uncompressed keys and values.
    """
    modules = _attention_modules(model)
    for module in modules:  # what a real prefill's attention does first (kvpress's head-wise masking state)
        module.masked_key_indices = None
    cache = DynamicCache()
    for idx in sorted(prefill.layers):
        layer = prefill.layers[idx]
        cache.update(layer.keys, layer.values, idx)
    if press is None:
        return cache
    before = [set(module._forward_hooks) for module in modules]
    with press(model):
        for idx in sorted(prefill.layers):
            module, layer = modules[idx], prefill.layers[idx]
            new_hooks = [key for key in module._forward_hooks if key not in before[idx]]
            kwargs = dict(layer.kwargs, past_key_values=cache)
            output = layer.output
            for key in new_hooks:
                hook = module._forward_hooks[key]
                result = (
                    hook(module, (), kwargs, output)
                    if key in module._forward_hooks_with_kwargs
                    else hook(module, (), output)
                )
                output = result if result is not None else output
    return cache
