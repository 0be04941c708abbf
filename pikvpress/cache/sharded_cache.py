"""ExpertShardedCache: a transformers cache whose full-attention layers are :class:`ShardedKVLayer` objects."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from transformers import DynamicCache

from pikvpress.cache.sharded_layer import ShardedKVLayer, check_shard_args


class ExpertShardedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers keep their tokens in ``num_shards`` shards.

    The prefill is stored as usual (kvpress presses prune it as they would a ``DynamicCache``); the first
    step after it moves the layer's tokens, but the last ``tail_length``, to the shards, and later steps
    move the tail's overflow. Sliding-window layers stay dense. Read it with pikvpress's attention
    (``pikvpress.enable_packed_attention(model)``; :class:`~pikvpress.presses.PiKVPress` switches it on),
    which attends to each shard where it lives and merges the partial attentions exactly.

    Parameters
    ----------
    num_shards, placement, devices, top_k_shards, shard_score, tail_length, flush_tokens, packing
        As in :class:`~pikvpress.cache.ShardedKVLayer`.
    process_group : ShardGroup or torch.distributed.ProcessGroup, optional
        Spread the shards over the ranks of this group (a :class:`~pikvpress.distributed.ShardGroup`, or a
        process group / ``"default"`` to build one); every rank must run the same model on the same inputs.
    config : transformers.PretrainedConfig, optional
        The model config: its layer types (sliding-window layers stay dense) and attention implementation.

    Examples
    --------
    >>> cache = ExpertShardedCache(num_shards=4, devices=["cuda:0", "cuda:1"], config=model.config)
    >>> pikvpress.enable_packed_attention(model)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(
        self,
        num_shards: int = 4,
        placement: str = "experts",
        devices: Sequence[str | torch.device] | None = None,
        process_group: Any = None,
        top_k_shards: int | None = None,
        shard_score: str = "bound",
        tail_length: int = 0,
        flush_tokens: int = 16,
        packing: dict[str, Any] | None = None,
        config: Any = None,
    ):
        group = None
        if process_group is not None:
            from pikvpress.distributed import ShardGroup

            group = process_group if isinstance(process_group, ShardGroup) else ShardGroup(process_group)
        world = None if group is None else group.world_size
        check_shard_args(num_shards, placement, top_k_shards, shard_score, tail_length, flush_tokens, devices, world)
        self.layer_kwargs = {
            "num_shards": num_shards,
            "placement": placement,
            "devices": devices,
            "group": group,
            "top_k_shards": top_k_shards,
            "shard_score": shard_score,
            "tail_length": tail_length,
            "flush_tokens": flush_tokens,
            "packing": packing,
            "config": config,
        }
        super().__init__(config=config)
        if config is None:
            self.layer_class_to_replicate = partial(ShardedKVLayer, **self.layer_kwargs)
        else:
            self.layers = [
                layer if getattr(layer, "is_sliding", False) else ShardedKVLayer(**self.layer_kwargs)
                for layer in self.layers
            ]

    @property
    def group(self) -> Any:
        """The :class:`~pikvpress.distributed.ShardGroup` the shards are spread over, or None."""
        return self.layer_kwargs["group"]
