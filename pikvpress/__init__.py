"""pikvpress: PiKV KV-cache management for Mixture-of-Experts models, as a press collection on kvpress.

Importing pikvpress applies :mod:`pikvpress.compat`, which makes kvpress's own presses correct on
every supported family (set ``PIKVPRESS_KVPRESS_FIXES=0`` in the environment to opt out).
"""

import os as _os

from pikvpress.attention import disable_packed_attention, enable_packed_attention, install_attention_dispatch
from pikvpress.cache import (
    ExpertShardedCache,
    PackedKVLayer,
    PackedKVView,
    RaggedKVLayer,
    ShardedKVLayer,
    ShardingOptions,
    cache_bytes_read,
    cache_nbytes,
    cache_nbytes_per_device,
)
from pikvpress.compat import (
    KVPRESS_FIXES,
    apply_kvpress_fixes,
    kvpress_fixes,
    kvpress_fixes_applied,
    remove_kvpress_fixes,
)
from pikvpress.models import (
    DEFAULT_MODEL,
    SUPPORTED_FAMILIES,
    LayerAdapter,
    ModelAdapter,
    MoERouter,
    RoutingResult,
    UnsupportedModelError,
    get_adapter,
    load_model,
    tiny_model,
    tiny_tokenizer,
)
from pikvpress.presses import (
    PRESSES,
    AdaptiveSchedulingPress,
    ExpertRoutingPress,
    PiKVPress,
    QuantizationPress,
    RaggedPress,
    RoutingStats,
)
from pikvpress.routing import LearnedRouter, load_router

__version__ = "0.1.0"

install_attention_dispatch()  # before the compatibility layer wraps the same functions (see pikvpress.attention)
if _os.environ.get("PIKVPRESS_KVPRESS_FIXES", "1").lower() not in ("0", "false", "no", "off"):
    apply_kvpress_fixes()

__all__ = [
    "DEFAULT_MODEL",
    "KVPRESS_FIXES",
    "PRESSES",
    "SUPPORTED_FAMILIES",
    "AdaptiveSchedulingPress",
    "ExpertRoutingPress",
    "ExpertShardedCache",
    "LayerAdapter",
    "LearnedRouter",
    "MoERouter",
    "ModelAdapter",
    "PackedKVLayer",
    "PackedKVView",
    "PiKVPress",
    "QuantizationPress",
    "RaggedKVLayer",
    "RaggedPress",
    "RoutingResult",
    "RoutingStats",
    "ShardedKVLayer",
    "ShardingOptions",
    "UnsupportedModelError",
    "apply_kvpress_fixes",
    "cache_bytes_read",
    "cache_nbytes",
    "cache_nbytes_per_device",
    "disable_packed_attention",
    "enable_packed_attention",
    "get_adapter",
    "kvpress_fixes",
    "kvpress_fixes_applied",
    "load_model",
    "load_router",
    "remove_kvpress_fixes",
    "tiny_model",
    "tiny_tokenizer",
]
