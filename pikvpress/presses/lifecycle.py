"""The end of a press's context: what a press held for it (hooks, pending decode steps, taps) is let go."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

from torch import nn


class FinishesOnExit:
    """Mixin (before kvpress's ``BasePress`` in the bases) whose ``with press(model):`` ends with :meth:`finish`, even
    when the block raises. Wrappers that enter only kvpress's hooks (``PrefillDecodingPress``, ``ComposedPress``)
    do not call it; such presses also let go in ``reset()`` or at their next prefill."""

    @contextmanager
    def __call__(self, model: nn.Module) -> Generator:
        try:
            with super().__call__(model):  # type: ignore[misc]
                yield
        finally:
            self.finish()

    def finish(self) -> None:
        """Let go of what the press held for its context."""
