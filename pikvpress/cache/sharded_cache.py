"""ExpertShardedCache: a transformers cache whose full-attention layers are :class:`ShardedKVLayer` objects."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from transformers import DynamicCache

from pikvpress.cache.sharded_layer import ShardedKVLayer
from pikvpress.cache.sharding import ShardingOptions


class ExpertShardedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers keep their tokens in ``num_shards`` shards.

    The prefill is stored as usual (kvpress presses prune it as they would a ``DynamicCache``); the first
    step after it moves the layer's tokens, but the last ``tail_length``, to the shards, and later steps
    move the tail's overflow. Sliding-window layers stay dense. Read it with pikvpress's attention
    (``pikvpress.enable_packed_attention(model)``; :class:`~pikvpress.presses.PiKVPress` switches it on),
    which attends to each shard where it lives and merges the partial attentions exactly.

    Parameters
    ----------
    options : ShardingOptions, optional
        How every full-attention layer shards its tokens; keyword arguments named like its fields override them
        (``ExpertShardedCache(num_shards=4, tail_length=8)``).
    process_group : ShardGroup or torch.distributed.ProcessGroup, optional
        Spread the shards over the ranks of this group (a :class:`~pikvpress.distributed.ShardGroup`, or a
        process group / ``"default"`` to build one); every rank must run the same model on the same inputs.
    packing : dict, optional
        :class:`~pikvpress.cache.PackedKVLayer` arguments for packed shards; None keeps them dense.
    config : transformers.PretrainedConfig, optional
        The model config: its layer types (sliding-window layers stay dense) and attention implementation.

    Examples
    --------
    >>> cache = ExpertShardedCache(num_shards=4, devices=("cuda:0", "cuda:1"), config=model.config)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(
        self,
        options: ShardingOptions | None = None,
        *,
        process_group: Any = None,
        packing: dict[str, Any] | None = None,
        config: Any = None,
        **option_fields: Any,
    ):
        options = ShardingOptions.of(options)
        if option_fields:
            options = replace(options, **option_fields)
        group = None
        if process_group is not None:
            from pikvpress.distributed import ShardGroup

            group = process_group if isinstance(process_group, ShardGroup) else ShardGroup(process_group)
        if group is not None:
            if options.devices is not None:
                raise ValueError("give devices or a process group, not both")
            options.check_world(group.world_size)
        make = partial(ShardedKVLayer, options, group=group, packing=packing, config=config)
        self.options, self._group = options, group
        super().__init__(config=config)
        if config is None:
            self.layer_class_to_replicate = make
        else:
            self.layers = [layer if getattr(layer, "is_sliding", False) else make() for layer in self.layers]

    @property
    def group(self) -> Any:
        """The :class:`~pikvpress.distributed.ShardGroup` the shards are spread over, or None."""
        return self._group
