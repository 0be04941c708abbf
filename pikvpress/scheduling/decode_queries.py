"""The decode queries the model's attention computed, handed to the press that asked for them.

A decode-time press (:class:`~pikvpress.AdaptiveSchedulingPress`) scores each decode step's attention over the
cache. Instead of projecting and rotating the step's query again, it opens a :class:`DecodeQueryTap` on the
attention modules it hooks; the attention functions pikvpress wraps or registers call
:func:`record_decode_query`, which hands the query to every open tap watching that module. Nothing is written
on the modules: a tap is the press's own object, it holds the last query of each watched module until the press
takes it, and it is closed (and emptied) when the press's context ends. A closed tap, or a module no tap
watches, costs one empty-list check per attention call.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

#: at most this many query tokens are kept (one decode step, or kvpress's question through DecodingPress)
DECODE_QUERY_TOKENS = 64

#: the taps open now; held weakly, so a press dropped without closing its tap leaves nothing behind
_OPEN: weakref.WeakSet[DecodeQueryTap] = weakref.WeakSet()


class DecodeQueryTap:
    """The last post-RoPE queries (``(B, Hq, q_len, D)``, ``q_len <= DECODE_QUERY_TOKENS``) of the attention
    modules it watches, kept from :meth:`open` until :meth:`close`.

    Examples
    --------
    >>> tap = DecodeQueryTap()
    >>> tap.open(attention_modules)
    >>> model(next_token, past_key_values=cache)
    >>> tap.take(attention_modules[3])      # the query layer 3's attention used, or None
    >>> tap.close()
    """

    def __init__(self) -> None:
        self._watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._queries: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()

    @property
    def is_open(self) -> bool:
        return self in _OPEN

    def open(self, modules: Iterable[nn.Module]) -> None:
        """Start keeping the queries of ``modules`` (replaces what was watched before)."""
        self._watched = weakref.WeakSet(modules)
        self._queries = weakref.WeakKeyDictionary()
        _OPEN.add(self)

    def close(self) -> None:
        """Stop keeping queries and forget the ones kept."""
        _OPEN.discard(self)
        self._watched = weakref.WeakSet()
        self._queries = weakref.WeakKeyDictionary()

    def offer(self, module: nn.Module, query: torch.Tensor) -> None:
        if module in self._watched:
            self._queries[module] = query

    def take(self, module: nn.Module) -> torch.Tensor | None:
        """The last query ``module``'s attention computed since the last take, or None."""
        return self._queries.pop(module, None)


def listening() -> bool:
    """Whether a decode-time press is waiting for the queries attention computes."""
    return bool(_OPEN)


def record_decode_query(module: nn.Module, query: torch.Tensor) -> None:
    """Called by attention functions with the post-RoPE ``query`` ``(B, Hq, q_len, D)`` they computed."""
    if not _OPEN or query.shape[2] > DECODE_QUERY_TOKENS:
        return
    for tap in list(_OPEN):
        tap.offer(module, query)
