"""PiKVPress: expert routing -> compression -> expert-sharded storage at prefill; routed sharded attention and
scheduling while decoding."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

from pikvpress.attention import enable_packed_attention
from pikvpress.cache.sharded_layer import ShardedKVLayer
from pikvpress.cache.sharding import ShardingOptions, check_devices_available
from pikvpress.cache.support import check_cache
from pikvpress.presses.adaptive_scheduling_press import AdaptiveSchedulingPress
from pikvpress.presses.expert_routing_press import ExpertRoutingPress
from pikvpress.presses.lifecycle import FinishesOnExit
from pikvpress.presses.quantization_press import QuantizationPress
from pikvpress.routing.shards import token_validity

logger = logging.getLogger(__name__)


def _component(value: Any, cls: type, name: str, **defaults: Any) -> Any:
    """A component press from an instance, a dict of its fields (the harness's YAML), or None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**{**defaults, **value})
    raise ValueError(
        f"{name} must be a {cls.__name__} instance, a dict of its fields or None, got {type(value).__name__}"
    )


@dataclass
class PiKVPress(FinishesOnExit, BasePress):
    """The PiKV system: route, compress and shard each layer's KV at prefill; read it routed and sharded.

    Prefill (each full-attention layer, after its attention ran on the whole context):

    1. ``routing`` (an :class:`ExpertRoutingPress`) decides which tokens are kept, and which expert each kept
       token belongs to;
    2. the kept tokens move to a :class:`~pikvpress.cache.ShardedKVLayer` of ``sharding.num_shards`` shards placed
       by ``sharding.placement`` (``"experts"``: the shard holding the token's expert, balanced), on
       ``sharding.devices`` or on the ranks of ``process_group``; the last ``sharding.tail_length`` tokens stay in
       the tail, on the query's device;
    3. with ``compression`` (a :class:`QuantizationPress`), every shard stores its tokens packed its way.

    The press owns its parts and reads their results from them: the routing press's kept tokens and experts
    (:meth:`ExpertRoutingPress.routed_tokens`), and the scheduling press starts from the routing press's scores
    (its ``prior_from`` is set to ``routing`` when not given).

    Decode: each query reads the tail and its ``sharding.top_k_shards`` best shards (all of them when None: exact
    attention over what is stored), each shard computing its partial attention where it lives, merged exactly
    by log-sum-exp (one all-gather of (output, lse) per layer and step across ranks). With ``scheduling`` (an
    :class:`AdaptiveSchedulingPress`), its policy evicts inside the shards every ``interval`` steps, each shard
    keeping its share of the budget; over a process group each rank scores and evicts the tokens of its own
    shards (the scheduler's softmax denominators and the kept indices cross the ranks, never keys). kvpress's
    pipeline runs a press while answering only inside a ``PrefillDecodingPress``: wrap a press with scheduling as
    ``PrefillDecodingPress(prefilling_press=press, decoding_press=press)`` (the harness does).

    Parameters
    ----------
    routing : ExpertRoutingPress or dict, optional
        The prefill's token selection and expert assignment; a dict builds one with these fields.
    compression : QuantizationPress or dict, optional
        How shards pack their tokens (bits, group sizes, layout); None keeps them dense.
    scheduling : AdaptiveSchedulingPress or dict, optional
        Decode-time eviction inside the shards.
    sharding : ShardingOptions or dict, optional
        How each layer is sharded (:class:`~pikvpress.cache.ShardingOptions`: ``num_shards``, ``placement``,
        ``top_k_shards``, ``shard_score``, ``tail_length``, ``flush_tokens``, ``devices``); a dict builds one. Its
        ``tail_length`` defaults to ``compression.residual_length`` with compression, else 32.
    process_group : torch.distributed.ProcessGroup or "default", optional
        Spread the shards over this group's ranks instead of ``sharding.devices`` (every rank runs the same calls);
        needs ``torch.distributed`` initialised (``torchrun``).
    timeout : float
        Seconds a rank waits for the others at a collective before raising.
    compression_ratio : float, optional
        The routing press's ``compression_ratio`` (fraction of the context removed): sets it when ``routing`` is
        a dict, must match it when it is a press, and builds ``ExpertRoutingPress(compression_ratio)`` when
        ``routing`` is None. The harness's sweep passes it.

    Examples
    --------
    >>> press = PiKVPress(
    ...     routing=ExpertRoutingPress(compression_ratio=0.5),
    ...     compression=QuantizationPress(bits=4),
    ...     sharding=ShardingOptions(num_shards=4, top_k_shards=2),
    ... )
    >>> with press(model):
    ...     out = model.generate(input_ids, max_new_tokens=32)
    """

    routing: ExpertRoutingPress | dict | None = None
    compression: QuantizationPress | dict | None = None
    scheduling: AdaptiveSchedulingPress | dict | None = None
    sharding: ShardingOptions | dict | None = None
    process_group: Any = None
    timeout: float = 300.0
    compression_ratio: float | None = None
    _group: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        ratio = self.compression_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
            raise ValueError(f"compression_ratio must be None or in [0, 1), got {ratio!r}")
        self.routing = _component(self.routing, ExpertRoutingPress, "routing", compression_ratio=ratio or 0.0)
        self.compression = _component(self.compression, QuantizationPress, "compression")
        self.scheduling = _component(self.scheduling, AdaptiveSchedulingPress, "scheduling")
        if self.routing is None and ratio:  # a ratio alone: the default routing press removes that share
            self.routing = ExpertRoutingPress(compression_ratio=ratio)
        if self.routing is not None:
            if self.routing.head_budget == "adaptive_masked":
                raise ValueError(
                    "PiKVPress stores the tokens its routing press keeps; head_budget='adaptive_masked' keeps every "
                    "token and masks the rest: use head_budget='adaptive'"
                )
            if ratio is not None and ratio != self.routing.compression_ratio:
                raise ValueError(
                    f"compression_ratio={ratio} differs from the routing press's {self.routing.compression_ratio}"
                )
            self.compression_ratio = self.routing.compression_ratio
        if self.scheduling is not None and self.scheduling.prior_from is None and self.routing is not None:
            self.scheduling.prior_from = self.routing
        self.sharding = ShardingOptions.of(self.sharding)
        if self.sharding.tail_length is None:
            tail = self.compression.residual_length if self.compression is not None else 32
            self.sharding = replace(self.sharding, tail_length=tail)
        if self.sharding.devices is not None and self.process_group is not None:
            raise ValueError("give sharding.devices or process_group, not both")
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")

    #: the context manager only adds clean-up around kvpress's hooks, so a captured prefill can be replayed
    replays_with_hooks: ClassVar[bool] = True

    # ----------------------------------------------------------------------------------------------
    @property
    def reads_decoder_inputs(self) -> bool:
        """Whether the routing press reads the decoder layers' inputs (the MoE gate router)."""
        return self.routing is not None and self.routing.reads_decoder_inputs

    @property
    def compresses_while_decoding(self) -> bool:
        """Whether the press evicts while decoding (it has a scheduling press)."""
        return self.scheduling is not None

    @property
    def group(self) -> Any:
        """The :class:`~pikvpress.distributed.ShardGroup` of ``process_group`` (after the press met a model)."""
        return self._group

    def settings(self) -> dict[str, Any]:
        """What every rank of a process group must agree on."""
        packing = None if self.compression is None else {k: str(v) for k, v in self.compression.packing().items()}
        return {
            **{name: value for name, value in asdict(self.sharding).items() if name != "devices"},
            "packing": packing,
            "routing": None if self.routing is None else repr(self.routing),
            "scheduling": None if self.scheduling is None else repr(self.scheduling),
        }

    def post_init_from_model(self, model: nn.Module) -> None:
        for part in (self.routing, self.compression, self.scheduling):
            if part is not None:
                part.post_init_from_model(model)
        if self.sharding.devices is not None:
            check_devices_available(self.sharding.devices)
        if self.process_group is not None:
            if self._group is None:
                from pikvpress.distributed import ShardGroup

                self._group = ShardGroup(self.process_group, timeout=self.timeout)
                self.sharding.check_world(self._group.world_size)
            self._group.check_consistent(self.settings())
        enable_packed_attention(model)

    def finish(self) -> None:
        """End of the press's context: its parts let go of what they held (gate hooks, pending decode steps)."""
        for part in (self.routing, self.scheduling):
            if part is not None:
                part.finish()

    def reset(self) -> None:
        """Forget the scheduling press's per-sequence statistics (kvpress's PrefillDecodingPress calls it)."""
        if self.scheduling is not None:
            self.scheduling.reset()

    # ----------------------------------------------------------------------------------------------
    def sharded_layer(self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> ShardedKVLayer:
        """The sharded layer this press stores for one layer's ``keys`` and ``values`` (not yet distributed)."""
        layer = ShardedKVLayer(
            self.sharding,
            group=self._group,
            packing=None if self.compression is None else self.compression.packing(keys.shape[-1], values.shape[-1]),
            config=module.config,
        )
        layer.lazy_initialization(keys, values)
        layer.tail_keys, layer.tail_values = keys, values
        return layer

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        hidden_states = kwargs["hidden_states"]
        cache = kwargs["past_key_values"]
        idx = int(module.layer_idx)
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            if self.scheduling is not None:
                return self.scheduling.forward_hook(module, input, kwargs, output)
            return output
        check_cache(cache, type(self).__name__, quantized=False)
        if isinstance(cache.layers[idx], ShardedKVLayer) and cache.layers[idx].has_shards:
            raise ValueError(f"layer {idx} is sharded already: PiKVPress prefills an empty cache")
        if self.routing is not None:
            output = self.routing.forward_hook(module, input, kwargs, output)
        if self.scheduling is not None:
            output = self.scheduling.forward_hook(module, input, kwargs, output)
        layer = cache.layers[idx]
        keys, values = layer.keys, layer.values
        routed = None if self.routing is None else self.routing.routed_tokens(cache, idx)
        experts = num_experts = None
        tail, num_shards = self.sharding.tail_length, self.sharding.num_shards
        if routed is not None and routed.experts.shape == keys.shape[:3] and keys.shape[2] > tail:
            experts, num_experts = routed.experts[..., : keys.shape[2] - tail], routed.num_experts
        if hidden_states.shape[1] < num_shards:
            raise ValueError(
                f"cannot split a {hidden_states.shape[1]}-token context into num_shards={num_shards} shards; "
                f"use at most {hidden_states.shape[1]} shards"
            )
        sharded = self.sharded_layer(module, keys, values)
        valid = token_validity(kwargs.get("attention_mask"), keys.shape[2])  # padding: kept out of shard summaries
        if keys.shape[2] - tail >= num_shards:
            sharded.distribute(experts=experts, num_experts=num_experts, valid=valid)
        else:  # the few tokens routing left wait in the tail (padding noted); the layer shards them once it can
            sharded.distribute(0, valid=valid)
        cache.layers[idx] = sharded
        return output
