"""Per-family knowledge of attention layers and MoE routers.

Each supported model family is described by a :class:`FamilySpec`: how to project an attention
layer's hidden states to pre-RoPE queries and keys (q/k norms, clipping and MLA included), how to
apply that family's rotary embedding, and how to read its MoE router. Everything here reproduces
the model's own computation; the tests hold it to the tensors the model puts in its cache.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------------------------
# Query / key projections (pre-RoPE, shape (batch, heads, seq, dim))
# ----------------------------------------------------------------------------------------------


def _num_heads(module: nn.Module) -> int:
    return int(module.config.num_attention_heads)


def _num_kv_heads(module: nn.Module) -> int:
    return int(module.config.num_key_value_heads)


def _heads_last(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``(batch, seq, num_heads * head_dim)`` -> ``(batch, seq, num_heads, head_dim)``.

    The head count is given, not inferred (``-1``): a view of 0 tokens (a decode-time press whose
    buffer is shorter than its sink) cannot infer it and would raise.
    """
    bsz, seq, _ = x.shape
    return x.view(bsz, seq, num_heads, head_dim)


def _split_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``(batch, seq, num_heads * head_dim)`` -> ``(batch, num_heads, seq, head_dim)``, also for 0 tokens."""
    return _heads_last(x, num_heads, head_dim).transpose(1, 2)


def _llama_queries(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _split_heads(module.q_proj(h), _num_heads(module), module.head_dim)


def _llama_keys(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _split_heads(module.k_proj(h), _num_kv_heads(module), module.head_dim)


def _phi3_queries(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    n = _num_heads(module) * module.head_dim
    return _split_heads(module.qkv_proj(h)[..., :n], _num_heads(module), module.head_dim)


def _phi3_keys(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    start = _num_heads(module) * module.head_dim
    n = _num_kv_heads(module) * module.head_dim
    return _split_heads(module.qkv_proj(h)[..., start : start + n], _num_kv_heads(module), module.head_dim)


def _head_norm_queries(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # Qwen3 / Qwen3-MoE: RMSNorm over each head's dim, before RoPE
    return module.q_norm(_heads_last(module.q_proj(h), _num_heads(module), module.head_dim)).transpose(1, 2)


def _head_norm_keys(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module.k_norm(_heads_last(module.k_proj(h), _num_kv_heads(module), module.head_dim)).transpose(1, 2)


def _olmoe_clip(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    clip = getattr(module.config, "clip_qkv", None)
    return x.clamp(min=-clip, max=clip) if clip is not None else x


def _olmoe_queries(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # OLMoE: RMSNorm over the whole projection (all heads), then optional clipping
    return _split_heads(_olmoe_clip(module, module.q_norm(module.q_proj(h))), _num_heads(module), module.head_dim)


def _olmoe_keys(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return _split_heads(_olmoe_clip(module, module.k_norm(module.k_proj(h))), _num_kv_heads(module), module.head_dim)


def _mla_queries(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V2/V3 multi-head latent attention: [q_nope, q_rope] per head, q_rope not yet rotated
    if module.q_lora_rank is None:
        q = module.q_proj(h)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(h)))
    return _split_heads(q, _num_heads(module), module.qk_head_dim)


def _mla_keys(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    bsz, seq, _ = h.shape
    compressed = module.kv_a_proj_with_mqa(h)
    k_pass, k_rot = torch.split(compressed, [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    k_pass = module.kv_b_proj(module.kv_a_layernorm(k_pass))
    # MLA caches one key head per query head
    k_pass = _split_heads(k_pass, _num_heads(module), module.qk_nope_head_dim + module.v_head_dim)
    k_nope = k_pass[..., : module.qk_nope_head_dim]
    k_rot = k_rot.view(bsz, 1, seq, module.qk_rope_head_dim).expand(-1, k_nope.shape[1], -1, -1)
    return torch.cat((k_nope, k_rot), dim=-1)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings: x (batch, heads, seq, dim) in pre-RoPE layout -> rotated, as the model does it
# ----------------------------------------------------------------------------------------------


def _modeling_module(module: nn.Module):
    return sys.modules[type(module).__module__]


def _standard_rope(module: nn.Module, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    cos, sin = position_embeddings
    return _modeling_module(module).apply_rotary_pos_emb(x, x, cos, sin)[0]


def _mla_v3_rope(module: nn.Module, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    cos, sin = position_embeddings
    mod = _modeling_module(module)
    x_pass, x_rot = torch.split(x, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    fn = mod.apply_rotary_pos_emb_interleave if module.config.rope_interleave else mod.apply_rotary_pos_emb
    x_rot = fn(x_rot, x_rot, cos, sin)[0]
    return torch.cat((x_pass, x_rot), dim=-1)


def _mla_v2_rope(module: nn.Module, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    # DeepSeek-V2 passes complex frequencies (freqs_cis) instead of (cos, sin)
    x_pass, x_rot = torch.split(x, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    x_rot = _modeling_module(module).apply_rotary_emb(x_rot, x_rot, position_embeddings.to(x.device))[0]
    return torch.cat((x_pass, x_rot), dim=-1)


# ----------------------------------------------------------------------------------------------
# MoE routers: mlp input (tokens, hidden) -> (probabilities over experts, top-k indices, top-k weights)
# ----------------------------------------------------------------------------------------------

RouterFn = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def _gate_returns_probs(mlp: nn.Module, x: torch.Tensor):
    # Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE: gate returns (softmax probs, top-k weights, top-k indices)
    probs, weights, indices = mlp.gate(x)
    return probs.float(), indices, weights


def _router_returns_logits(mlp: nn.Module, x: torch.Tensor):
    # GPT-OSS, PhiMoE: router returns (raw logits, top-k weights, top-k indices)
    logits, weights, indices = mlp.router(x)
    return logits.float().softmax(-1), indices, weights


def _deepseek_v3_router(mlp: nn.Module, x: torch.Tensor):
    logits = mlp.gate(x)
    indices, weights = mlp.route_tokens_to_experts(logits)
    scores = logits.sigmoid()
    return scores / scores.sum(-1, keepdim=True), indices, weights


def _deepseek_v2_router(mlp: nn.Module, x: torch.Tensor):
    logits = F.linear(x.float(), mlp.gate.weight.float())
    indices, weights = mlp.route_tokens_to_experts(logits.unsqueeze(0))
    return logits.softmax(-1), indices, weights


def _has(attr: str, child: str | None = None) -> Callable[[nn.Module], bool]:
    def check(mlp: nn.Module) -> bool:
        if not hasattr(mlp, attr):
            return False
        return child is None or hasattr(mlp, child)

    return check


@dataclass(frozen=True)
class FamilySpec:
    """What pikvpress knows about one model family.

    Parameters
    ----------
    name : str
        Family name shown to users (``"qwen3_moe"``).
    model_types : tuple of str
        ``config.model_type`` values handled by this spec.
    queries, keys : callable
        ``(attention_module, hidden_states) -> (batch, heads, seq, key_dim)`` pre-RoPE projections,
        with the family's q/k norms, clipping or latent projections applied.
    apply_rope : callable
        ``(attention_module, x, position_embeddings) -> rotated x``, the model's own rotary function.
    mla : bool
        Multi-head latent attention: cached keys and values have different head dims and the cache
        holds one key head per query head.
    router : callable or None
        ``(mlp, tokens) -> (probs, topk_indices, topk_weights)`` for MoE layers.
    is_moe_mlp : callable or None
        Whether a decoder layer's ``mlp`` is a routed MoE block (dense layers of MoE models are not).
    """

    name: str
    model_types: tuple[str, ...]
    queries: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    keys: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    apply_rope: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] = _standard_rope
    mla: bool = False
    router: RouterFn | None = None
    is_moe_mlp: Callable[[nn.Module], bool] | None = None

    @property
    def is_moe(self) -> bool:
        return self.router is not None


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",), _llama_queries, _llama_keys),
    FamilySpec("mistral", ("mistral",), _llama_queries, _llama_keys),
    FamilySpec("qwen2", ("qwen2",), _llama_queries, _llama_keys),
    FamilySpec("qwen3", ("qwen3",), _head_norm_queries, _head_norm_keys),
    FamilySpec("phi3", ("phi3",), _phi3_queries, _phi3_keys),
    FamilySpec(
        "qwen3_moe", ("qwen3_moe",), _head_norm_queries, _head_norm_keys,
        router=_gate_returns_probs, is_moe_mlp=_has("gate", "experts"),
    ),
    FamilySpec(
        "mixtral", ("mixtral",), _llama_queries, _llama_keys,
        router=_gate_returns_probs, is_moe_mlp=_has("gate", "experts"),
    ),
    FamilySpec(
        "olmoe", ("olmoe",), _olmoe_queries, _olmoe_keys,
        router=_gate_returns_probs, is_moe_mlp=_has("gate", "experts"),
    ),
    FamilySpec(
        "qwen2_moe", ("qwen2_moe",), _llama_queries, _llama_keys,
        router=_gate_returns_probs, is_moe_mlp=_has("gate", "experts"),
    ),
    FamilySpec(
        "phimoe", ("phimoe",), _llama_queries, _llama_keys,
        router=_router_returns_logits, is_moe_mlp=_has("router", "experts"),
    ),
    FamilySpec(
        "gpt_oss", ("gpt_oss",), _llama_queries, _llama_keys,
        router=_router_returns_logits, is_moe_mlp=_has("router", "experts"),
    ),
    FamilySpec(
        "deepseek_v3", ("deepseek_v3",), _mla_queries, _mla_keys, apply_rope=_mla_v3_rope, mla=True,
        router=_deepseek_v3_router, is_moe_mlp=_has("gate", "experts"),
    ),
    FamilySpec(
        "deepseek_v2", ("deepseek_v2",), _mla_queries, _mla_keys, apply_rope=_mla_v2_rope, mla=True,
        router=_deepseek_v2_router, is_moe_mlp=_has("gate", "experts"),
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in FAMILIES for mt in spec.model_types}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(spec.name for spec in FAMILIES)


def family_for_model_type(model_type: str) -> FamilySpec | None:
    """Return the :class:`FamilySpec` for a ``config.model_type``, or ``None`` if unsupported."""
    return _BY_MODEL_TYPE.get(model_type)
