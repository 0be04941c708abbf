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
    holding the rows' own layers, which receive only their row's real tokens and are read row by row (see
    :mod:`pikvpress.cache.batched` for why a rectangular padded combine cannot keep those answers exact).

:func:`batching_blocker` names what neither can batch (a model with sliding-window layers, transformers' quantized
layers, an attention function that does not read pikvpress's layers); the harness answers those runs one sample at a
time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
    """

    text: str
    token_ids: list[int]
    kv_bytes_read: float
    logits: list[torch.Tensor] = field(default_factory=list)


def eos_token_ids(model: nn.Module) -> list[int]:
    """The tokens that end an answer (``model.generation_config.eos_token_id``, as kvpress reads it)."""
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


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
    width = max(int(q.shape[1]) for q in question_ids)
    batch = combine_caches(model, rows, reserve=width + max(max(int(m) for m in max_new_tokens) - 1, 0))
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
    b = len(context_lengths)
    device = model.device
    stop = eos_token_ids(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop[0] is not None else 0)
    lengths = [int(q.shape[1]) for q in question_ids]
    width = max(lengths)
    input_ids = torch.full((b, width), pad, dtype=torch.long, device=device)
    real = torch.zeros((b, width), dtype=torch.bool, device=device)
    positions = torch.zeros((b, width), dtype=torch.long, device=device)
    if min(lengths) < 1:
        raise ValueError("every question needs at least one token (kvpress's preprocess always adds its suffix)")
    for i, (q, n) in enumerate(zip(question_ids, lengths)):
        input_ids[i, width - n :] = q[0].to(device)
        real[i, width - n :] = True
        start = context_lengths[i] - (width - n)
        positions[i] = (start + torch.arange(width, device=device)).clamp_min(0)
    generated: list[list[torch.Tensor]] = [[] for _ in range(b)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(b)]
    reads: list[float] = [0.0] * b
    fed = list(lengths)  # each row's real tokens through the model (question, then its answer but the last token)
    remaining = [max(int(m) - 1, 0) for m in max_new_tokens]  # generate_answer's loop: range(max_new_tokens - 1)
    with batch.answering(model):
        batch.feed(real)
        out = model(input_ids=input_ids, past_key_values=batch.cache, position_ids=positions, logits_to_keep=1)
        _take(out.logits[:, -1], [(i, i) for i in range(b)], generated, logits, keep_logits)
        for i in range(b):
            reads[i] = batch.read_bytes(i, fed[i])
        next_positions = [c + n for c, n in zip(context_lengths, lengths)]
        slots = list(range(b))  # the row each batch position answers
        active = [i for i in range(b) if remaining[i] > 0]
        while active:
            if drop_finished and len(active) < len(slots):
                batch.select([slots.index(i) for i in active])  # compute only the rows still answering
                slots = list(active)
                batch.put_masks(attention_modules(model))  # the kept rows' masked keys, in their new coordinates
            flags = torch.tensor([i in active for i in slots], dtype=torch.bool, device=device)
            last = torch.stack([generated[i][-1] for i in slots]).to(device)
            tokens = torch.where(flags, last, torch.full_like(last, pad))
            batch.feed(flags[:, None])
            positions = torch.tensor([next_positions[i] for i in slots], device=device)
            out = model(input_ids=tokens[:, None], past_key_values=batch.cache, position_ids=positions[:, None])
            next_positions = [p + 1 for p in next_positions]
            step_logits = out.logits[:, -1]
            _take(step_logits, [(slots.index(i), i) for i in active], generated, logits, keep_logits)
            still = []
            for i in active:
                fed[i] += 1
                reads[i] = batch.read_bytes(slots.index(i), fed[i])
                remaining[i] -= 1
                if generated[i][-1].item() not in stop and remaining[i] > 0:
                    still.append(i)
            active = still
    answers = []
    for i in range(b):
        ids = torch.stack(generated[i])
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        answers.append(BatchedAnswer(text, ids.tolist(), reads[i], logits[i]))
    return answers


def _take(
    step_logits: torch.Tensor,
    active: list[tuple[int, int]],
    generated: list[list[torch.Tensor]],
    logits: list[list[torch.Tensor]],
    keep: bool,
) -> None:
    """Each active row's greedy token (and logits) from one forward's last-position logits ``(B, V)``; ``active``:
    (batch position, row) pairs."""
    for pos, i in active:
        generated[i].append(step_logits[pos].argmax())
        if keep:
            logits[i].append(step_logits[pos].detach().clone())
