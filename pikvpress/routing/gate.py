"""The MoE gate as a KV router: each context token's expert probabilities at one layer.

A kvpress press compresses in the attention module's forward hook, before the layer's MLP has run,
so the gate input does not exist yet. Every supported family is pre-norm, so it is computed here
exactly as the decoder layer will: ``post_attention_layernorm(layer_input + attention_output)``,
where ``layer_input`` is the decoder layer's input (the residual stream) and ``attention_output`` the
attention module's output after ``o_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from pikvpress.models.adapter import LayerAdapter, RoutingResult


def mlp_inputs(decoder_layer: nn.Module, layer_input: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """``(B, T, hidden)``: what ``decoder_layer``'s MLP (and its MoE gate) receives."""
    return decoder_layer.post_attention_layernorm(layer_input + attention_output)


def gate_routing(
    adapter: LayerAdapter, layer_input: torch.Tensor, attention_output: torch.Tensor
) -> RoutingResult | None:
    """The layer's MoE routing of every token (probabilities over experts, the model's top-k), or None
    for a layer without a router (dense models, dense layers of MoE models)."""
    router = adapter.router
    if router is None:
        return None
    return router(mlp_inputs(adapter.decoder_layer, layer_input, attention_output))


class GateInputs:
    """Each MoE layer's input (the residual stream) and attention output during one prefill, so that the gate's
    input can be computed in the attention module's forward hook (:func:`gate_routing`).

    :meth:`install` hooks the decoder layers that have a MoE router; the attention hook hands over its output with
    :meth:`attention_output`; :meth:`routing` computes the gate's routing of a layer once; :meth:`remove` takes the
    hooks away and forgets every tensor (after the prefill's last MoE layer, or when the press's context ends).
    """

    def __init__(self) -> None:
        self._hooks: list = []
        self._layer_inputs: dict[int, torch.Tensor] = {}
        self._attention_outputs: dict[int, torch.Tensor] = {}
        self.last_layer = -1

    def install(self, layers: list[LayerAdapter]) -> None:
        """Hook the decoder layers of ``layers`` that have a MoE router (replacing earlier hooks)."""
        self.remove()
        moe = [layer for layer in layers if layer.router is not None and not layer.is_sliding]
        for layer in moe:
            self._hooks.append(layer.decoder_layer.register_forward_pre_hook(self._record, with_kwargs=True))
        self.last_layer = moe[-1].layer_idx if moe else -1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._layer_inputs.clear()
        self._attention_outputs.clear()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._layer_inputs[int(module.self_attn.layer_idx)] = hidden

    def attention_output(self, layer_idx: int, output: torch.Tensor) -> None:
        self._attention_outputs[layer_idx] = output

    def forget(self, layer_idx: int) -> None:
        self._attention_outputs.pop(layer_idx, None)
        self._layer_inputs.pop(layer_idx, None)

    def routing(self, adapter: LayerAdapter, hidden_states: torch.Tensor) -> RoutingResult | None:
        """The gate's routing of layer ``adapter`` for the tokens of ``hidden_states``; None when the layer has no
        router or its inputs were not seen for these tokens (the press ran outside a full prefill)."""
        idx = adapter.layer_idx
        layer_input, output = self._layer_inputs.get(idx), self._attention_outputs.get(idx)
        if adapter.router is None or layer_input is None or output is None:
            return None
        if layer_input.shape[:2] != hidden_states.shape[:2] or output.shape[:2] != hidden_states.shape[:2]:
            return None
        return gate_routing(adapter, layer_input, output)
