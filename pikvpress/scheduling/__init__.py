"""Decode-time scheduling: per-token statistics gathered while decoding, and the eviction policies on them."""

from pikvpress.scheduling.policies import POLICIES, kept_indices, policy_scores
from pikvpress.scheduling.statistics import DecodeStatistics

__all__ = ["POLICIES", "DecodeStatistics", "kept_indices", "policy_scores"]
