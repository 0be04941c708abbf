"""Decode-time scheduling: per-token statistics gathered while decoding, and the eviction policies on them."""

from pikvpress.scheduling.attention import sharded_step_probs, step_probs
from pikvpress.scheduling.policies import POLICIES, kept_indices, policy_scores, priority_order
from pikvpress.scheduling.prior import PREFILL_SCORES, scores_to_prior
from pikvpress.scheduling.statistics import DecodeStatistics

__all__ = [
    "POLICIES",
    "PREFILL_SCORES",
    "DecodeStatistics",
    "kept_indices",
    "policy_scores",
    "priority_order",
    "scores_to_prior",
    "sharded_step_probs",
    "step_probs",
]
