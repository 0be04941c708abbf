"""Time spent inside a press's forward hooks, for the benchmarks that compare it side by side."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def timed_hooks(press: Any) -> Iterator[list[float]]:
    """Accumulate the seconds spent in ``press.forward_hook`` while the block runs.

    Yields a one-item list holding the running total (read it after the block). ``press=None`` times nothing.
    The press's class hook is wrapped on the instance and unwrapped on exit.
    """
    total = [0.0]
    if press is None:
        yield total
        return
    hook = type(press).forward_hook

    def timed(module, input, kwargs, output):
        start = time.perf_counter()
        try:
            return hook(press, module, input, kwargs, output)
        finally:
            total[0] += time.perf_counter() - start

    press.forward_hook = timed
    try:
        yield total
    finally:
        press.__dict__.pop("forward_hook", None)
