"""Batched answering: ``B`` samples answered at once over their compressed caches, each exactly as it would be alone.

After a shared prefill, each sample's cache is compressed on its own (:func:`~.prefill.replay_press`); this module
combines the ``B`` caches into one batched cache (:func:`combine_caches`) and answers the ``B`` questions with one
greedy loop (:func:`answer_batch`), the equivalent of kvpress's ``pipeline.generate_answer`` run on each sample:

- question tokens of different lengths are left-padded; each row's position ids continue from that row's own context
  length (the original token positions, as kvpress does, not the compressed cache's length);
- each row stops at the model's end-of-sequence tokens exactly as ``generate_answer`` does (the first token is never
  checked; a later stop token ends the answer and is part of it) or after its own ``max_new_tokens``; the rows that
  have stopped leave the batch (:meth:`BatchedCache.select`), so a long answer costs one row's steps, not ``B``.

Two ways to combine the caches (:class:`BatchedCache`), both without any attention mask from the model:

``"padded"``
    Every layer of every row is a plain ``DynamicLayer`` (no press, token-removing presses such as SnapKV, Knorm or
    PyramidKV, head-wise presses such as AdaKV that keep the whole cache): each layer becomes a
    :class:`~pikvpress.cache.PaddedKVLayer`, its rows left-padded with zeros to that layer's longest row, holding which
    positions are real (the question's left padding is marked too, as it goes in); pikvpress's attention masks every
    padded position of the layer (:func:`pikvpress.attention.padded_layer_attention`). kvpress's head-wise masked keys
    (``module.masked_key_indices``) of every row are shifted by the row's left padding in that layer, given the row's
    batch index and put on the attention modules while answering.
``"rows"``
    Otherwise (pikvpress's packed and sharded layers): each layer becomes a :class:`~pikvpress.cache.RowBatchedLayer`
    holding the rows' own layers, which receive only their row's real tokens (see :mod:`pikvpress.cache.batched` for
    why a rectangular padded combine cannot keep those answers exact). A decode step reads them as one transient,
    zero-padded and masked stack (:mod:`pikvpress.rows_attention`); the question's forward, and a step with masked
    keys or attention sinks, reads them row by row.

:func:`batching_blocker` names what neither can batch (a model with sliding-window layers, transformers' quantized
layers, an attention function that does not read pikvpress's layers); the harness answers those runs one sample at a
time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pikvpress.attention import reads_row_batches
from pikvpress.cache import PaddedKVLayer, batch_rows, layer_nbytes, row_batch_blocker
from pikvpress.models import language_model, layer_adapter


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules, in layer order."""
    return [layer.self_attn for layer in language_model(model).layers]


def masked_key_indices(model: nn.Module) -> list[Any]:
    """What kvpress's head-wise presses (AdaKV, CriticalAdaKV) left on each attention module after a prefill:
    ``module.masked_key_indices`` (``(batch, head, seq)`` index tensors, or None)."""
    return [getattr(module, "masked_key_indices", None) for module in attention_modules(model)]


def prefill_bf16_bytes(keys_and_values: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes a bfloat16 cache holding these uncompressed keys and values would take: 2 bytes per element."""
    return int(sum(2 * (k.numel() + v.numel()) for k, v in keys_and_values))


@dataclass
class RowCache:
    """One sample's compressed cache, ready to join a batch.

    Attributes
    ----------
    cache : transformers.DynamicCache
        The sample's cache after its press (batch size 1). A ``"rows"`` combine uses its layers in place.
    context_length : int
        The sample's context tokens before compression: its question's positions start there.
    masked_key_indices : list, optional
        Per attention layer, the head-wise masked keys its press left (:func:`masked_key_indices`), or None.
    """

    cache: Any
    context_length: int
    masked_key_indices: list[Any] | None = None

    def masked(self, layer: int) -> Any:
        return None if self.masked_key_indices is None else self.masked_key_indices[layer]


@dataclass
class BatchedCache:
    """``B`` samples' caches combined into one (:func:`combine_caches`).

    Attributes
    ----------
    cache : transformers.DynamicCache
        The batched cache the model reads: :class:`~pikvpress.cache.PaddedKVLayer` s (``"padded"``) or
        :class:`~pikvpress.cache.RowBatchedLayer` s (``"rows"``).
    mode : {"padded", "rows"}
        How the rows were combined (see the module docstring).
    masked_key_indices : list
        ``"padded"``: per attention module, every row's head-wise masked keys in batch coordinates (or None).
    row_bytes : list of int
        ``"padded"``: the bytes each row's own cache held before answering.
    token_bytes : int
        ``"padded"``: the key and value bytes one more token adds to a row's own cache (every layer).
    """

    cache: Any
    mode: str
    masked_key_indices: list[Any] = field(default_factory=list)
    row_bytes: list[int] = field(default_factory=list)
    token_bytes: int = 0

    @property
    def batch_size(self) -> int:
        layer = self.cache.layers[0]
        return layer.valid.shape[0] if self.mode == "padded" else layer.batch_size

    def feed(self, real: torch.Tensor) -> None:
        """Before a forward of ``q`` new tokens per row: ``real`` ``(B, q)`` bool says which are real (False: the
        question's left padding, the tokens fed to rows that have stopped); every layer is told."""
        for layer in self.cache.layers:
            layer.incoming = real

    @contextlib.contextmanager
    def answering(self, model: nn.Module) -> Iterator[None]:
        """Put every row's head-wise masked keys on the attention modules (``"padded"``; ``"rows"`` layers put each
        row's on for that row's attention call) and clear them afterwards."""
        modules = attention_modules(model)
        self.put_masks(modules)
        try:
            yield
        finally:
            for module in modules:
                module.masked_key_indices = None

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the batch positions ``keep`` (in order), every layer alike: the answer loop drops the rows whose
        answers have ended, so that later steps compute only the rows still answering. ``"padded"`` layers also drop
        the leading positions that only the dropped rows needed (the head-wise masked keys move with them); a row's
        kept real positions are unchanged, so its answer is too."""
        keep = list(keep)
        if self.mode == "rows":
            for layer in self.cache.layers:
                layer.select_rows(keep)
            return
        trims = [layer.select_rows(keep) for layer in self.cache.layers]
        new_of = {old: new for new, old in enumerate(keep)}
        masked = []
        for m, trim in zip(self.masked_key_indices, trims):
            if m is None:
                masked.append(None)
                continue
            batch_idx, head_idx, seq_idx = m
            lookup = torch.full((max(int(batch_idx.max().item()) + 1, len(self.row_bytes)),), -1, dtype=torch.long)
            for old, new in new_of.items():
                lookup[old] = new
            mapped = lookup.to(batch_idx.device)[batch_idx]
            sel = mapped >= 0
            masked.append((mapped[sel], head_idx[sel], seq_idx[sel] - trim) if bool(sel.any()) else None)
        self.masked_key_indices = masked
        self.row_bytes = [self.row_bytes[i] for i in keep]

    def put_masks(self, modules: Sequence[nn.Module]) -> None:
        """Put every row's head-wise masked keys, in batch coordinates, on the attention modules (``"padded"``;
        ``"rows"`` layers put each row's on for that row's attention call)."""
        for idx, module in enumerate(modules):
            module.masked_key_indices = self.masked_key_indices[idx] if self.mode == "padded" else None

    def read_bytes(self, row: int, fed: int) -> float:
        """The key/value bytes row ``row``'s own cache reports read (:func:`pikvpress.cache.cache_bytes_read`) after a
        forward, when ``fed`` of its real tokens (question and answer) have gone through the model so far.

        ``"rows"``: what each row's own layer recorded (they are the row's layers, updated with its tokens only).
        ``"padded"``: a dense layer's attention reads every byte it holds, so the row's own cache would report its
        bytes before answering plus ``fed`` tokens' keys and values in every layer; computed from those, exactly
        the number the row alone reports, without padding.
        """
        if self.mode == "rows":
            return float(sum(layer.row_read_nbytes(row) for layer in self.cache.layers))
        return float(self.row_bytes[row] + fed * self.token_bytes)


def sliding_layers(model: nn.Module) -> list[int]:
    """The attention layers that attend over a sliding window (pikvpress's adapter says, else the module's or the
    config's ``sliding_window``)."""
    out = []
    for idx, module in enumerate(attention_modules(model)):
        adapter = layer_adapter(module)
        if adapter is not None:
            slides = adapter.is_sliding
        elif hasattr(module, "sliding_window"):
            slides = module.sliding_window is not None
        else:
            slides = getattr(module.config, "sliding_window", None) is not None
        if slides:
            out.append(idx)
    return out


def batching_blocker(model: nn.Module, rows: Sequence[RowCache]) -> str | None:
    """Why these rows' caches cannot be answered as one batch, or None if they can.

    A model with sliding-window layers is refused: transformers builds their window over the cache's positions, which
    padding shifts (and the rows' own layers are read with a plain causal mask).
    """
    if not rows:
        return "no rows"
    sliding = sliding_layers(model)
    if sliding:
        return f"the model has sliding-window layers {sliding}"
    counts = {len(row.cache.layers) for row in rows}
    if len(counts) != 1:
        return f"the rows' caches have different numbers of layers ({sorted(counts)})"
    for row in rows:
        for layer in row.cache.layers:
            reason = row_batch_blocker(layer)
            if reason is not None:
                return f"the cache holds {reason}"
    for module in attention_modules(model):
        if not reads_row_batches(module):
            return (
                f"the attention function {getattr(module.config, '_attn_implementation', None)!r} of "
                f"{type(module).__name__} does not read pikvpress's layers"
            )
    return None


def _padded_mode(rows: Sequence[RowCache]) -> bool:
    """Whether every layer is a plain DynamicLayer holding one sequence, alike in every row."""
    first = rows[0].cache.layers
    for row in rows:
        for layer, ref in zip(row.cache.layers, first):
            if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.shape[0] != 1:
                return False
            if layer.keys.shape[1::2] != ref.keys.shape[1::2] or layer.values.shape[1::2] != ref.values.shape[1::2]:
                return False
            if layer.keys.dtype != ref.keys.dtype or layer.keys.device != ref.keys.device:
                return False
    return True


def combine_mode(rows: Sequence[RowCache]) -> str:
    """How :func:`combine_caches` would combine ``rows``: ``"padded"`` or ``"rows"`` (see the module docstring)."""
    return "padded" if _padded_mode(rows) else "rows"


def combine_caches(model: nn.Module, rows: Sequence[RowCache], reserve: int = 0) -> BatchedCache:
    """One batched cache of ``rows`` (see the module docstring for the two ways); ``reserve``: tokens to come, for
    which padded layers preallocate room (:meth:`~pikvpress.cache.PaddedKVLayer.reserve`).

    Raises
    ------
    ValueError
        When :func:`batching_blocker` names a reason.
    """
    reason = batching_blocker(model, rows)
    if reason is not None:
        raise ValueError(f"cannot batch these caches: {reason}")
    n_layers = len(rows[0].cache.layers)
    cache = DynamicCache()
    if not _padded_mode(rows):
        cache.layers = [
            batch_rows([row.cache.layers[idx] for row in rows], [row.masked(idx) for row in rows])
            for idx in range(n_layers)
        ]
        return BatchedCache(cache, "rows")
    cache.layers = [PaddedKVLayer.from_rows([row.cache.layers[idx] for row in rows]) for idx in range(n_layers)]
    for layer in cache.layers:
        layer.reserve(reserve)
    masked = []
    for idx in range(len(attention_modules(model))):
        parts = [(i, row.masked(idx)) for i, row in enumerate(rows) if row.masked(idx) is not None]
        if not parts:
            masked.append(None)
            continue
        padding = cache.layers[idx].padding()
        batch_idx = torch.cat([torch.full_like(m[0], i) for i, m in parts])
        head_idx = torch.cat([m[1] for _, m in parts])
        seq_idx = torch.cat([m[2] + padding[i] for i, m in parts])
        masked.append((batch_idx, head_idx, seq_idx))
    token_bytes = sum(
        layer.keys.shape[1] * (layer.keys.shape[3] * layer.keys.element_size())
        + layer.values.shape[1] * (layer.values.shape[3] * layer.values.element_size())
        for layer in cache.layers
    )
    row_bytes = [int(sum(layer_nbytes(layer) for layer in row.cache.layers)) for row in rows]
    return BatchedCache(cache, "padded", masked, row_bytes, token_bytes)


def merge_batches(batches: Sequence[BatchedCache], reserve: int = 0) -> BatchedCache:
    """One batched cache holding the rows of ``batches`` (all combined the same way), in order; ``reserve``: tokens to
    come (padded layers preallocate room). Padded layers are re-padded to each layer's longest row (a row's real keys,
    its validity and its masked keys move with it, shifted by its new padding); row-batched layers keep their rows'
    own layers. The batches are used up.

    Raises
    ------
    ValueError
        When the batches were combined in different ways or hold different numbers of layers.
    """
    if not batches:
        raise ValueError("nothing to merge")
    modes = {b.mode for b in batches}
    if len(modes) != 1 or len({len(b.cache.layers) for b in batches}) != 1:
        raise ValueError(f"cannot merge batches combined as {sorted(modes)} with different layers")
    n_layers = len(batches[0].cache.layers)
    cache = DynamicCache()
    if batches[0].mode == "rows":
        cache.layers = [
            batch_rows(
                [row for b in batches for row in b.cache.layers[idx].rows],
                [m for b in batches for m in b.cache.layers[idx].masked_key_indices],
            )
            for idx in range(n_layers)
        ]
        return BatchedCache(cache, "rows")
    layers, masked = [], []
    for idx in range(n_layers):
        parts = [b.cache.layers[idx] for b in batches]
        layer = PaddedKVLayer.concat(parts, reserve=reserve)
        layers.append(layer)
        if idx >= len(batches[0].masked_key_indices):
            continue
        pieces, offset = [], 0
        for b, part in zip(batches, parts):
            m = b.masked_key_indices[idx]
            if m is not None:
                shift = layer.keys.shape[2] - part.keys.shape[2]
                pieces.append((m[0] + offset, m[1], m[2] + shift))
            offset += part.valid.shape[0]
        masked.append(tuple(torch.cat(t) for t in zip(*pieces)) if pieces else None)
    cache.layers = layers
    row_bytes = [n for b in batches for n in b.row_bytes]
    return BatchedCache(cache, "padded", masked, row_bytes, batches[0].token_bytes)


@dataclass
class BatchedAnswer:
    """One row's answer.

    Attributes
    ----------
    text : str
        The answer, decoded as kvpress decodes it (special tokens skipped).
    token_ids : list of int
        Every generated token, the stop token included when the row stopped on one.
    kv_bytes_read : float
        The key/value bytes the row's last forward read from its own cache (:meth:`BatchedCache.read_bytes`).
    logits : list of torch.Tensor
        With ``keep_logits``: the row's next-token logits at each of its steps.
    seconds : float
        The row's share of the forwards it took part in (each forward's time split over the batch's rows).
    """

    text: str
    token_ids: list[int]
    kv_bytes_read: float
    logits: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


def eos_token_ids(model: nn.Module) -> list[int]:
    """The tokens that end an answer (``model.generation_config.eos_token_id``, as kvpress reads it)."""
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def answer_room(question_ids: Sequence[torch.Tensor], max_new_tokens: Sequence[int]) -> int:
    """The tokens a batch's cache receives while answering: the left-padded questions' width, then one token per step
    of the longest budget (the last answer token is never fed back)."""
    return max(int(q.shape[1]) for q in question_ids) + max(max(int(m) for m in max_new_tokens) - 1, 0)


@torch.no_grad()
def answer_batch(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[RowCache],
    question_ids: Sequence[torch.Tensor],
    max_new_tokens: Sequence[int],
    *,
    keep_logits: bool = False,
    drop_finished: bool = True,
) -> list[BatchedAnswer]:
    """Answer every row's question over its compressed cache, greedily, all rows at once.

    Equivalent, row by row, to kvpress's ``pipeline.generate_answer(question_ids[i], rows[i].cache,
    rows[i].context_length, max_new_tokens[i])`` (see the module docstring).

    Parameters
    ----------
    model, tokenizer
        The model and its tokenizer (whose ``pad_token_id``, else the first stop token, pads).
    rows : sequence of RowCache
        Each sample's compressed cache (``"rows"`` batches use their layers in place) and context length.
    question_ids : sequence of torch.Tensor
        Each sample's ``(1, q_i)`` question tokens.
    max_new_tokens : sequence of int
        Each sample's answer budget.
    keep_logits : bool
        Keep each row's logits at every step (:attr:`BatchedAnswer.logits`).
    drop_finished : bool
        Drop the rows whose answers have ended from the batch (:meth:`BatchedCache.select`), so that later steps
        compute only the rows still answering; False feeds them a pad token until the last row ends.

    Returns
    -------
    list of BatchedAnswer
        In the rows' order.
    """
    if not len(rows) == len(question_ids) == len(max_new_tokens):
        raise ValueError(f"{len(rows)} rows, {len(question_ids)} questions and {len(max_new_tokens)} budgets")
    batch = combine_caches(model, rows, reserve=answer_room(question_ids, max_new_tokens))
    context_lengths = [row.context_length for row in rows]
    return answer_combined(
        model,
        tokenizer,
        batch,
        context_lengths,
        question_ids,
        max_new_tokens,
        keep_logits=keep_logits,
        drop_finished=drop_finished,
    )


@torch.no_grad()
def answer_combined(
    model: nn.Module,
    tokenizer: Any,
    batch: BatchedCache,
    context_lengths: Sequence[int],
    question_ids: Sequence[torch.Tensor],
    max_new_tokens: Sequence[int],
    *,
    keep_logits: bool = False,
    drop_finished: bool = True,
) -> list[BatchedAnswer]:
    """:func:`answer_batch` over caches already combined (:func:`combine_caches`); ``context_lengths``: each row's
    context tokens before compression. The batched cache grows as the answers go through it."""
    answering = Answering.start(
        model,
        tokenizer,
        batch,
        context_lengths,
        question_ids,
        max_new_tokens,
        keep_logits=keep_logits,
        drop_finished=drop_finished,
    )
    answering.run()
    return [answer for _, answer in sorted(answering.pop_finished(), key=lambda item: item[0])]


@dataclass
class _Row:
    """One row's answer so far (:class:`Answering`)."""

    key: Any
    remaining: int  # steps it may still take (generate_answer's loop: range(max_new_tokens - 1))
    next_position: int
    fed: int  # its real tokens through the model (question, then its answer but the last token)
    generated: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    read: float = 0.0
    stopped: bool = False
    seconds: float = 0.0  # its share of the forwards it took part in

    @property
    def ended(self) -> bool:
        return self.stopped or self.remaining <= 0


class Answering:
    """Rows answered together, greedily, over one batched cache; the answers that run long can be set aside and go on
    later together with other batches' (:meth:`merge`), so that they share their steps.

    Parameters
    ----------
    model, tokenizer
        The model and its tokenizer.
    batch : BatchedCache
        The rows' combined cache.
    rows : list
        The rows in batch order (:class:`_Row`).
    keep_logits, drop_finished : bool
        As :func:`answer_batch`.

    Notes
    -----
    :meth:`start` runs the question forward; :meth:`run` decodes until every row has ended, or (``park_at``) until no
    more than ``park_at`` rows still answer: the batch then holds only those rows, and :meth:`merge` combines such
    batches into one (:func:`merge_batches`: re-padded; each row's real keys, positions and masked keys unchanged),
    which goes on answering. Each row's answer is the one it would give alone (up to floating-point ties, as in any
    batch); :meth:`pop_finished` hands over the ended rows' answers under the keys they were given.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch: BatchedCache,
        rows: list[_Row],
        *,
        keep_logits: bool = False,
        drop_finished: bool = True,
    ):
        self.model, self.tokenizer, self.batch = model, tokenizer, batch
        self.slots = rows  # the row at each batch position
        self.finished: list[_Row] = []
        self.keep_logits, self.drop_finished = keep_logits, drop_finished
        self.stop = eos_token_ids(model)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.stop[0] if self.stop[0] is not None else 0)

    @classmethod
    @torch.no_grad()
    def start(
        cls,
        model: nn.Module,
        tokenizer: Any,
        batch: BatchedCache,
        context_lengths: Sequence[int],
        question_ids: Sequence[torch.Tensor],
        max_new_tokens: Sequence[int],
        keys: Sequence[Any] | None = None,
        *,
        keep_logits: bool = False,
        drop_finished: bool = True,
    ) -> Answering:
        """The question forward of every row (left-padded; each row's positions continue from its own context
        length); ``keys``: what :meth:`pop_finished` names each row by (default: its position)."""
        b = len(context_lengths)
        keys = list(range(b)) if keys is None else list(keys)
        if not len(keys) == len(question_ids) == len(max_new_tokens) == b:
            raise ValueError(
                f"{b} rows, {len(question_ids)} questions, {len(max_new_tokens)} budgets and {len(keys)} keys"
            )
        lengths = [int(q.shape[1]) for q in question_ids]
        if min(lengths) < 1:
            raise ValueError("every question needs at least one token (kvpress's preprocess always adds its suffix)")
        rows = [
            _Row(k, max(int(m) - 1, 0), c + n, n) for k, m, c, n in zip(keys, max_new_tokens, context_lengths, lengths)
        ]
        self = cls(model, tokenizer, batch, rows, keep_logits=keep_logits, drop_finished=drop_finished)
        device = model.device
        width = max(lengths)
        input_ids = torch.full((b, width), self.pad, dtype=torch.long, device=device)
        real = torch.zeros((b, width), dtype=torch.bool, device=device)
        positions = torch.zeros((b, width), dtype=torch.long, device=device)
        for i, (q, n) in enumerate(zip(question_ids, lengths)):
            input_ids[i, width - n :] = q[0].to(device)
            real[i, width - n :] = True
            start = context_lengths[i] - (width - n)
            positions[i] = (start + torch.arange(width, device=device)).clamp_min(0)
        began = time.perf_counter()
        with batch.answering(model):
            batch.feed(real)
            out = model(input_ids=input_ids, past_key_values=batch.cache, position_ids=positions, logits_to_keep=1)
        self._take(out.logits[:, -1], list(enumerate(rows)), time.perf_counter() - began)
        return self

    @property
    def active(self) -> int:
        """How many rows are still answering."""
        return sum(not row.ended for row in self.slots)

    def _take(self, step_logits: torch.Tensor, taking: list[tuple[int, _Row]], seconds: float) -> None:
        """Each taking row's greedy token (and logits) from one forward's last-position logits ``(B, V)`` and the
        bytes it read; every row of the batch takes its share of the forward's ``seconds``."""
        for pos, row in taking:
            row.generated.append(step_logits[pos].argmax())
            if self.keep_logits:
                row.logits.append(step_logits[pos].detach().clone())
            row.read = self.batch.read_bytes(pos, row.fed)
        for row in self.slots:
            row.seconds += seconds / len(self.slots)

    def _drop_ended(self) -> None:
        """Move the rows that have ended out of the batch (:meth:`BatchedCache.select`)."""
        keep = [i for i, row in enumerate(self.slots) if not row.ended]
        self.finished += [row for row in self.slots if row.ended]
        if keep:
            self.batch.select(keep)  # compute only the rows still answering
            self.batch.put_masks(attention_modules(self.model))  # the kept rows' masked keys, in their new coordinates
        self.slots = [self.slots[i] for i in keep]

    @torch.no_grad()
    def run(self, park_at: int = 0) -> None:
        """Decode until every row has ended, or, with ``park_at`` > 0, until at most ``park_at`` rows still answer
        (the batch then holds only them: :meth:`merge` them with other batches' to go on)."""
        if park_at and not self.drop_finished:
            raise ValueError("parking needs drop_finished (a parked batch holds only the rows still answering)")
        device = self.model.device
        with self.batch.answering(self.model):
            while True:
                if self.drop_finished and any(row.ended for row in self.slots):
                    self._drop_ended()
                active = [(pos, row) for pos, row in enumerate(self.slots) if not row.ended]
                if not active or (park_at and len(active) <= park_at):
                    break
                flags = torch.tensor([not row.ended for row in self.slots], dtype=torch.bool, device=device)
                last = torch.stack([row.generated[-1] for row in self.slots]).to(device)
                tokens = torch.where(flags, last, torch.full_like(last, self.pad))
                self.batch.feed(flags[:, None])
                positions = torch.tensor([[row.next_position] for row in self.slots], device=device)
                began = time.perf_counter()
                out = self.model(input_ids=tokens[:, None], past_key_values=self.batch.cache, position_ids=positions)
                for row in self.slots:
                    row.next_position += 1
                for _, row in active:
                    row.fed += 1
                self._take(out.logits[:, -1], active, time.perf_counter() - began)
                for _, row in active:
                    row.remaining -= 1
                    row.stopped = row.generated[-1].item() in self.stop
        if not self.active:
            self.finished += self.slots
            self.slots = []

    def pop_finished(self) -> list[tuple[Any, BatchedAnswer]]:
        """The rows that have ended since the last call, as ``(key, answer)``."""
        out = []
        for row in self.finished:
            ids = torch.stack(row.generated)
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            out.append((row.key, BatchedAnswer(text, ids.tolist(), row.read, row.logits, row.seconds)))
        self.finished = []
        return out

    @classmethod
    def merge(cls, parts: Sequence[Answering]) -> Answering:
        """One batch of the rows still answering in ``parts`` (each parked by :meth:`run`, its finished rows popped),
        in order; the parts are used up."""
        if not parts:
            raise ValueError("nothing to merge")
        for part in parts:
            if part.finished:
                raise ValueError("pop the finished rows of a part before merging it")
            if not part.slots or any(row.ended for row in part.slots):
                raise ValueError("a part to merge must hold only rows still answering: park it with run(park_at=...)")
        reserve = max(row.remaining for part in parts for row in part.slots)
        batch = merge_batches([part.batch for part in parts], reserve=reserve)
        rows = [row for part in parts for row in part.slots]
        for part in parts:
            part.slots = []
        first = parts[0]
        return cls(
            first.model, first.tokenizer, batch, rows, keep_logits=first.keep_logits, drop_finished=first.drop_finished
        )


@dataclass
class Job:
    """One sample to answer in a stream (:func:`answer_stream`).

    Attributes
    ----------
    key : Any
        What the stream names its answer by.
    row : RowCache
        Its compressed cache.
    question_ids : torch.Tensor
        Its ``(1, q)`` question tokens.
    max_new_tokens : int
        Its answer budget.
    """

    key: Any
    row: RowCache
    question_ids: torch.Tensor
    max_new_tokens: int


@torch.no_grad()
def answer_stream(
    model: nn.Module,
    tokenizer: Any,
    chunks: Iterable[Sequence[Job]],
    batch_size: int,
    park_at: int | None = None,
    *,
    keep_logits: bool = False,
) -> Iterator[tuple[Any, BatchedAnswer]]:
    """Answer chunks of jobs, each chunk's dense and packed caches as two batches (:func:`combine_mode`), the answers
    that run long set aside and continued together (:class:`Answering`); yields ``(key, answer)`` as answers end.

    Parameters
    ----------
    model, tokenizer
        The model and its tokenizer.
    chunks : iterable of sequences of Job
        The jobs, ``batch_size`` or fewer at a time (read lazily: a chunk's caches can be built when it is reached).
        Every job's cache must be batchable (:func:`batching_blocker`).
    batch_size : int
        The batch size the chunks were cut to: the rows set aside go on once this many of them (of the same kind and,
        for dense caches, of lengths within a factor of two) wait.
    park_at : int, optional
        A batch down to this many rows still answering is set aside (default ``batch_size // 4``; 0: never).
    keep_logits : bool
        Keep each row's logits at every step.
    """
    park = batch_size // 4 if park_at is None else int(park_at)
    parked: dict[tuple[str, int], list[Answering]] = {}

    def set_aside(mode: str, answering: Answering) -> tuple[str, int]:
        """Park ``answering`` with the batches of its kind and length class (dense rows merge with rows about as long,
        so that a merged batch pads little); return the pool's key."""
        size = 0
        if mode == "padded":
            size = max(layer.keys.shape[2] for layer in answering.batch.cache.layers).bit_length()
        parked.setdefault((mode, size), []).append(answering)
        return mode, size

    def go_on(pool: tuple[str, int], final: bool) -> Iterator[tuple[Any, BatchedAnswer]]:
        while parked.get(pool):
            if not final and sum(part.active for part in parked[pool]) < batch_size:
                return
            answering = Answering.merge(parked.pop(pool))
            answering.run(park_at=0 if final else park)
            yield from answering.pop_finished()
            if answering.slots:
                pool = set_aside(pool[0], answering)

    for chunk in chunks:
        groups: dict[str, list[Job]] = {}
        for job in chunk:
            groups.setdefault(combine_mode([job.row]), []).append(job)
        for mode, jobs in groups.items():
            budgets = [int(job.max_new_tokens) for job in jobs]
            questions = [job.question_ids for job in jobs]
            batch = combine_caches(model, [job.row for job in jobs], reserve=answer_room(questions, budgets))
            answering = Answering.start(
                model,
                tokenizer,
                batch,
                [job.row.context_length for job in jobs],
                questions,
                budgets,
                keys=[job.key for job in jobs],
                keep_logits=keep_logits,
            )
            answering.run(park_at=park)
            yield from answering.pop_finished()
            if answering.slots:
                yield from go_on(set_aside(mode, answering), final=False)
    while parked:
        yield from go_on(next(iter(parked)), final=True)
