"""Tiny randomly initialised models of every supported family, built in-process (no downloads).

They exercise the real transformers code paths of each family (q/k norms, MLA, sliding-window
layers, attention sinks, MoE routers) at a size that runs in milliseconds on a CPU. Norm weights,
sinks and router biases are randomised so that code skipping them gives measurably different results.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

TINY_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "phimoe",
    "gpt_oss",
    "deepseek_v2",
    "deepseek_v3",
)
MOE_FAMILIES: tuple[str, ...] = (
    "qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "phimoe", "gpt_oss", "deepseek_v2", "deepseek_v3"
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, ChatML specials and chat template), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = _CHATML
    fast.model_max_length = 4096
    return fast


TINY_VOCAB = 3 + 256 + 61  # specials + bytes, rounded up


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """The config of a tiny model of ``family`` (one of :data:`TINY_FAMILIES`)."""
    import transformers as T

    common = dict(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    moe = dict(num_experts_per_tok=2)
    mla = dict(
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        n_shared_experts=1,
    )
    builders = {
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**common),
        "qwen3": lambda: T.Qwen3Config(**common, head_dim=16),
        "phi3": lambda: T.Phi3Config(**common, partial_rotary_factor=0.5),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **common, **moe, head_dim=16, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True
        ),
        "mixtral": lambda: T.MixtralConfig(**common, **moe, num_local_experts=4, sliding_window=None),
        "olmoe": lambda: T.OlmoeConfig(**common, **moe, num_experts=4, clip_qkv=4.0),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **common, **moe, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32
        ),
        "phimoe": lambda: T.PhimoeConfig(**common, **moe, num_local_experts=4, sliding_window=None),
        "gpt_oss": lambda: T.GptOssConfig(
            **common, **moe, head_dim=16, num_local_experts=4, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        "deepseek_v3": lambda: T.DeepseekV3Config(**{**common, **mla}, **moe),
        "deepseek_v2": lambda: T.DeepseekV2Config(
            **{**common, **mla}, **moe, topk_method="greedy"
        ),
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    config = builders[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@torch.no_grad()
def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
    **overrides,
) -> PreTrainedModel:
    """A tiny random ``family`` model in eval mode, deterministic for ``seed``.

    Norm weights, attention sinks and router correction biases are randomised (their defaults are
    ones/zeros), so code that skips q/k norms or sinks computes visibly different numbers.
    """
    config = tiny_config(family, **overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name.split(".")[-2:][0]:
            param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
        elif name.endswith("sinks"):
            param.copy_(torch.randn(param.shape, generator=gen))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
