"""Press registry: kvpress baselines under kvpress's evaluation names, plus every pikvpress press.

Every call builds a fresh press, so no mutable state is shared between runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

from kvpress import (
    AdaKVPress,
    BasePress,
    ComposedPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVzipPress,
    ObservedAttentionPress,
    PrefillDecodingPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

from pikvpress.presses import PRESSES, PiKVPress
from pikvpress.scheduling import KeptScoresSource

PressFactory = Callable[[float], BasePress]

BASELINES: dict[str, PressFactory] = {
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "snapkv": lambda r: SnapKVPress(compression_ratio=r),
    "expected_attention": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "adakv_expected_attention": lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r)),
    "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "keydiff": lambda r: KeyDiffPress(compression_ratio=r),
    "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r),
    "observed_attention": lambda r: ObservedAttentionPress(compression_ratio=r),
    "random": lambda r: RandomPress(compression_ratio=r, seed=0),
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
}

#: presses that need ``attn_implementation="eager"`` (they read the attention weights)
EAGER_PRESSES = frozenset({"observed_attention"})

NO_PRESS = "no_press"


def press_names() -> list[str]:
    """Every name :func:`build_press` accepts."""
    return [NO_PRESS, *BASELINES, *PRESSES]


def takes_ratio(name: str) -> bool:
    """Whether the press called ``name`` has a token ``compression_ratio`` (``QuantizationPress``
    removes no token and has none; the sweep runs such presses once)."""
    if name == NO_PRESS:
        return False
    if name in BASELINES:
        return True
    factory = PRESSES.get(name)
    if factory is None:  # unknown: build_press names the allowed presses
        return True
    if dataclasses.is_dataclass(factory):
        return any(f.name == "compression_ratio" and f.init for f in dataclasses.fields(factory))
    return "compression_ratio" in inspect.signature(factory).parameters


def build_press(name: str, compression_ratio: float = 0.0, **kwargs: Any) -> BasePress | None:
    """A fresh press called ``name`` at ``compression_ratio`` (``None`` for ``no_press``).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the allowed ones) or a ratio outside [0, 1).
    """
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
    if name in BASELINES:
        press = BASELINES[name](float(compression_ratio))
        for key, value in kwargs.items():
            if not hasattr(press, key):
                raise ValueError(f"press {name!r} has no field {key!r}")
            setattr(press, key, value)
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
