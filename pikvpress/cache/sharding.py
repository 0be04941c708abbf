"""How a layer's tokens are sharded: one frozen set of options that PiKVPress, ExpertShardedCache and ShardedKVLayer
take, checked once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from pikvpress.routing.shards import PLACEMENTS, SHARD_SCORES


@dataclass(frozen=True)
class ShardingOptions:
    """How each full-attention layer keeps its tokens in shards.

    Parameters
    ----------
    num_shards : int
        Shards per layer.
    placement : {"experts", "contiguous", "round_robin"}
        Token-to-shard rule (:func:`~pikvpress.routing.shards.shard_assignment`).
    top_k_shards : int, optional
        Shards each query reads, in 1..num_shards; None reads all (exact attention over what is stored).
    shard_score : {"bound", "centroid"}
        How shards are ranked for a query: Quest's upper bound on ``q . k`` from the shard's key min/max, or the
        affinity to its mean key.
    tail_length : int, optional
        Most recent tokens kept unsharded, on the query's device, and always read. None: the user of the options
        chooses (PiKVPress: its compression's residual length, else 32; a cache or a layer: 0).
    flush_tokens : int
        Tokens each shard receives per row when the tail overflows while decoding.
    devices : tuple of str or torch.device, optional
        Devices the shards are spread over (their number must divide ``num_shards``); default: the query's device.

    Examples
    --------
    >>> ShardingOptions(num_shards=8, top_k_shards=2, devices=("cuda:0", "cuda:1"))
    """

    num_shards: int = 4
    placement: str = "experts"
    top_k_shards: int | None = None
    shard_score: str = "bound"
    tail_length: int | None = None
    flush_tokens: int = 16
    devices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        num_shards, top_k = self.num_shards, self.top_k_shards
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_shards):
            raise ValueError(f"top_k_shards must be None or an int in 1..num_shards={num_shards}, got {top_k!r}")
        if self.shard_score not in SHARD_SCORES:
            raise ValueError(f"shard_score must be one of {SHARD_SCORES}, got {self.shard_score!r}")
        for name, value, low in (("tail_length", self.tail_length, 0), ("flush_tokens", self.flush_tokens, 1)):
            if (value is not None or name != "tail_length") and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            ):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        devices = self.devices
        if devices is not None:
            if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
                raise ValueError(f"devices must be a non-empty list of devices, got {devices!r}")
            for device in devices:
                parse_device(device)
            if len(devices) > num_shards or num_shards % len(devices):
                raise ValueError(
                    f"num_shards={num_shards} shards cannot be spread evenly over {len(devices)} devices "
                    f"{list(devices)}; give a device list whose length divides num_shards"
                )
            object.__setattr__(self, "devices", tuple(devices))

    @classmethod
    def of(cls, value: Any, name: str = "sharding") -> ShardingOptions:
        """Options from an instance, a dict of their fields (the harness's YAML), or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{name} has no option {sorted(unknown)}; options: {[f.name for f in fields(cls)]}")
            return cls(**value)
        raise ValueError(f"{name} must be a ShardingOptions, a dict of its fields or None, got {type(value).__name__}")

    def check_world(self, world_size: int) -> None:
        """Raise ``ValueError`` if the shards cannot be spread evenly over ``world_size`` ranks."""
        if world_size > self.num_shards or self.num_shards % world_size:
            raise ValueError(
                f"num_shards={self.num_shards} shards cannot be spread evenly over the process group's {world_size} "
                "ranks; use a multiple of the world size"
            )


def parse_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming it if it is not a device string or ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    try:
        if not isinstance(device, str):
            raise TypeError
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"devices must hold device names such as 'cpu', 'cuda:0' or torch.device objects, got {device!r}"
        ) from None


def check_devices_available(devices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming a device of ``devices`` that this process cannot use, and the ones it can."""
    for name in devices:
        device = parse_device(name)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if device.index is None else device.index
            if index >= count:
                allowed = ", ".join(f"'cuda:{i}'" for i in range(count)) or "none: CUDA is not available here"
                raise ValueError(f"devices names {name!r}, which this process cannot use; CUDA devices: {allowed}")
        elif device.type not in ("cpu", "meta"):
            backend = getattr(torch, device.type, None)
            if backend is None or not getattr(backend, "is_available", lambda: False)():
                raise ValueError(f"devices names {name!r}, whose backend is not available in this process")
