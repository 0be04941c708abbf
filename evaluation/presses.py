"""Press registry: kvpress baselines under kvpress's evaluation names, plus every pikvpress press.

Every call builds a fresh press, so no mutable state is shared between runs. The kvpress-named baselines
are kvpress 0.5.5's ``evaluation/evaluate_registry.py`` definitions (``PRESS_REGISTRY``), with the
compression ratio set by the sweep the way kvpress's ``evaluate.py`` sets it; ``docs/baselines.md`` lists
every name of that registry and what became of it here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from kvpress import (
    AdaKVPress,
    BasePress,
    BlockPress,
    CapPress,
    ChunkKVPress,
    CompactorPress,
    ComposedPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    DecodingPress,
    EntropyGatedChunkKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVComposePress,
    KVgradPress,
    KVzipPress,
    LagKVPress,
    LeverageScorePress,
    MergingPress,
    NonCausalAttnPress,
    ObservedAttentionPress,
    PrefillDecodingPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
)
from kvpress.presses.dms_press import DMSPress
from transformers import PreTrainedModel

from pikvpress.presses import PRESSES, ExpertRoutingPress, PiKVPress, RaggedPress
from pikvpress.scheduling import KeptScoresSource

PressFactory = Callable[[float], BasePress]


class KVComposeUnstructuredPress(KVComposePress):
    """kvpress's ``KVComposePress(structured=False)`` without its doubled cache.

    KVCompose scores the context by running it a second time through the prefilled cache, which appends a
    second copy of the context to every layer. The structured variant cuts the cache back to the context;
    kvpress 0.5.5's unstructured variant masks keys in the first copy only and leaves the second copy, so
    the answer attends to the whole context, unmasked, at twice the memory. This cuts the cache back to the
    context first, as the structured variant does; the scoring and the masked keys are kvpress's.
    """

    def compress_unstructured(self, model: PreTrainedModel) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.context_len]
            layer.values = layer.values[:, :, : self.context_len]
        super().compress_unstructured(model)


#: kvpress baselines, ``name -> factory(compression_ratio)``. The names of kvpress 0.5.5's PRESS_REGISTRY
#: carry exactly its definitions; the names after them are ours (kvpress presses its registry leaves out,
#: and the variants we keep for continuity), documented in docs/baselines.md.
BASELINES: dict[str, PressFactory] = {
    # --- kvpress 0.5.5 PRESS_REGISTRY, same names and constructor arguments ----------------------------
    "adakv_snapkv": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)),
    "block_keydiff": lambda r: BlockPress(press=KeyDiffPress(compression_ratio=r), block_size=128),
    "chunkkv": lambda r: ChunkKVPress(press=SnapKVPress(compression_ratio=r), chunk_length=20),
    "critical_adakv_expected_attention": lambda r: CriticalAdaKVPress(
        ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)
    ),
    "critical_adakv_snapkv": lambda r: CriticalAdaKVPress(SnapKVPress(compression_ratio=r)),
    "critical_expected_attention": lambda r: CriticalKVPress(
        ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)
    ),
    "critical_snapkv": lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r)),
    "cur": lambda r: CURPress(compression_ratio=r),
    "entropy_gated_chunkkv": lambda r: EntropyGatedChunkKVPress(press=SnapKVPress(compression_ratio=r)),
    "expected_attention": lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2)),
    "keydiff": lambda r: KeyDiffPress(compression_ratio=r),
    "kvcompose": lambda r: KVComposePress(compression_ratio=r),
    # kvpress's definition, with the doubled cache of its unstructured variant cut back (see the class)
    "kvcompose_unstructured": lambda r: KVComposeUnstructuredPress(compression_ratio=r, structured=False),
    "kvgrad": lambda r: KVgradPress(compression_ratio=r),
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
    "kvzip_plus": lambda r: KVzipPress(compression_ratio=r, kvzip_plus_normalization=True),
    "lagkv": lambda r: LagKVPress(compression_ratio=r),
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "observed_attention": lambda r: ObservedAttentionPress(compression_ratio=r),
    "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r),
    "random": lambda r: RandomPress(compression_ratio=r),
    # kvpress sets the ThinK part's key_channel_compression_ratio from its own option; the sweep has one ratio
    "snap_think": lambda r: ComposedPress(
        [SnapKVPress(compression_ratio=r), ThinKPress(key_channel_compression_ratio=r)]
    ),
    "snapkv": lambda r: SnapKVPress(compression_ratio=r),
    "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r),
    # ThinK prunes key channels, not tokens: the sweep's ratio is the fraction of key channels zeroed
    "think": lambda r: ThinKPress(key_channel_compression_ratio=r),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "compactor": lambda r: CompactorPress(compression_ratio=r),
    "adakv_compactor": lambda r: AdaKVPress(CompactorPress(compression_ratio=r)),
    "merging_knorm": lambda r: MergingPress(KnormPress(compression_ratio=r)),
    "merging_snapkv": lambda r: MergingPress(SnapKVPress(compression_ratio=r)),
    "merging_expected_attention": lambda r: MergingPress(ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2)),
    # --- ours: kvpress presses outside its registry, and earlier definitions kept under clear names --------
    "expected_attention_plain": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "adakv_expected_attention": lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r)),
    "kvzip_layerwise": lambda r: KVzipPress(compression_ratio=r, layerwise=True),
    "leverage": lambda r: LeverageScorePress(compression_ratio=r),
    "non_causal_attention": lambda r: NonCausalAttnPress(compression_ratio=r),
    "cap": lambda r: CapPress(compression_ratio=r),
}

#: the issue's names for kvpress presses, resolved to kvpress's evaluation names
ALIASES: dict[str, str] = {
    "criticalkv": "critical_snapkv",
    "critical_adakv": "critical_adakv_snapkv",
    "block": "block_keydiff",
}

#: kvpress 0.5.5 PRESS_REGISTRY names that download weights or data (the hub, or files from GitHub) this
#: offline harness cannot fetch; :func:`build_press` refuses them with the reason
NEEDS_HUB_WEIGHTS: dict[str, str] = {
    "duo_attention": "DuoAttentionPress downloads per-checkpoint attention patterns (mit-han-lab/duo-attention "
    "on GitHub), published only for a few large models",
    "duo_attention_on_the_fly": "DuoAttentionPress(on_the_fly_scoring=True) scores heads on the kmfoda/booksum "
    "data set from the hub",
    "fastkvzip": "FastKVzipPress loads trained gates (Jang-Hyun/Fast-KVzip on the hub), one per supported model",
    "kvzap_linear": "KVzapPress loads a trained KVzap model from the hub (one per supported model)",
    "kvzap_mlp": "KVzapPress loads a trained KVzap model from the hub (one per supported model)",
    "kvzap_mlp_head": "KVzapPress loads a trained KVzap model from the hub (one per supported model)",
    "kvzap_mlp_layer": "KVzapPress loads a trained KVzap model from the hub (one per supported model)",
    "merging_kvzap_mlp": "KVzapPress loads a trained KVzap model from the hub (one per supported model)",
    "qfilter": "QFilterPress loads trained Q-Filters (nthngdy/<model>_qfilt on the hub), one per supported model",
    "RestoreKV": "RestoreKVPress loads trained restore embeddings from the hub (hf_hub_download)",
    "RestoreKV_plus": "RestoreKVPress loads trained restore embeddings from the hub (hf_hub_download)",
    "lukv": "LUKVPress downloads a per-model budget curve (baidu-baige/LU-KV on GitHub); kvpress 0.5.5 has one, "
    "for meta-llama/Llama-3.1-8B-Instruct only",
}

#: kvpress 0.5.5 PRESS_REGISTRY names left out of the offline prefill benchmark, with the reason
EXCLUDED: dict[str, str] = {
    **{
        name: "compresses only while the answer is decoded, to a target_size of tokens (not a ratio of the "
        "context); the benchmark's answers are far shorter than its compression_interval, so the context "
        "cache it measures would be uncompressed"
        for name in (
            "decoding_knorm",
            "decoding_streaming_llm",
            "decoding_tova",
            "decoding_adakv_expected_attention_e2",
            "decoding_adakv_snapkv",
            "decoding_keydiff",
            "cam_streaming_llm",
            "cam_knorm",
            "cam_adakv_snapkv",
            "cam_tova",
        )
    },
    "decoding_qfilter": "compresses only while decoding, and QFilterPress needs hub weights",
    "finch": "FinchPress needs a delimiter token added to the tokenizer and to the model's embeddings, and the "
    "context text followed by that token and the question (kvpress's evaluate.py does this); the harness "
    "runner does not",
}

#: baselines that only mask keys, head by head (``masked_key_indices``): the cache keeps every token and frees
#: no memory, the masked keys are hidden from attention (checked in tests/test_baselines.py)
MASKS_ONLY = frozenset(
    {
        "adakv_snapkv",
        "adakv_compactor",
        "adakv_expected_attention",
        "critical_adakv_expected_attention",
        "critical_adakv_snapkv",
        "critical_adakv",
        "expected_attention",
        "kvcompose_unstructured",
        "kvgrad",
        "kvzip",
        "kvzip_plus",
        "kvzip_layerwise",
    }
)

#: head-wise baselines of :data:`MASKS_ONLY` held as ragged caches (:class:`pikvpress.RaggedPress`): the tokens each
#: head keeps are the masked press's, and only they are held. The first six share the harness's prefill; KVzip's
#: three pay their own (as their masked versions do)
RAGGED_OF = (
    "adakv_snapkv",
    "adakv_compactor",
    "adakv_expected_attention",
    "critical_adakv_snapkv",
    "critical_adakv_expected_attention",
    "expected_attention",
    "kvzip",
    "kvzip_plus",
    "kvzip_layerwise",
)
RAGGED: dict[str, PressFactory] = {
    **{f"ragged_{name}": (lambda r, name=name: RaggedPress(BASELINES[name](r))) for name in RAGGED_OF},
    # the leaderboard's routing_heads (ExpertRoutingPress's adaptive head budgets), each head holding its own share
    "ragged_routing_heads": lambda r: RaggedPress(
        ExpertRoutingPress(compression_ratio=r, head_budget="adaptive_masked")
    ),
}


def masked_twin(name: str) -> str:
    """The masked head-wise baseline a ragged press wraps (``ragged_adakv_snapkv`` -> ``adakv_snapkv``); any other
    name, itself."""
    twin = name.removeprefix("ragged_")
    return twin if name in RAGGED and twin in BASELINES else name


#: baselines that prune key channels and remove no tokens (ThinK zeroes channels in place: no memory freed)
CHANNEL_PRUNING = frozenset({"think"})

#: presses that need ``attn_implementation="eager"`` (they read the attention weights)
EAGER_PRESSES = frozenset({"observed_attention"})

NO_PRESS = "no_press"


def press_names() -> list[str]:
    """Every name :func:`build_press` accepts (not the ones in :data:`NEEDS_HUB_WEIGHTS` or :data:`EXCLUDED`)."""
    return [NO_PRESS, *BASELINES, *ALIASES, *RAGGED, *PRESSES]


def takes_ratio(name: str) -> bool:
    """Whether the press called ``name`` has a token ``compression_ratio`` (``QuantizationPress``
    removes no token and has none; the sweep runs such presses once)."""
    if name == NO_PRESS:
        return False
    if name in BASELINES or name in ALIASES or name in RAGGED:
        return True
    factory = PRESSES.get(name)
    if factory is None:  # unknown: build_press names the allowed presses
        return True
    if dataclasses.is_dataclass(factory):
        return any(f.name == "compression_ratio" and f.init for f in dataclasses.fields(factory))
    return "compression_ratio" in inspect.signature(factory).parameters


def components(name: str, composed: Mapping[str, Any] | None = None) -> list[str]:
    """The registry names a press is made of: its components for a name of ``composed`` (a config's
    ``composed_presses``), else ``[name]``."""
    spec = (composed or {}).get(name)
    if isinstance(spec, list):
        return [str(c.get("press", "")) for c in spec if isinstance(c, dict)]
    return [name]


def keeps_every_token(name: str, composed: Mapping[str, Any] | None = None) -> bool:
    """Whether the press ``name`` leaves every context token in the cache whatever its ratio: no press, the presses
    that only mask keys (:data:`MASKS_ONLY`) or prune key channels (:data:`CHANNEL_PRUNING`); a name of ``composed``
    when every component does (:func:`components`)."""
    return all(p == NO_PRESS or p in MASKS_ONLY or p in CHANNEL_PRUNING for p in components(name, composed))


def evicts_while_answering(press: BasePress | None) -> bool:
    """Whether kvpress's pipeline keeps ``press`` active while it answers (``_forward``'s rule: a decoding press, a
    prefill-decoding press, DMS with ``decoding=True``): the harness measures its cache after answering."""
    if isinstance(press, DMSPress):
        return bool(press.decoding)
    return isinstance(press, (DecodingPress, PrefillDecodingPress))


def refusal(name: str) -> str | None:
    """Why the harness refuses the kvpress press ``name`` (it needs hub weights, :data:`NEEDS_HUB_WEIGHTS`, or is left
    out, :data:`EXCLUDED`), as the end of a sentence naming it; None if it does not."""
    if name in NEEDS_HUB_WEIGHTS:
        return f"needs hub weights, which this offline harness cannot fetch: {NEEDS_HUB_WEIGHTS[name]}"
    if name in EXCLUDED:
        return f"is not an offline prefill baseline here: {EXCLUDED[name]}"
    return None


def build_press(name: str, compression_ratio: float = 0.0, **kwargs: Any) -> BasePress | None:
    """A fresh press called ``name`` at ``compression_ratio`` (``None`` for ``no_press``).

    An alias (:data:`ALIASES`) builds the press it names. For ``think`` the ratio is the fraction of key
    channels pruned (``key_channel_compression_ratio``; kvpress reports half of it as its
    ``compression_ratio``).

    Raises
    ------
    ValueError
        For a name that needs hub weights (:data:`NEEDS_HUB_WEIGHTS`) or is left out (:data:`EXCLUDED`), with
        the reason; an unknown name (the message lists the allowed ones); a ratio outside [0, 1).
    """
    reason = refusal(name)
    if reason is not None:
        raise ValueError(f"press {name!r} {reason}")
    if name not in press_names():
        raise ValueError(f"unknown press {name!r}; allowed: {', '.join(press_names())}")
    if (
        not isinstance(compression_ratio, (int, float))
        or math.isnan(compression_ratio)
        or not (0 <= compression_ratio < 1)
    ):
        raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio!r}")
    if name == NO_PRESS:
        return None
    name = ALIASES.get(name, name)
    if name in BASELINES or name in RAGGED:
        press = (BASELINES.get(name) or RAGGED[name])(float(compression_ratio))
        target = press.press if name in RAGGED else press  # fields of a ragged press are its wrapped press's
        for key, value in kwargs.items():
            if not hasattr(target, key):
                raise ValueError(f"press {name!r} has no field {key!r}")
            setattr(target, key, value)
        return press
    if not takes_ratio(name):
        if compression_ratio:
            raise ValueError(
                f"press {name!r} removes no tokens; its compression_ratio must be 0, got {compression_ratio}"
            )
        return PRESSES[name](**kwargs)
    press = PRESSES[name](compression_ratio=compression_ratio, **kwargs)
    if getattr(press, "compresses_while_decoding", False):
        # kvpress's pipeline keeps a press active while it answers only inside a (Prefill)DecodingPress;
        # PiKVPress also shapes the prefill (routing, sharding), so it is both presses of the wrapper
        prefill = press if isinstance(press, PiKVPress) else None
        return PrefillDecodingPress(prefilling_press=prefill, decoding_press=press)
    return press


def chain_presses(parts: list[BasePress]) -> BasePress | None:
    """One press running ``parts`` in order: a ComposedPress of the prefill presses, inside a
    PrefillDecodingPress when one part evicts while decoding (at most one may). A scheduler without a
    ``prior_from`` starts from the scores of the last prefill part that publishes them (ExpertRoutingPress)."""
    decoding = [p for p in parts if isinstance(p, PrefillDecodingPress)]
    prefill = [p for p in parts if not isinstance(p, PrefillDecodingPress)]
    if len(decoding) > 1:
        raise ValueError("a chain of presses can hold at most one press that evicts while decoding")
    if decoding and prefill and decoding[0].prefilling_press is not None:
        raise ValueError("PiKVPress with scheduling stores the prefill itself; it cannot follow other presses")
    prefill_press = None if not prefill else prefill[0] if len(prefill) == 1 else ComposedPress(prefill)
    if not decoding:
        return prefill_press
    if prefill_press is None:
        return decoding[0]
    scheduler = decoding[0].decoding_press
    sources = [p for p in prefill if isinstance(p, KeptScoresSource)]
    if sources and getattr(scheduler, "prior_from", False) is None:
        scheduler.prior_from = sources[-1]  # the scheduler starts from the scores of the press that kept the tokens
    return PrefillDecodingPress(prefilling_press=prefill_press, decoding_press=scheduler)
