"""Model-family adapters, tiny test models and the default-model loader."""

from pikvpress.models.adapter import (
    LayerAdapter,
    ModelAdapter,
    MoERouter,
    RoutingResult,
    UnsupportedModelError,
    get_adapter,
    is_supported,
    language_model,
    layer_adapter,
    slice_positions,
)
from pikvpress.models.families import FAMILIES, SUPPORTED_FAMILIES, FamilySpec
from pikvpress.models.loader import DEFAULT_MODEL, load_model
from pikvpress.models.tiny import MOE_FAMILIES, TINY_FAMILIES, tiny_config, tiny_model, tiny_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "FamilySpec",
    "LayerAdapter",
    "MOE_FAMILIES",
    "ModelAdapter",
    "MoERouter",
    "RoutingResult",
    "SUPPORTED_FAMILIES",
    "TINY_FAMILIES",
    "UnsupportedModelError",
    "get_adapter",
    "is_supported",
    "language_model",
    "layer_adapter",
    "load_model",
    "slice_positions",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]
