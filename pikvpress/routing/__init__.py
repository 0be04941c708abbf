"""Routers shared by presses and caches: key-space expert clustering and keep-budget allocation.

:func:`gate_routing` reads each layer's MoE router through :mod:`pikvpress.models` adapters on the
MLP input the layer is about to compute; :func:`spherical_kmeans` builds "KV experts" from the keys
themselves; :func:`allocate_budget` spends a per-head keep budget across experts; :class:`LearnedRouter` predicts
the attention a token will receive when the model re-reads its context (trained offline, see
:mod:`pikvpress.routing.training`).
"""

from pikvpress.routing.budget import allocate_budget
from pikvpress.routing.gate import gate_routing, mlp_inputs
from pikvpress.routing.key_clusters import KeyClusters, spherical_kmeans
from pikvpress.routing.learned import LearnedRouter, RouterSpec, load_router

__all__ = [
    "KeyClusters",
    "LearnedRouter",
    "RouterSpec",
    "allocate_budget",
    "gate_routing",
    "load_router",
    "mlp_inputs",
    "spherical_kmeans",
]
