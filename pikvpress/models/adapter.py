"""Model adapters: one place that knows how to read each attention layer and MoE router of a model.

>>> adapter = get_adapter(model)
>>> layer = adapter.layers[3]
>>> q = layer.queries(hidden_states)                                  # pre-RoPE, q/k norms applied
>>> q = layer.queries(hidden_states, position_embeddings=(cos, sin))  # post-RoPE, as the model does
>>> layer.key_dim, layer.value_dim, layer.sliding_window, layer.sinks
>>> routing = layer.router(mlp_inputs)                                # MoE layers only
>>> routing.probs, routing.topk_indices
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pikvpress.models.families import SUPPORTED_FAMILIES, FamilySpec, family_for_model_type


class UnsupportedModelError(ValueError):
    """Raised for a model whose family pikvpress has no adapter for."""


def _unsupported(model_or_module: nn.Module, model_type: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"pikvpress has no adapter for {type(model_or_module).__name__} (model_type={model_type!r}). "
        f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
    )


def slice_positions(position_embeddings: Any, index: slice) -> Any:
    """Slice the sequence axis (dim 1) of a model's position embeddings ((cos, sin) or complex freqs)."""
    if isinstance(position_embeddings, (tuple, list)):
        return tuple(t[:, index] for t in position_embeddings)
    return position_embeddings[:, index]


@dataclass(frozen=True)
class RoutingResult:
    """A MoE router's decision for a batch of tokens.

    Parameters
    ----------
    probs : torch.Tensor
        ``(..., num_experts)`` float32 probabilities over all routed experts (each row sums to 1).
    topk_indices : torch.Tensor
        ``(..., top_k)`` the experts the model sends each token to.
    topk_weights : torch.Tensor
        ``(..., top_k)`` the weights the model mixes those experts with.
    """

    probs: torch.Tensor
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor


class MoERouter:
    """The MoE router of one decoder layer, called on that layer's MLP inputs.

    Parameters
    ----------
    mlp : nn.Module
        The decoder layer's MoE block (``layer.mlp``); hook it to capture its inputs.
    family : FamilySpec
        The family whose routing rule (softmax, sigmoid with group limits, sparsemixer...) applies.
    """

    def __init__(self, mlp: nn.Module, family: FamilySpec):
        self.mlp = mlp
        self.family = family

    @property
    def num_experts(self) -> int:
        cfg = self.mlp.experts
        return int(getattr(cfg, "num_experts", 0) or getattr(self.mlp, "n_routed_experts", 0))

    @property
    def top_k(self) -> int:
        for owner in (self.mlp, getattr(self.mlp, "gate", None), getattr(self.mlp, "router", None)):
            if owner is not None and hasattr(owner, "top_k"):
                return int(owner.top_k)
        raise AttributeError("router has no top_k")

    @torch.no_grad()
    def __call__(self, mlp_inputs: torch.Tensor) -> RoutingResult:
        """Route ``(..., hidden)`` MLP inputs exactly as the model's MoE block does."""
        shape = mlp_inputs.shape[:-1]
        flat = mlp_inputs.reshape(-1, mlp_inputs.shape[-1])
        probs, indices, weights = self.family.router(self.mlp, flat)  # type: ignore[misc]
        return RoutingResult(
            probs=probs.reshape(*shape, -1),
            topk_indices=indices.reshape(*shape, -1),
            topk_weights=weights.reshape(*shape, -1),
        )


class LayerAdapter:
    """Everything a press needs to know about one attention layer.

    Parameters
    ----------
    attention : nn.Module
        The layer's self-attention module (carries ``layer_idx`` and ``config``).
    family : FamilySpec
        The model family.
    rotary_emb : nn.Module, optional
        The model's rotary embedding module (needed for :meth:`rope_matrices`).
    decoder_layer : nn.Module, optional
        The decoder layer holding ``attention`` (needed for :attr:`router`).
    """

    def __init__(
        self,
        attention: nn.Module,
        family: FamilySpec,
        rotary_emb: nn.Module | None = None,
        decoder_layer: nn.Module | None = None,
    ):
        self.attention = attention
        self.family = family
        self.rotary_emb = rotary_emb if rotary_emb is not None else getattr(attention, "rotary_emb", None)
        self.decoder_layer = decoder_layer
        self.config = attention.config

    # --- shapes --------------------------------------------------------------------------------
    @property
    def layer_idx(self) -> int:
        return int(self.attention.layer_idx)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        """Heads of the cached keys/values (MLA caches one key head per query head)."""
        if self.family.mla:
            return self.num_heads
        return int(self.config.num_key_value_heads)

    @property
    def num_key_value_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def key_dim(self) -> int:
        return int(self.attention.qk_head_dim if self.family.mla else self.attention.head_dim)

    @property
    def value_dim(self) -> int:
        return int(self.attention.v_head_dim if self.family.mla else self.attention.head_dim)

    @property
    def scaling(self) -> float:
        return float(getattr(self.attention, "scaling", self.key_dim**-0.5))

    # --- layer kind ----------------------------------------------------------------------------
    @property
    def sliding_window(self) -> int | None:
        """Window of a sliding-window layer (its cache keeps at most ``window - 1`` past tokens), else None."""
        layer_types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None) or getattr(self.config, "attention_chunk_size", None)
        if layer_types is not None:
            kind = layer_types[self.layer_idx]
            return window if kind in ("sliding_attention", "chunked_attention") else None
        return window

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    @property
    def sinks(self) -> torch.Tensor | None:
        """Per-query-head attention-sink logits (GPT-OSS), else None."""
        sinks = getattr(self.attention, "sinks", None)
        return sinks if isinstance(sinks, torch.Tensor) else None

    # --- projections ---------------------------------------------------------------------------
    def queries(self, hidden_states: torch.Tensor, position_embeddings: Any = None) -> torch.Tensor:
        """``(batch, num_heads, seq, key_dim)`` queries; pre-RoPE unless ``position_embeddings`` is given."""
        q = self.family.queries(self.attention, hidden_states)
        return q if position_embeddings is None else self.apply_rope(q, position_embeddings)

    def keys(self, hidden_states: torch.Tensor, position_embeddings: Any = None) -> torch.Tensor:
        """``(batch, num_kv_heads, seq, key_dim)`` keys; pre-RoPE unless ``position_embeddings`` is given."""
        k = self.family.keys(self.attention, hidden_states)
        return k if position_embeddings is None else self.apply_rope(k, position_embeddings)

    def apply_rope(self, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """Rotate ``(batch, heads, seq, key_dim)`` pre-RoPE states with the model's own rotary function."""
        return self.family.apply_rope(self.attention, x, position_embeddings)

    def position_embeddings(self, position_ids: torch.Tensor, like: torch.Tensor) -> Any:
        """The model's position embeddings for ``position_ids`` ``(batch, seq)``."""
        if self.rotary_emb is None:
            raise RuntimeError(f"layer {self.layer_idx}: no rotary embedding attached to this adapter")
        return self.rotary_emb(like, position_ids)

    @torch.no_grad()
    def rope_matrices(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(len(position_ids), key_dim, key_dim)`` matrices ``R_p`` with ``rope(x, p) = R_p @ x``.

        Built by rotating the identity with the model's own rotary function, so partial RoPE (MLA),
        interleaved layouts and complex frequencies are all covered.
        """
        d = self.key_dim
        n = position_ids.shape[-1]
        device = position_ids.device
        basis = torch.eye(d, device=device, dtype=dtype)  # basis[i] = e_i
        x = basis[None, :, None, :].expand(1, d, n, d).contiguous()  # heads axis indexes e_i
        pe = self.position_embeddings(position_ids.reshape(1, n), x)
        rotated = self.apply_rope(x, pe)  # rotated[0, i, p] = R_p e_i = column i of R_p
        return rotated[0].permute(1, 2, 0).to(dtype)

    # --- MoE -----------------------------------------------------------------------------------
    @property
    def router(self) -> MoERouter | None:
        """The layer's MoE router, or None for dense layers and dense models."""
        if self.family.router is None or self.decoder_layer is None:
            return None
        mlp = getattr(self.decoder_layer, "mlp", None)
        if mlp is None or not self.family.is_moe_mlp(mlp):  # type: ignore[misc]
            return None
        return MoERouter(mlp, self.family)

    def __repr__(self) -> str:
        return (
            f"LayerAdapter({self.family.name}, layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, sliding_window={self.sliding_window}, "
            f"sinks={self.sinks is not None}, moe={self.router is not None})"
        )


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` or ``model.model.language_model``)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


class ModelAdapter:
    """Adapters for every attention layer of a loaded model.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM of a supported family.

    Raises
    ------
    UnsupportedModelError
        If the model's family is not supported; the message names the class and the supported families.
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if config is not None else None
        model_type = getattr(text_config, "model_type", None)
        family = family_for_model_type(model_type) if model_type else None
        if family is None:
            raise _unsupported(model, model_type)
        self.model = model
        self.family = family
        lm = language_model(model)
        rotary = getattr(lm, "rotary_emb", None)
        self.layers = [LayerAdapter(layer.self_attn, family, rotary, layer) for layer in lm.layers]

    @property
    def is_moe(self) -> bool:
        return any(layer.router is not None for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"ModelAdapter({type(self.model).__name__}, family={self.family.name}, layers={len(self.layers)})"


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Build the :class:`ModelAdapter` of ``model`` (raises :class:`UnsupportedModelError`)."""
    return ModelAdapter(model)


def is_supported(model: nn.Module) -> bool:
    """Whether ``model`` belongs to a family pikvpress has an adapter for."""
    config = getattr(model, "config", None)
    model_type = getattr(config.get_text_config(), "model_type", None) if config is not None else None
    return model_type is not None and family_for_model_type(model_type) is not None


def layer_adapter(attention: nn.Module) -> LayerAdapter | None:
    """Adapter for a bare attention module (as kvpress hooks see it), or None if its family is unknown."""
    config = getattr(attention, "config", None)
    family = family_for_model_type(getattr(config, "model_type", "")) if config is not None else None
    if family is None:
        return None
    return LayerAdapter(attention, family, decoder_layer=getattr(attention, "_pikvpress_decoder_layer", None))
