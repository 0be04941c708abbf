"""pikvpress's user-facing kvpress presses, one press per file.

``PRESSES`` maps each press's registry name to its class; the evaluation harness and the
conformance suite (``tests/default_presses.py``) read it. The PiKV presses (expert routing,
adaptive scheduling, quantization, the chained ``PiKVPress``) register here as they land.
"""

from kvpress.presses.base_press import BasePress

from pikvpress.presses.adaptive_scheduling_press import AdaptiveSchedulingPress
from pikvpress.presses.expert_routing_press import ExpertRoutingPress
from pikvpress.presses.pikv_press import PiKVPress
from pikvpress.presses.quantization_press import QuantizationPress
from pikvpress.presses.ragged_press import RaggedPress
from pikvpress.routing.stats import RoutingStats

PRESSES: dict[str, type[BasePress]] = {
    "adaptive_scheduling": AdaptiveSchedulingPress,
    "expert_routing": ExpertRoutingPress,
    "pikv": PiKVPress,
    "quantization": QuantizationPress,
}

__all__ = [
    "PRESSES",
    "AdaptiveSchedulingPress",
    "ExpertRoutingPress",
    "PiKVPress",
    "QuantizationPress",
    "RaggedPress",
    "RoutingStats",
]
