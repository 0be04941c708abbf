"""Every press the conformance suite runs, the way kvpress's tests/default_presses.py lists them.

A later press joins the suite by adding one ``PressCase`` here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from kvpress import (
    AdaKVPress,
    BasePress,
    ComposedPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    ObservedAttentionPress,
    PrefillDecodingPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept

from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress, PiKVPress, QuantizationPress, RaggedPress
from pikvpress.routing import LearnedRouter, RouterSpec
from pikvpress.routing.learned import SHIPPED_DIR


@lru_cache(maxsize=1)
def tiny_router_dir() -> str:
    """Random (seeded) learned-router weights for the tiny models' two geometries, in a temp directory,
    beside a copy of the weights shipped for the default model."""
    directory = Path(tempfile.mkdtemp(prefix="pikvpress-tiny-routers-"))
    for shipped in SHIPPED_DIR.glob("*.safetensors"):
        shutil.copy(shipped, directory / shipped.name)
    for heads in (2, 4):  # DeepSeek's MLA caches one key head per query head
        torch.manual_seed(heads)
        LearnedRouter(RouterSpec(f"tiny-kv{heads}", 4, 64, heads)).save(directory / f"tiny-kv{heads}.safetensors")
    return str(directory)


def uniform_kept(press: BasePress, layer_idx: int, k_len: int, ratio: float) -> int:
    return compute_n_kept(k_len, ratio)


@dataclass
class PressCase:
    """One press in the conformance suite.

    Parameters
    ----------
    name : str
        Test id.
    make : callable
        ``ratio -> press``: a fresh press removing ``ratio`` of the context.
    kept : callable
        ``(press, attention_module, k_len, ratio) -> tokens kept per head`` on a full-attention layer.
    attn_implementation : str or None
        Attention the model must run with (``"eager"`` for presses that read attention weights).
    masks_instead_of_pruning : bool
        The press masks keys (AdaKV) instead of shrinking the cache; lengths stay ``k_len``.
    eager_ok : bool
        Runs on eager-only models (GPT-OSS on CPU); kvpress's AdaKV asserts against eager attention.
    deterministic : bool
        Same input, same kept set (RandomPress with a seed is; batch composition may still change it).
    bad_kwargs : list of dict
        Constructor arguments that must be rejected.
    ragged : bool
        The press holds each head's kept tokens as a :class:`~pikvpress.cache.RaggedKVLayer` (``RaggedPress``): seen
        from outside, lengths stay ``k_len`` as for a masking press, and the heads hold the masked press's kept tokens.
    lossless : bool
        Decoding from the compressed cache is exact (pruning presses). Lossy presses (quantization)
        are instead held to decoding that equals dense attention over their dequantized cache.
    decodes : bool
        The press also evicts while decoding (AdaptiveSchedulingPress): reference decoding runs under it
        too, and the kvpress pipeline gets one question (kvpress's rule for decoding presses).
    """

    name: str
    make: Callable[[float], BasePress]
    kept: Callable = uniform_kept
    attn_implementation: str | None = None
    masks_instead_of_pruning: bool = False
    ragged: bool = False
    eager_ok: bool = True
    deterministic: bool = True
    bad_kwargs: list[dict] = field(default_factory=list)
    lossless: bool = True
    decodes: bool = False


def _pyramid_kept(press, module, k_len, ratio):
    return press.get_layer_budget(module, k_len)


def _composed_kept(press, module, k_len, ratio):
    n = k_len
    for sub in press.presses:
        n = compute_n_kept(n, sub.compression_ratio)
    return n


def _routing_kept(press, module, k_len, ratio):
    return press.layer_kept(module.layer_idx, k_len)  # learned per-layer budgets once the press has run


def _all_kept(press, module, k_len, ratio):
    return k_len  # a decode-time press leaves the prefill alone


def _pikv_kept(press, module, k_len, ratio):
    return k_len if press.routing is None else press.routing.layer_kept(module.layer_idx, k_len)


def _pikv_scheduling(r: float) -> BasePress:
    """PiKVPress with a scheduler, wrapped the way kvpress's pipeline runs a press while it decodes (the same
    press prefills, shards, and evicts inside the shards every 2 steps down to (1 - r) of the tokens seen)."""
    press = PiKVPress(
        scheduling=AdaptiveSchedulingPress(compression_ratio=r, interval=2, sink_tokens=2, recent_window=2),
        sharding={"num_shards": 2, "tail_length": 2, "flush_tokens": 1},
    )
    return PrefillDecodingPress(prefilling_press=press, decoding_press=press)


def _prefill_press_kept(press, module, k_len, ratio):
    return compute_n_kept(k_len, press.prefilling_press.compression_ratio)


BAD_RATIOS = [{"compression_ratio": -0.1}, {"compression_ratio": 1.0}, {"compression_ratio": 1.5}]

PRESS_CASES: list[PressCase] = [
    PressCase("knorm", lambda r: KnormPress(r), bad_kwargs=BAD_RATIOS),
    PressCase("snapkv", lambda r: SnapKVPress(r, window_size=4), bad_kwargs=BAD_RATIOS),
    PressCase("expected_attention", lambda r: ExpectedAttentionPress(r, n_sink=2), bad_kwargs=BAD_RATIOS),
    PressCase("tova", lambda r: TOVAPress(r), bad_kwargs=BAD_RATIOS),
    PressCase("streaming_llm", lambda r: StreamingLLMPress(r, n_sink=2), bad_kwargs=BAD_RATIOS),
    PressCase("keydiff", lambda r: KeyDiffPress(r), bad_kwargs=BAD_RATIOS),
    PressCase("random", lambda r: RandomPress(r, seed=0), deterministic=False, bad_kwargs=BAD_RATIOS),
    PressCase(
        "observed_attention", lambda r: ObservedAttentionPress(r), attn_implementation="eager", bad_kwargs=BAD_RATIOS
    ),
    PressCase("pyramidkv", lambda r: PyramidKVPress(r, window_size=4), kept=_pyramid_kept, bad_kwargs=BAD_RATIOS),
    PressCase(
        "adakv_expected_attention",
        lambda r: AdaKVPress(ExpectedAttentionPress(r, n_sink=2)),
        masks_instead_of_pruning=True,
        eager_ok=False,
    ),
    PressCase(  # the same AdaKV choice held as ragged layers (issue 19)
        "ragged_adakv_expected_attention",
        lambda r: RaggedPress(AdaKVPress(ExpectedAttentionPress(r, n_sink=2))),
        masks_instead_of_pruning=True,
        ragged=True,
        eager_ok=False,
    ),
    PressCase(
        "composed_knorm_keydiff",
        lambda r: ComposedPress([KnormPress(r / 2), KeyDiffPress(r / 2)]),
        kept=_composed_kept,
    ),
    # pikvpress presses (issues 4-7); tiny models have head dims 16 (DeepSeek: keys 24, values 12)
    PressCase(
        "quantization_int4",
        lambda r: ComposedPress(
            [KnormPress(r), QuantizationPress(bits=4, group_size=4, key_group_size=8, residual_length=4)]
        ),
        kept=_composed_kept,
        lossless=False,
    ),
    PressCase(
        "quantization_int2_per_token",
        lambda r: ComposedPress(
            [
                SnapKVPress(r, window_size=4),
                QuantizationPress(bits=2, group_size=4, key_group_size=4, residual_length=0, layout="per_token"),
            ]
        ),
        kept=_composed_kept,
        lossless=False,
    ),
    PressCase(
        "expert_routing_gate",
        lambda r: ExpertRoutingPress(r, router="gate", num_experts=4, window_size=8),
        bad_kwargs=BAD_RATIOS,
    ),
    PressCase(
        "expert_routing_learned",
        lambda r: ExpertRoutingPress(r, router="learned", num_experts=2, router_weights=tiny_router_dir()),
        kept=_routing_kept,
        bad_kwargs=BAD_RATIOS,
    ),
    PressCase(  # evicts while decoding, every 2 steps, down to (1 - ratio) of the tokens seen; wrapped the way
        # kvpress's pipeline runs a press while it decodes (it computes its prior at the prefill too)
        "adaptive_scheduling",
        lambda r: PrefillDecodingPress(
            decoding_press=AdaptiveSchedulingPress(compression_ratio=r, interval=2, sink_tokens=2, recent_window=2)
        ),
        kept=_all_kept,
        decodes=True,
    ),
    PressCase(
        "prefill_knorm_decoding_h2o",
        lambda r: PrefillDecodingPress(
            prefilling_press=KnormPress(r),
            decoding_press=AdaptiveSchedulingPress(budget=16, policy="h2o", interval=2, recent_window=2),
        ),
        kept=_prefill_press_kept,
        decodes=True,
    ),
    # PiKVPress (issue 7): routing -> (packing) -> 4 shards of a 40-token context, every shard read (exact over
    # what is stored); the tail keeps 4 tokens and decode tokens flush to the shards 4 at a time
    PressCase(
        "pikv_routing_sharded",
        lambda r: PiKVPress(
            routing=ExpertRoutingPress(r, router="gate", num_experts=4, window_size=8),
            sharding={"num_shards": 4, "tail_length": 4, "flush_tokens": 1},
        ),
        kept=_pikv_kept,
        lossless=False,
        bad_kwargs=[{"compression_ratio": 1.0}, {"compression_ratio": -0.5}],
    ),
    PressCase(
        "pikv_routing_int8_sharded",
        lambda r: PiKVPress(
            routing=ExpertRoutingPress(r, router="keys", num_experts=2, window_size=8),
            compression=QuantizationPress(bits=8, group_size=4, key_group_size=4, residual_length=2),
            sharding={"num_shards": 2, "flush_tokens": 2},
        ),
        kept=_pikv_kept,
        lossless=False,
    ),
    PressCase("pikv_scheduling_sharded", _pikv_scheduling, kept=_all_kept, lossless=False, decodes=True),
    PressCase(
        "adakv_expert_routing_keys",
        lambda r: AdaKVPress(ExpertRoutingPress(r, router="keys", num_experts=4, window_size=8)),
        masks_instead_of_pruning=True,
        eager_ok=False,
    ),
]
