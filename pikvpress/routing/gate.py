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
