"""Decode-time scheduling: per-token statistics gathered while decoding, and the eviction policies on them."""

from pikvpress.scheduling.attention import (
    layer_step_probs,
    sharded_step_probs,
    step_probs,
    window_probs,
    window_queries,
)
from pikvpress.scheduling.decode_queries import DecodeQueryTap, record_decode_query
from pikvpress.scheduling.policies import POLICIES, kept_indices, policy_scores, priority_order
from pikvpress.scheduling.prior import KeptScoresSource, PerCache, scores_to_prior
from pikvpress.scheduling.statistics import DecodeStatistics

__all__ = [
    "POLICIES",
    "DecodeQueryTap",
    "DecodeStatistics",
    "KeptScoresSource",
    "PerCache",
    "kept_indices",
    "layer_step_probs",
    "policy_scores",
    "priority_order",
    "record_decode_query",
    "scores_to_prior",
    "sharded_step_probs",
    "step_probs",
    "window_probs",
    "window_queries",
]
