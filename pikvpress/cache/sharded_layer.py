"""A transformers cache layer whose tokens live in ``S`` shards spread over devices or ranks.

Tokens live in two parts, in sequence order::

    [ shards: tokens 0 .. N-1, each in one of S shards ]  [ tail: tokens N .. N+R-1, full precision ]

The tail holds the most recent tokens on the query's device (on every rank); it is always attended
and is where new tokens land. When it holds ``tail_length + S * flush_tokens`` tokens or more, its
oldest whole blocks of ``S * flush_tokens`` tokens move to the shards, ``flush_tokens`` to each shard
per block and row (:func:`~pikvpress.routing.shard_assignment` chooses which). Every shard holds the
same number of tokens in every (batch row, KV head), so shards stay rectangular; shard lengths differ
by at most one token after a placement, and an eviction (:meth:`ShardedKVLayer.evict`) splits the kept
tokens evenly again.

Each shard (:class:`~pikvpress.cache.shard.KVShard`) sits on one device (``devices``) or belongs to one
rank of a process group (``group``; the other ranks keep only its summary and length). The routing
summary of every shard, the per-channel min / max and the sum of its keys per (batch row, KV head), is
kept on the query's device, so the attention function can rank shards for each query
(:func:`~pikvpress.routing.shard_scores`) and read only the ``top_k_shards`` best.

Padding takes no part in placement or summaries: :meth:`ShardedKVLayer.distribute` is told which tail
tokens are real (``valid``, from the prefill's attention mask: :func:`~pikvpress.routing.token_validity`),
the layer keeps that for every token it holds (``valid``, in sequence order, through flushes, crops and
evictions; tokens appended while decoding are real), a row's real tokens are placed as if its padding
were not there, and each summary covers the real keys only (``key_count`` of them): a shard holding only
padding for a row has ``key_min = +inf``, ``key_max = -inf`` there and is never chosen for that row.

``update`` returns the tail tagged with this layer when pikvpress's attention function is active (it
then reads the shards itself, :mod:`pikvpress.attention`), and the whole layer gathered in sequence
order otherwise. ``keys`` / ``values`` are the tail tensors while nothing is sharded (so kvpress presses
prune the prefill as usual) and :class:`ShardedKVView` objects after.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from pikvpress.cache.layer_base import PiKVCacheLayer
from pikvpress.cache.shard import KVShard
from pikvpress.cache.sharding import ShardingOptions
from pikvpress.cache.view import KVView
from pikvpress.routing.shards import shard_assignment, shard_counts

logger = logging.getLogger(__name__)


class ShardedKVView(KVView):
    """The keys or values of a :class:`ShardedKVLayer` (sliceable along tokens; assign back to crop)."""

    hint = "call .dequantize() on the view for the layer's tokens gathered in sequence order."


class ShardedKVLayer(PiKVCacheLayer):
    """A cache layer holding its tokens in ``num_shards`` shards plus a full-precision tail.

    Parameters
    ----------
    options : ShardingOptions, optional
        How the layer shards its ``S = options.num_shards`` shards (placement, devices, shards read, tail, flushes);
        keyword arguments named like its fields override them (``ShardedKVLayer(num_shards=8)``). Shard ``s`` lives
        on ``devices[s * len(devices) // S]`` (default: the query's device).
    group : object, optional
        A :class:`~pikvpress.distributed.ShardGroup`: shard ``s`` belongs to rank ``s * world_size // S``
        and only that rank holds its tokens.
    packing : dict, optional
        :class:`~pikvpress.cache.PackedKVLayer` arguments for packed shards; None keeps shards dense.
    config : transformers.PretrainedConfig, optional
        The model config (``update`` checks whether pikvpress's attention function is active).
    kmeans_iterations : int
        Rounds of the key clustering behind ``placement="experts"`` without routed experts.
    """

    def __init__(
        self,
        options: ShardingOptions | None = None,
        *,
        group: Any = None,
        packing: dict[str, Any] | None = None,
        config: Any = None,
        kmeans_iterations: int = 4,
        **option_fields: Any,
    ):
        options = ShardingOptions.of(options)
        if option_fields:
            options = replace(options, **option_fields)
        if options.devices is not None and group is not None:
            raise ValueError("give devices or a process group, not both")
        if group is not None:
            options.check_world(group.world_size)
        self.options = options
        self.devices = None if options.devices is None else [torch.device(d) for d in options.devices]
        self.group = group
        self.packing = None if packing is None else {**packing, "residual_length": 0, "config": None}
        self.config = config
        self.kmeans_iterations = kmeans_iterations
        self.is_initialized = False
        self.dtype: torch.dtype = torch.float32
        self.device: torch.device = torch.device("cpu")
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.shards: list[KVShard | None] = []
        self.shard_lengths = [0] * options.num_shards
        self.sharded_length = 0
        # placement blocks, oldest first: (first sequence index, tokens each shard received); a crop removes whole
        # blocks, so every shard loses the same number of tokens in every row
        self.blocks: list[tuple[int, list[int]]] = []
        self.key_min = self.key_max = self.key_sum = None  # (B, H, S, D) float32 on the query's device
        self.key_count: torch.Tensor | None = None  # (B, H, S) int64 real (not padding) tokens behind each summary
        self.valid: torch.Tensor | None = None  # (B, H, N) bool: which tokens (sequence order) are real; None: all
        self.bytes_read = 0.0  # key/value bytes the last attention call read (this rank)
        self._warned_dense = False

    num_shards = property(lambda self: self.options.num_shards)
    placement = property(lambda self: self.options.placement)
    top_k_shards = property(lambda self: self.options.top_k_shards)
    shard_score = property(lambda self: self.options.shard_score)
    tail_length = property(lambda self: self.options.tail_length or 0)
    flush_tokens = property(lambda self: self.options.flush_tokens)

    # ----------------------------------------------------------------------------------------------
    # placement
    # ----------------------------------------------------------------------------------------------
    def owner(self, shard: int) -> int:
        """The rank holding shard ``shard`` (0 without a process group)."""
        return 0 if self.group is None else shard * self.group.world_size // self.num_shards

    def is_local(self, shard: int) -> bool:
        """Whether this process holds shard ``shard``'s tokens."""
        return self.group is None or self.owner(shard) == self.group.rank

    def shard_device(self, shard: int) -> torch.device:
        """The device shard ``shard`` lives on."""
        if self.devices is None:
            return self.device
        return self.devices[shard * len(self.devices) // self.num_shards]

    @property
    def has_shards(self) -> bool:
        """Whether any token has moved to the shards."""
        return bool(self.shards)

    @property
    def local_shards(self) -> list[tuple[int, KVShard]]:
        """``(shard id, shard)`` of the shards this process holds."""
        return [(s, shard) for s, shard in enumerate(self.shards) if shard is not None]

    # ----------------------------------------------------------------------------------------------
    # lengths and bytes
    # ----------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self.tail_keys = key_states.new_empty((b, h, 0, dk))
        self.tail_values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def tail_length_now(self) -> int:
        """Tokens in the tail."""
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    def get_seq_length(self) -> int:
        return self.sharded_length + self.tail_length_now if self.is_initialized else 0

    def _tail_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tail_keys, self.tail_values) if t is not None)

    def _summary_nbytes(self) -> int:
        held = (self.key_min, self.key_max, self.key_sum, self.key_count, self.valid)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for the layer: its shards (keys, values, indices), the tail and the summaries."""
        return sum(shard.nbytes for _, shard in self.local_shards) + self._tail_nbytes() + self._summary_nbytes()

    def read_nbytes(self) -> float:
        """What the last attention call read (the tail and the shards the queries chose), once the layer has shards."""
        return self.bytes_read if self.has_shards else float(self.nbytes)

    def nbytes_per_device(self) -> dict[str, int]:
        """Bytes held on each device by this process (the tail and summaries count on the query's device)."""
        out: dict[str, int] = {str(self.device): self._tail_nbytes() + self._summary_nbytes()}
        for _, shard in self.local_shards:
            out[str(shard.device)] = out.get(str(shard.device), 0) + shard.nbytes
        return out

    # ----------------------------------------------------------------------------------------------
    # keys / values
    # ----------------------------------------------------------------------------------------------
    def _dense_shape(self, which: str) -> tuple[int, int, int, int]:
        tail = self.tail_keys if which == "keys" else self.tail_values
        if tail is None:
            return (0, 0, 0, 0)
        b, h, r, d = tail.shape
        return (b, h, self.sharded_length + r, d)

    def _dense(self, which: str) -> torch.Tensor:
        """Every token in sequence order on the query's device (shards gathered, packed ones dequantized)."""
        tail = self.tail_keys if which == "keys" else self.tail_values
        if not self.has_shards:
            return tail
        if self.group is not None and self.group.world_size > 1:
            raise RuntimeError(
                "this layer's shards live on other ranks of the process group; its keys and values cannot be "
                "gathered on one rank. Read it with pikvpress's attention (pikvpress.enable_packed_attention(model))"
            )
        b, h, _, d = tail.shape
        out = tail.new_empty((b, h, self.sharded_length, d))
        for _, shard in self.local_shards:
            data = shard.dense_part(which).to(self.device, self.dtype)
            out.scatter_(2, shard.index.to(self.device, torch.int64).unsqueeze(-1).expand(-1, -1, -1, d), data)
        return torch.cat([out, tail], dim=2)

    def _view(self, which: str) -> torch.Tensor | ShardedKVView:
        """The tail tensor while nothing is sharded (kvpress presses prune it as usual), else a view."""
        if not self.has_shards:
            return self.tail_keys if which == "keys" else self.tail_values
        return ShardedKVView(self, which, self.get_seq_length())

    def _assign(self, which: str, value: Any) -> None:
        if value is None:
            self.reset()
            return
        if isinstance(value, ShardedKVView) and value.layer is self and value.which == which:
            if which == "keys":  # kvpress crops keys then values: crop once, on the keys
                self.crop(value.length)
            return
        if isinstance(value, torch.Tensor) and not self.has_shards:
            if which == "keys":
                self.tail_keys = value
                if self.valid is not None:  # kvpress crops an unsharded layer from the end
                    self.valid = self.valid[..., : value.shape[2]] if value.shape[2] <= self.valid.shape[-1] else None
            else:
                self.tail_values = value
            return
        raise TypeError(
            f"a ShardedKVLayer's {which} can only be cropped (layer.{which} = layer.{which}[:, :, :n]) once its "
            f"tokens are sharded; got {type(value).__name__}"
        )

    # ----------------------------------------------------------------------------------------------
    # moving tokens to the shards
    # ----------------------------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.tail_keys.shape[:3] != self.tail_values.shape[:3]:
            raise RuntimeError(
                f"ShardedKVLayer keys and values disagree: {tuple(self.tail_keys.shape)} vs "
                f"{tuple(self.tail_values.shape)}; crop or prune both"
            )

    def distribute(
        self,
        count: int | None = None,
        experts: torch.Tensor | None = None,
        num_experts: int | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Move the oldest ``count`` tail tokens (default: all but the last ``tail_length``) to the shards.

        ``experts`` ``(B, H, count)`` (expert of each token, -1 for none, out of ``num_experts``) steers
        ``placement="experts"``; without it the keys' clusters (or, once shards exist, the shards' mean keys) do.
        ``valid`` ``(B, R)`` or ``(B, H, R)`` bool says which of the tail's ``R`` tokens are real (False: padding,
        :func:`~pikvpress.routing.token_validity`); the layer keeps it for those tokens (``count=0`` only records
        it). Padding is placed after the row's real tokens have been (:func:`~pikvpress.routing.shard_assignment`)
        and stays out of the shard summaries.

        Raises
        ------
        ValueError
            When the first distribution has fewer tokens than shards.
        """
        self._check_ready()
        if valid is not None:
            self._note_valid(valid)
        if count is None:
            count = max(0, self.tail_length_now - self.tail_length)
        if count <= 0:
            return
        if not self.has_shards and count < self.num_shards:
            raise ValueError(
                f"cannot split {count} tokens into num_shards={self.num_shards} shards; use at most {count} shards "
                f"or a longer context (tail_length={self.tail_length} tokens stay unsharded)"
            )
        keys, values = self.tail_keys[:, :, :count], self.tail_values[:, :, :count]
        centroids = None
        if self.has_shards and experts is None and self.placement == "experts":
            centroids = torch.nn.functional.normalize(self.key_sum, dim=-1)
        real = None  # (B, H, count) which of the moved tokens are real; None: all of them
        if self.valid is not None:
            real = self.valid[..., self.sharded_length : self.sharded_length + count]
            real = None if bool(real.all()) else real
        assignment = shard_assignment(
            keys,
            self.num_shards,
            self.placement,
            experts=experts,
            num_experts=num_experts,
            centroids=centroids,
            kmeans_iterations=self.kmeans_iterations,
            valid=real,
        )
        counts = shard_counts(count, self.num_shards)
        # tokens grouped by shard, in sequence order inside a shard (every row has counts[s] tokens in shard s)
        order = torch.argsort(assignment, dim=-1, stable=True)
        b, h, _, dk = keys.shape
        dv = values.shape[-1]
        if not self.has_shards:
            self.shards = [
                KVShard(self.shard_device(s), self.packing) if self.is_local(s) else None
                for s in range(self.num_shards)
            ]
            self.key_min = torch.zeros(b, h, self.num_shards, dk, dtype=torch.float32, device=self.device)
            self.key_max = torch.zeros_like(self.key_min)
            self.key_sum = torch.zeros_like(self.key_min)
            self.key_count = torch.zeros(b, h, self.num_shards, dtype=torch.int64, device=self.device)
        self.blocks.append((self.sharded_length, counts))
        start = 0
        for s, n in enumerate(counts):
            if n == 0:
                continue
            pos = order[..., start : start + n]
            start += n
            k = keys.gather(2, pos.unsqueeze(-1).expand(b, h, n, dk))
            low, high, total, number = _key_summary(k, None if real is None else real.gather(2, pos))
            fresh = self.shard_lengths[s] == 0
            self.key_min[:, :, s] = low if fresh else torch.minimum(self.key_min[:, :, s], low)
            self.key_max[:, :, s] = high if fresh else torch.maximum(self.key_max[:, :, s], high)
            self.key_sum[:, :, s] += total
            self.key_count[:, :, s] += number
            self.shard_lengths[s] += n
            shard = self.shards[s]
            if shard is not None:
                v = values.gather(2, pos.unsqueeze(-1).expand(b, h, n, dv))
                shard.append(k, v, pos + self.sharded_length)
        self.sharded_length += count
        self.tail_keys = self.tail_keys[:, :, count:].clone()
        self.tail_values = self.tail_values[:, :, count:].clone()

    def _note_valid(self, valid: torch.Tensor) -> None:
        """Record which of the tail's tokens are real (``valid`` ``(B, R)`` or ``(B, H, R)`` bool)."""
        b, h, r = self.tail_keys.shape[:3]
        valid = valid.to(self.device, torch.bool)
        valid = valid.unsqueeze(1) if valid.ndim == 2 else valid
        if valid.ndim != 3 or valid.shape[-1] != r:
            raise ValueError(
                f"valid must be (batch, {r}) or (batch, heads, {r}) for the {r} tail tokens, got {tuple(valid.shape)}"
            )
        valid = valid.expand(b, h, r)
        if self.valid is None and bool(valid.all()):
            return
        known = (
            self.valid[..., : self.sharded_length]
            if self.valid is not None
            else valid.new_ones(b, h, self.sharded_length)
        )
        self.valid = torch.cat([known, valid], dim=-1)

    def _flush(self) -> None:
        """Move whole blocks of ``S * flush_tokens`` tokens from the tail while it is over ``tail_length``."""
        block = self.num_shards * self.flush_tokens
        over = self.tail_length_now - self.tail_length
        if over >= block:
            self.distribute(over // block * block)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens to the tail (first moving its overflow, or the prefill, to the shards); return the tail
        tagged with this layer (pikvpress attention) or every token in sequence order (any other attention)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.has_shards:
            self._flush()
        elif self.tail_length_now - self.tail_length >= self.num_shards:
            self.distribute()  # the first step after the prefill: shard it
        self.tail_keys = torch.cat([self.tail_keys, key_states.to(self.dtype)], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states.to(self.dtype)], dim=2)
        if self.valid is not None:  # new tokens are real
            self.valid = torch.cat([self.valid, self.valid.new_ones(*self.valid.shape[:2], key_states.shape[2])], -1)
        if not self.has_shards:
            return self.tail_keys, self.tail_values
        if self.attention_active():
            return self.tagged(self.tail_keys, self.tail_values)
        if not self._warned_dense:
            logger.warning(
                "a sharded KV layer is read by attention implementation %r, which needs dense tensors: gathering "
                "every shard each step. Use pikvpress.enable_packed_attention(model).",
                getattr(self.config, "_attn_implementation", None),
            )
            self._warned_dense = True
        return self.dequantized()

    # ----------------------------------------------------------------------------------------------
    # eviction, cropping, batch ops
    # ----------------------------------------------------------------------------------------------
    def _quotas(self, budget: int) -> list[int]:
        """Tokens each shard keeps out of ``budget``: as even as the shard lengths allow (water-filling)."""
        quotas = [0] * self.num_shards
        remaining = min(budget, self.sharded_length)
        open_shards = sorted(range(self.num_shards), key=lambda s: self.shard_lengths[s])
        while remaining > 0 and open_shards:
            share, extra = divmod(remaining, len(open_shards))
            s = open_shards[0]
            room = self.shard_lengths[s] - quotas[s]
            if room <= share:  # the shortest shard keeps everything it has
                quotas[s] += room
                remaining -= room
                open_shards.pop(0)
                continue
            for i, t in enumerate(open_shards):
                quotas[t] += share + (i >= len(open_shards) - extra)
            remaining = 0
        return quotas

    def evict(self, order: torch.Tensor, budget: int) -> torch.Tensor:
        """Keep ``budget`` tokens per row; return their sequence indices ``(B, H, K)``, increasing.

        ``order`` ``(B, H, N)`` lists the layer's sequence indices by priority (best first). The tail keeps every
        token (it is the recent window, at most ``tail_length + S * flush_tokens``); each shard keeps its best
        tokens by ``order``, the shards' share of the budget split as evenly as their lengths allow. Indices and
        summaries are renumbered to the kept sequence. Over a process group every rank evicts inside the shards it
        holds (``order`` need only rank those tokens right: the quotas come from the shard lengths, which all ranks
        share) and the ranks exchange the kept indices and the new summaries in one collective.
        """
        if not self.has_shards:
            kept = order[..., :budget].sort(dim=-1).values
            self.tail_keys = self.tail_keys.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, self.tail_keys.shape[-1]))
            self.tail_values = self.tail_values.gather(
                2, kept.unsqueeze(-1).expand(-1, -1, -1, self.tail_values.shape[-1])
            )
            if self.valid is not None:
                self.valid = self.valid.gather(-1, kept.to(self.device))
            return kept
        n = self.get_seq_length()
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
        quotas = self._quotas(max(0, budget - self.tail_length_now))
        kept_parts = []
        for s, shard in self.local_shards:
            index = shard.index.to(order.device, torch.int64)
            positions = rank.gather(-1, index).topk(quotas[s], dim=-1, largest=False).indices.sort(dim=-1).values
            shard.keep(positions)
            kept_parts.append(index.gather(-1, positions))
        self.shard_lengths = quotas
        self._refresh_summaries()
        if self.group is not None and self.group.world_size > 1:  # every rank's kept tokens, to renumber
            b, h = order.shape[:2]
            layout = lambda s: [((b, h, quotas[s]), torch.int64)]
            kept_parts = [i for (i,) in self._gather_shards([(i,) for i in kept_parts], layout, "the kept tokens")]
        tail = torch.arange(self.sharded_length, n, device=order.device).expand(*order.shape[:2], -1)
        kept = torch.cat([*(i.to(order.device) for i in kept_parts), tail], dim=-1).sort(dim=-1).values
        # renumber: a token's new index is its rank among the kept ones
        for _, shard in self.local_shards:
            new = torch.searchsorted(kept, shard.index.to(kept.device, torch.int64))
            shard.index = new.to(shard.device, torch.int32)
        self.sharded_length = sum(quotas)
        self.blocks = [(0, quotas)]
        if self.valid is not None:
            self.valid = self.valid.gather(-1, kept.to(self.device))
        return kept

    def _refresh_summaries(self) -> None:
        """Recompute every local shard's key min / max / sum / count from its real tokens (``valid`` at their
        sequence indices, before any renumbering)."""
        for s, shard in self.local_shards:
            keys = shard.dense_part("keys").to(self.device)
            if keys.shape[2] == 0:
                self.key_count[:, :, s] = 0
                continue
            real = None if self.valid is None else self.valid.gather(-1, shard.index.to(self.device, torch.int64))
            self.key_min[:, :, s], self.key_max[:, :, s], self.key_sum[:, :, s], self.key_count[:, :, s] = _key_summary(
                keys, real
            )

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop ``-max_length`` from the end).

        Below the sharded length, the placement blocks from the last one starting at or before ``max_length``
        on leave the shards, so shards stay rectangular, and their tokens up to ``max_length`` become the tail.
        Over a process group the ranks exchange those tokens and the shards' new summaries (one collective).
        """
        n = self.get_seq_length()
        if max_length < 0:
            max_length = n - abs(max_length)
        max_length = max(0, max_length)
        if n <= max_length:
            return
        if self.valid is not None:  # a prefix of the sequence stays, and the shards' indices below it
            self.valid = self.valid[..., :max_length]
        if max_length >= self.sharded_length:
            keep = max_length - self.sharded_length
            self.tail_keys = self.tail_keys[:, :, :keep].clone()
            self.tail_values = self.tail_values[:, :, :keep].clone()
            return
        cut = max(start for start, _ in self.blocks if start <= max_length)
        removed = [sum(counts[s] for start, counts in self.blocks if start >= cut) for s in range(self.num_shards)]
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s, shard in self.local_shards:
            k, v, i = shard.split(self.shard_lengths[s] - removed[s])
            parts.append((k.to(self.device, self.dtype), v.to(self.device, self.dtype), i.to(self.device, torch.int64)))
        self.shard_lengths = [length - r for length, r in zip(self.shard_lengths, removed)]
        self.blocks = [(start, counts) for start, counts in self.blocks if start < cut]
        self._refresh_summaries()
        if self.group is not None and self.group.world_size > 1:
            b, h, _, dk = self.tail_keys.shape
            dv = self.tail_values.shape[-1]
            layout = lambda s: [
                ((b, h, removed[s], dk), self.dtype),
                ((b, h, removed[s], dv), self.dtype),
                ((b, h, removed[s]), torch.int64),
            ]
            parts = self._gather_shards(parts, layout, "the tokens a crop takes back from the shards")
        index = torch.cat([i for _, _, i in parts], dim=-1)
        order = index.argsort(dim=-1)[..., : max_length - cut]
        gather = lambda t: t.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
        self.tail_keys = gather(torch.cat([k for k, _, _ in parts], dim=2))
        self.tail_values = gather(torch.cat([v for _, v, _ in parts], dim=2))
        self.sharded_length = cut
        if cut == 0:
            self.shards, self.key_min, self.key_max, self.key_sum, self.key_count = [], None, None, None, None
            self.shard_lengths = [0] * self.num_shards
            self.blocks = []

    def _gather_shards(
        self,
        local: list[tuple[torch.Tensor, ...]],
        layout: Callable[[int], list[tuple[tuple[int, ...], torch.dtype]]],
        what: str,
    ) -> list[tuple[torch.Tensor, ...]]:
        """Every shard's tensors, in shard order, on the query's device, from this rank's ``local`` ones (a tuple per
        shard it holds, in shard order); each shard's summaries travel along and replace the copies held here.

        ``layout(s)`` gives the shapes and dtypes of shard ``s``'s tensors, which every rank knows (they follow from
        the shard lengths), so one all-gather of a float32 buffer per rank carries everything: floating tensors
        widened to float32 (exact), integer ones as their int32 bits."""
        b, h, _, d = self.key_min.shape
        summary = [((b, h, d), torch.float32)] * 3 + [((b, h), torch.int64)]
        owned = [[s for s in range(self.num_shards) if self.owner(s) == r] for r in range(self.group.world_size)]
        size = lambda s: sum(math.prod(shape) for shape, _ in layout(s) + summary)
        flat = [
            _to_float32_bits(t.to(self.device))
            for s, tensors in zip(owned[self.group.rank], local)
            for t in (*tensors, *self._summary_of(s))
        ]
        buffer = torch.zeros(max(sum(size(s) for s in shards) for shards in owned), device=self.device)
        if flat:
            flat = torch.cat(flat)
            buffer[: flat.numel()] = flat
        gathered = self.group.all_gather(buffer, what)
        everything = []
        for rank, shards in enumerate(owned):
            at = 0
            for s in shards:
                tensors = []
                for shape, dtype in layout(s) + summary:
                    n = math.prod(shape)
                    tensors.append(_from_float32_bits(gathered[rank, at : at + n], dtype).view(shape))
                    at += n
                *parts, self.key_min[:, :, s], self.key_max[:, :, s], self.key_sum[:, :, s], self.key_count[:, :, s] = (
                    tensors
                )
                everything.append(tuple(parts))
        return everything

    def _summary_of(self, shard: int) -> tuple[torch.Tensor, ...]:
        """Shard ``shard``'s key min, max, sum and real-token count, ``(B, H, D)`` x 3 and ``(B, H)``."""
        return tuple(t[:, :, shard] for t in (self.key_min, self.key_max, self.key_sum, self.key_count))

    def _map_batch(self, fn) -> None:
        for _, shard in self.local_shards:
            shard.map_batch(fn)
        if self.tail_keys is not None:
            self.tail_keys, self.tail_values = fn(self.tail_keys), fn(self.tail_values)
        if self.key_min is not None:
            self.key_min, self.key_max, self.key_sum = fn(self.key_min), fn(self.key_max), fn(self.key_sum)
            self.key_count = fn(self.key_count)
        if self.valid is not None:
            self.valid = fn(self.valid)

    def offload(self) -> None:
        """Shards stay where they are placed."""

    def prefetch(self) -> None:
        """Shards stay where they are placed."""

    def reset(self) -> None:
        """Drop every token (the layer stays initialised, with its dtype and device)."""
        self.shards, self.shard_lengths, self.sharded_length = [], [0] * self.num_shards, 0
        self.blocks = []
        self.key_min = self.key_max = self.key_sum = self.key_count = None
        self.valid = None
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys[:, :, :0].clone()
            self.tail_values = self.tail_values[:, :, :0].clone()

    def __repr__(self) -> str:
        return (
            f"ShardedKVLayer(num_shards={self.num_shards}, placement={self.placement!r}, "
            f"shard_lengths={self.shard_lengths}, tail={self.tail_length_now}, nbytes={self.nbytes})"
        )


def _key_summary(
    keys: torch.Tensor, real: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 per-channel min, max and sum ``(B, H, D)`` and the count ``(B, H)`` of the real keys among ``keys``
    ``(B, H, n, D)`` (``real`` ``(B, H, n)`` bool; None: all). A row without a real key has min ``+inf``, max ``-inf``,
    sum 0 and count 0."""
    kf = keys.float()
    if real is None:
        return kf.amin(2), kf.amax(2), kf.sum(2), torch.full(kf.shape[:2], kf.shape[2], device=kf.device)
    pad = ~real.unsqueeze(-1)
    return (
        kf.masked_fill(pad, float("inf")).amin(2),
        kf.masked_fill(pad, float("-inf")).amax(2),
        kf.masked_fill(pad, 0.0).sum(2),
        real.sum(-1),
    )


def _to_float32_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` flattened to float32: floating values widened (exactly), integers (< 2**31) as their int32 bits."""
    if tensor.is_floating_point():
        return tensor.float().reshape(-1)
    return tensor.to(torch.int32).contiguous().view(torch.float32).reshape(-1)


def _from_float32_bits(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`_to_float32_bits` for a tensor of ``dtype``."""
    if dtype.is_floating_point:
        return flat.to(dtype)
    return flat.contiguous().view(torch.int32).to(dtype)
